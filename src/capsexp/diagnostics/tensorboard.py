"""TensorBoard output of one run. ``RunLogger(None)`` is a silent logger (non-main DDP ranks).

Every scalar's x-axis is the global optimizer step (``step``), including validation metrics.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

import numpy as np
from torch import Tensor


class Logger(Protocol):
    """Where the loop's and the monitor's values go: the engine contract's logger (``RunLogger`` below;
    ``RunLogger(None)`` is silent, for ranks that do not log)."""

    def scalars(self, values: Mapping[str, float], step: int) -> None: ...
    def text(self, tag: str, text: str, step: int) -> None: ...
    def image(self, tag: str, image: np.ndarray | Tensor, step: int, dataformats: str = "CHW") -> None: ...
    def histogram(self, tag: str, values: Tensor, step: int) -> None: ...
    def submit(self, work: Callable[[], None], what: str) -> None: ...
    def gradient_layout(self, stages: list[str]) -> None: ...
    def hparams(self, hparams: Mapping[str, Any], differing: Iterable[str], metrics: Mapping[str, float],
                step: int) -> None: ...
    def close(self) -> None: ...


_default_thread_hook = threading.excepthook


def _writer_errors_said_once(args: threading.ExceptHookArgs) -> None:
    """TensorBoard's writer thread keeps the error that ended it (a full disk, a removed run folder)
    and raises it again at the training thread's next write, where capsexp says it in one sentence;
    the thread's own printout would be a second report, with a traceback."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    if isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError):
        return
    _default_thread_hook(args)


class RunLogger:
    def __init__(self, log_dir: Path | None) -> None:
        self.writer = None
        self._worker: ThreadPoolExecutor | None = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))
            threading.excepthook = _writer_errors_said_once

    def submit(self, work: Callable[[], None], what: str) -> None:
        """Run ``work`` on the logger's own thread, in order, so that rendering a figure (about a
        quarter of a second) or writing a hundred scalars from values already on the host never
        holds up a training step; on a GPU it overlaps the steps' device work. ``close`` waits for it."""
        if self.writer is None:
            return
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capsexp-tensorboard")
        self._worker.submit(self._run, work, what)

    @staticmethod
    def _run(work: Callable[[], None], what: str) -> None:
        try:
            work()
        except Exception as exc:  # noqa: BLE001 -- a lost figure must not end a training run
            print(f"capsexp: WARNING could not write {what} to TensorBoard: {exc}", file=sys.stderr, flush=True)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def image(self, tag: str, image: np.ndarray | Tensor, step: int, dataformats: str = "CHW") -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats=dataformats)

    def histogram(self, tag: str, values: Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def gradient_layout(self, stages: list[str]) -> None:
        """Custom-scalars dashboard: every per-stage measure on one chart each, stem to head.

        The ``*_log10`` charts show decades on TensorBoard's default linear axis, where a capsule
        run's norms (0.02-0.4) would otherwise lie flat under an FC run's (0.4-5).
        """
        if self.writer is None:
            return
        below_head = [s for s in stages if s != "head"]
        self.writer.add_custom_scalars({
            "Learning per stage (log10: one unit is a factor of 10)": {
                "log10 grad_norm per stage (stem to head)": ["Multiline", [f"grad_log10/{s}" for s in stages]],
                "log10 update/weight per stage (stem to head)": ["Multiline", [f"update_log10/{s}" for s in stages]],
            },
            "Learning per stage": {
                "grad_norm per stage (stem to head)": ["Multiline", [f"grad_norm/{s}" for s in stages]],
                "update/weight per stage (stem to head)": ["Multiline", [f"update_to_weight/{s}" for s in stages]],
                "drift per stage (stem to head; 1 = as at the start)": ["Multiline", [f"drift/{s}" for s in stages]],
                "grad_norm relative to head": ["Multiline", [f"grad_rel_head/{s}" for s in below_head]],
                "grad_to_weight per stage": ["Multiline", [f"grad_to_weight/{s}" for s in stages]],
                "grad_norm entering the backbone": ["Multiline", ["grad_norm/features"]],
            },
            "Why (the head)": {
                "gradient ladder |dL/d hop| (scores to features)": ["Multiline", [r"grad_ladder/.*"]],
                "gradient ladder: each hop over the previous (below 1: it shrinks the gradient)":
                    ["Multiline", [r"grad_ladder_ratio/.*"]],
                "routing: entropy deficit log J - H (nats)": ["Multiline", ["routing/entropy_deficit"]],
                "routing: change of the output against uniform coupling": ["Multiline", ["routing/change"]],
                "routing: largest coupling, and length or activation gain": ["Multiline", ["routing/max_coupling",
                                                                                          "routing/gain"]],
                "linear probe accuracy per stage": ["Multiline", [r"probe/.*"]],
            },
            "Training": {
                "loss": ["Multiline", ["train/loss", "val/loss"]],
                "accuracy": ["Multiline", ["train/acc", "val/acc"]],
            },
        })

    def hparams(self, hparams: Mapping[str, Any], differing: Iterable[str], metrics: Mapping[str, float],
                step: int) -> None:
        """HParams dashboard entry written into this run's own event file (no extra run folder):
        ``capsexp.diagnostics.hparams`` builds it; the metrics are written as scalars at ``step`` beside it."""
        if self.writer is None:
            return
        from capsexp.diagnostics.hparams import hparams_summaries

        file_writer = self.writer._get_file_writer()
        for summary in hparams_summaries(hparams, metrics, differing):
            file_writer.add_summary(summary)
        self.scalars(metrics, step)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)  # what was submitted reaches the event file first
            self._worker = None
        if self.writer is not None:
            self.writer.close()
