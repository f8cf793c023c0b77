"""One training epoch and one evaluation pass. They return statistics; the caller saves and decides."""

from __future__ import annotations

import itertools
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from capsexp.runtime import Runtime, all_reduce, all_reduce_mean, broadcast_buffers


class Objective(nn.Module):
    """Model plus loss in one module, so DDP sees every parameter the loss uses.

    The head's auxiliary loss (reconstruction) and a learned loss scale take part in the
    forward pass here; wrapping only the classifier would leave them outside DDP's reducer.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, aux_weight: float) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.aux_weight = aux_weight

    def forward(self, images: Tensor, targets: Tensor, progress: float | Tensor) -> tuple[Tensor, Tensor]:
        """``progress`` (fraction of training done) may be a 0-d CPU tensor: see ``train_step``."""
        scores = self.model(images)
        # losses in fp32 whatever the autocast dtype: capsule lengths and margins are small numbers
        loss = self._loss(scores.float(), targets, progress)
        if self.aux_weight > 0:
            aux = self.model.head.auxiliary_loss(images, targets)
            if aux is not None:
                loss = loss + self.aux_weight * aux.float()
        return loss, scores

    # eager under trainer.compile: a loss that does Python arithmetic on ``progress`` (the spread
    # loss's margin schedule) would otherwise make the compiled graph recompile at every step
    @torch.compiler.disable
    def _loss(self, scores: Tensor, targets: Tensor, progress: float | Tensor) -> Tensor:
        return self.criterion(scores, targets, progress)


@dataclass
class TrainState:
    """Counters that a checkpoint must restore for a run to continue exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_val_acc: float = float("-inf")
    skipped_steps: int = 0
    timed_images: int = 0
    timed_seconds: float = 0.0
    last_train_loss: float = float("nan")
    window: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # unlogged loss x n, correct, n

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class StopTraining(Exception):
    """Raised inside the loop to end training early (non-finite values, a signal)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class SignalGuard:
    """SIGINT/SIGTERM set a flag; the loop finishes the current step, checkpoints and stops."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "SignalGuard":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some launchers): leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second Ctrl-C: the user really wants out now
            raise KeyboardInterrupt
        self.received = signum
        print(f"\ncapsexp: received {signal.Signals(signum).name}; finishing this step and saving a "
              f"checkpoint (press Ctrl-C again to abort at once).", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def progress_bar(iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=not enabled,
                dynamic_ncols=True, mininterval=0.5)


@torch.no_grad()
def evaluate(objective: nn.Module, loader: Iterable, rt: Runtime, limit: int | None,
             show_progress: bool) -> dict[str, float]:
    """Mean loss and accuracy over the validation set (over all ranks' samples under DDP).

    Under DDP ``objective`` must be the unwrapped module: ranks may hold different numbers of
    validation batches, and DDP's forward would wait for a collective the others never join.
    """
    objective.eval()
    broadcast_buffers(objective, rt)  # each rank updated its running statistics on its last batch
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device)
    seen = torch.zeros((), device=rt.device)
    total = len(loader) if limit is None else min(limit, len(loader))
    batches = itertools.islice(loader, total)  # not one batch more than the limit is loaded
    for images, targets in progress_bar(batches, total, "val", show_progress):
        images, targets = rt.to_device(images, targets)
        with rt.autocast():
            loss, scores = objective(images, targets, 1.0)
        loss_sum += loss.float() * targets.numel()
        correct += (scores.argmax(1) == targets).sum()
        seen += targets.numel()
    # sums, not per-rank means: under DDP the ranks may hold different numbers of samples
    sums = all_reduce(torch.stack([loss_sum, correct, seen.float()]), rt, "sum")
    loss_total, correct_total, count = sums.tolist()  # note: one CPU-GPU sync per evaluation
    return {"val/loss": loss_total / max(count, 1), "val/acc": correct_total / max(count, 1)}


def set_lr_scalars(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``lr`` is the head's learning rate; ``lr/<group>`` for every parameter group."""
    out = {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}
    out["lr"] = optimizer.param_groups[-1]["lr"]
    return out



@dataclass
class Loop:
    """What one training step needs; built once by ``train(cfg)``."""

    objective: nn.Module           # what runs (maybe DDP-wrapped, maybe compiled)
    model: nn.Module               # the bare Classifier (stages, head hooks)
    evaluator: nn.Module           # what evaluates: the objective without the DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    rt: Runtime
    trainer: Any                   # the trainer config group
    monitor: Any                   # capsexp.diagnostics.GradientMonitor
    logger: Any                    # capsexp.logger.RunLogger
    guard: SignalGuard
    total_steps: int
    show_progress: bool
    criterion: nn.Module | None = None
    params: list[nn.Parameter] = field(default_factory=list)
    # set when every rank has agreed (in the per-step check) to stop after this step; the loop
    # acts on this, never on its own signal flag, so all ranks leave after the same step
    stop: bool = False

    def __post_init__(self) -> None:
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]


