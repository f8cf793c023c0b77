"""Progress as plain lines, for logs: where no terminal shows the progress bar (Slurm, nohup, CI).

``trainer.progress=auto`` draws tqdm's bar on a terminal; elsewhere the loop prints one line every
``trainer.progress_every_n_steps`` steps and at the end of every epoch, to stderr:
``capsexp: step 120/500 (epoch 1/4) loss 1.234, 85.2 images/s, ETA 4m12s``. The line reads only
values already on the host (the loop's step count and its last logged train loss), so printing
it never waits for the device.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO


def format_duration(seconds: float) -> str:
    """``42s``, ``4m12s``, ``3h07m`` (whole seconds, minutes past an hour); ``-`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "-"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def progress_line(step: int, total_steps: int, epoch: int, epochs: int, loss: float,
                  images_per_sec: float, eta_seconds: float) -> str:
    """One progress line; ``epoch`` counts from 1, and what is not known yet (nan) shows as ``-``."""
    shown_loss = f"{loss:.3f}" if math.isfinite(loss) else "-"
    speed = f"{images_per_sec:.1f}" if math.isfinite(images_per_sec) else "-"
    return (f"capsexp: step {step}/{total_steps} (epoch {epoch}/{epochs}) loss {shown_loss}, "
            f"{speed} images/s, ETA {format_duration(eta_seconds)}")


class ProgressLines:
    """Prints the progress lines of one run; the training loop calls it after every step.

    images/s is measured since the previous line, within the epoch (validation is not training
    time); the ETA comes from the wall time per step since the first step, validation included,
    so it is the time until the last training step. The first step (set-up, compilation) is left
    out of both.
    """

    def __init__(self, every: int, total_steps: int, epochs: int, world_size: int,
                 stream: TextIO | None = None) -> None:
        self.every, self.total_steps, self.epochs, self.world_size = every, total_steps, epochs, world_size
        self.stream = stream
        self._first: tuple[float, int] | None = None   # (time, step) after the first step
        self._window = (0.0, 0)                         # (time, images) where images/s is measured from
        self._images = 0
        self._printed_step = -1

    def begin_epoch(self) -> None:
        self._window = (time.perf_counter(), self._images)

    def after_step(self, state: Any, images: int) -> None:
        """After each step: ``state.step`` counts the steps done; ``images`` this rank's batch."""
        self._images += images * self.world_size
        now = time.perf_counter()
        if self._first is None:
            self._first, self._window = (now, state.step), (now, self._images)
        elif state.step % self.every == 0:
            self._print(state, now)

    def end_epoch(self, state: Any) -> None:
        """The epoch's line (unless its last step already printed one)."""
        if state.step != self._printed_step and self._first is not None:
            self._print(state, time.perf_counter())

    def _print(self, state: Any, now: float) -> None:
        start, start_step = self._first or (now, state.step)
        since, seen = self._window
        speed = (self._images - seen) / (now - since) if now > since and self._images > seen else math.nan
        done = state.step - start_step
        eta = (now - start) / done * (self.total_steps - state.step) if done > 0 else math.nan
        epoch = min(state.epoch + 1, self.epochs)
        print(progress_line(state.step, self.total_steps, epoch, self.epochs, float(state.last_train_loss),
                            speed, eta), file=self.stream or sys.stderr, flush=True)
        self._window, self._printed_step = (now, self._images), state.step


class NoLines:
    """No progress lines: a terminal shows the bar, progress is off, or this rank does not print."""

    def begin_epoch(self) -> None:
        pass

    def after_step(self, state: Any, images: int) -> None:
        pass

    def end_epoch(self, state: Any) -> None:
        pass


def progress_lines(trainer: Any, is_main: bool, total_steps: int, batches: int,
                   world_size: int) -> ProgressLines | NoLines:
    """The line printer when ``trainer.progress=auto`` and stderr is not a terminal (main rank only)."""
    if not is_main or str(trainer.progress) != "auto" or sys.stderr.isatty():
        return NoLines()
    epochs = max(math.ceil(total_steps / max(batches, 1)), 1)
    return ProgressLines(int(trainer.progress_every_n_steps), total_steps, epochs, world_size)