# fp16 loss scale below which overflow is taken for a real fault (fairseq's min_loss_scale)
MIN_LOSS_SCALE = 1e-4


def _grad_norms(params: list[nn.Parameter], device: torch.device) -> tuple[dict[int, Tensor], Tensor]:
    """Each parameter's gradient L2 norm (by ``id``; the gradient diagnostics reuse them) and the total."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return {}, torch.zeros((), device=device)
    norms = torch._foreach_norm([p.grad for p in with_grad])
    return {id(p): n for p, n in zip(with_grad, norms)}, torch.linalg.vector_norm(torch.stack(norms))


def train_step(loop: Loop, images: Tensor, targets: Tensor, state: TrainState) -> tuple[Tensor, Tensor, int]:
    """Forward, backward, diagnostics, guarded update.

    Returns (loss, correct, n): device tensors plus the number of images the step counts for
    (0 when its update was skipped, so a skipped step does not enter the logged averages).
    """
    rt, cfg = loop.rt, loop.trainer
    images, targets = rt.to_device(images, targets)
    loop.optimizer.zero_grad(set_to_none=True)
    with rt.autocast():
        # a CPU tensor, not a float: a compiled objective guards on a float's value (one compile per
        # new value); reading it back in the eager loss is a host-side read, not a device sync.
        # 0 at the first step, 1 at the last, so annealed losses reach their end value
        progress = torch.tensor(state.step / max(loop.total_steps - 1, 1), dtype=torch.float64)
        loss, scores = loop.objective(images, targets, progress)
    loop.scaler.scale(loss).backward()
    loop.scaler.unscale_(loop.optimizer)
    norms, total_norm = _grad_norms(loop.params, rt.device)
    # the one measuring point: after backward and unscaling, before clipping and the step
    if loop.monitor is not None:
        loop.monitor.after_backward(state.step + 1, loop.model, images, targets, grad_norms=norms)
    loss_bad, grad_bad, stop = _step_flags(loop, loss, total_norm)
    loop.stop = stop  # a signal reached some rank: every rank ends after this same step
    if grad_bad and not loss_bad and loop.scaler.is_enabled():
        # fp16 overflow: the scaler's business. No update, no schedule step, a smaller scale
        _skip_update(loop, state)
        # a scale this small no longer means fp16 range: the gradients are not finite at any
        # scale (reading the scale is a host read, on overflow steps only)
        if loop.scaler.get_scale() < MIN_LOSS_SCALE:
            raise StopTraining(
                f"the fp16 loss scale fell below {MIN_LOSS_SCALE:g} at step {state.step + 1}: the gradients "
                f"are not finite at any scale. Stopped with the last good checkpoint kept; use "
                f"trainer.precision=bf16 or fp32, lower optim.lr, or set trainer.grad_clip.", exit_code=3)
        return _skipped(rt)
    if loss_bad or grad_bad:
        _on_nonfinite(loop, state, loss_bad)
        return _skipped(rt)
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grads_with_norm_(loop.params, float(cfg.grad_clip), total_norm)
    # not scaler.step(): it would read found_inf on the host a second time; the flags above
    # already proved the unscaled gradients finite, and update() reads found_inf on the device
    loop.optimizer.step()
    loop.scaler.update()
    loop.scheduler.step()
    return loss.detach(), (scores.argmax(1) == targets).sum(), targets.shape[0]


def _step_flags(loop: Loop, loss: Tensor, total_norm: Tensor) -> tuple[bool, bool, bool]:
    """(loss non-finite, gradients non-finite, stop requested), read in one device-to-host transfer.

    note: this is the one CPU-GPU sync of an ordinary step. Under DDP the flags are all-reduced
    (MAX), so every rank takes the same decision: gradients are already averaged, but a signal
    reaches each rank at its own moment.
    """
    received = float(loop.guard.received is not None)
    flags = torch.stack([(~torch.isfinite(loss.detach())).float(), (~torch.isfinite(total_norm)).float(),
                         torch.full((), received, device=total_norm.device)])
    if loop.rt.distributed:
        all_reduce(flags, loop.rt, "max")
    loss_bad, grad_bad, stop = flags.tolist()
    return loss_bad > 0, grad_bad > 0, stop > 0


def _skip_update(loop: Loop, state: TrainState) -> None:
    """Drop this step's gradients; ``update()`` closes the step's ``unscale_`` (a smaller scale
    after an fp16 overflow; a no-op when scaling is off). The schedule does not move."""
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scaler.update()
    state.skipped_steps += 1


def _skipped(rt: Runtime) -> tuple[Tensor, Tensor, int]:
    zero = torch.zeros((), device=rt.device)
    return zero, zero, 0


def _on_nonfinite(loop: Loop, state: TrainState, loss_bad: bool) -> None:
    from capsexp.gradients import nonfinite_stage

    stage = nonfinite_stage(loop.model.stages()) or "none (the loss itself)"
    step = state.step + 1  # the TensorBoard x-axis: this step, counted from 1
    what = "loss" if loss_bad else "gradient"
    if loop.trainer.on_nonfinite == "skip":
        _skip_update(loop, state)
        loop.logger.scalars({"train/skipped_steps": state.skipped_steps}, step)
        print(f"capsexp: non-finite {what} at step {step} (first stage: {stage}); update skipped "
              f"({state.skipped_steps} so far).", file=sys.stderr, flush=True)
        return
    raise StopTraining(
        f"non-finite {what} at step {step}; first stage with non-finite gradients: {stage}. "
        f"Stopped with the last good checkpoint kept; lower optim.lr, set trainer.grad_clip, "
        f"or use trainer.on_nonfinite=skip.", exit_code=3)


def train_one_epoch(loop: Loop, loader: Any, state: TrainState, batches: int,
                    max_steps: int | None) -> dict[str, float]:
    """Train until the epoch's ``batches`` are done (or ``max_steps``, or a signal).

    Resumes mid-epoch at ``state.batch_in_epoch``: the loader's sampler already starts there.
    Throughput counts only steps after ``trainer.warmup_steps_excluded``.
    """
    loop.objective.train()
    rt, cfg = loop.rt, loop.trainer
    sums = torch.tensor(state.window, device=rt.device)  # loss x n, correct, n since the last log
    count = batches - state.batch_in_epoch
    if max_steps is not None:
        count = min(count, max_steps - state.step)
    # islice: not one batch more than this epoch will train on is loaded
    bar = progress_bar(itertools.islice(loader, max(count, 0)), count, f"epoch {state.epoch}",
                       loop.show_progress)
    tick = None
    for images, targets in bar:
        if tick is None and state.step >= cfg.warmup_steps_excluded:
            rt.synchronize()
            tick, tick_images = time.perf_counter(), 0
        batch = targets.shape[0]
        loss, correct, n = train_step(loop, images, targets, state)
        # torch.full, not torch.tensor: a host-to-GPU copy of a Python number would sync every step
        sums += torch.stack([loss.float() * n, correct.float(), torch.full((), float(n), device=rt.device)])
        state.step += 1
        state.batch_in_epoch += 1
        if tick is not None:
            tick_images += batch
        if state.step % cfg.log_every_n_steps == 0:
            _log_train(loop, sums, state, bar)
            sums.zero_()
        if loop.stop:
            break
    if tick is not None:
        rt.synchronize()
        state.timed_seconds += time.perf_counter() - tick
        state.timed_images += tick_images * rt.world_size
    # kept in the state so a checkpoint taken now resumes the same logging window; averaged
    # over ranks, since every rank restores rank 0's checkpoint
    state.window = all_reduce_mean(sums, rt).tolist()
    if not loop.stop and state.window[2] > 0:
        _log_train(loop, sums, state, bar)
        state.window = [0.0, 0.0, 0.0]
    return {"train/loss": state.last_train_loss}


def _log_train(loop: Loop, sums: Tensor, state: TrainState, bar: Any) -> None:
    loss_sum, correct, n = all_reduce_mean(sums, loop.rt).tolist()  # note: CPU-GPU sync, logging steps only
    values = {"train/loss": loss_sum / max(n, 1), "train/acc": correct / max(n, 1)}
    values.update(set_lr_scalars(loop.optimizer))
    loop.logger.scalars(values, state.step)
    state.last_train_loss = values["train/loss"]
    if hasattr(bar, "set_postfix"):
        bar.set_postfix(loss=f"{values['train/loss']:.3f}", acc=f"{values['train/acc']:.3f}")
