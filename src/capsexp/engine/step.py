"""One training step, one training epoch and one evaluation pass.

The loop's contract (``capsexp.engine.loop``) is narrow and typed: ``Loop`` holds what a step needs,
``StepConfig`` the few trainer settings it reads, and ``Monitor``/``Logger`` are the two Protocols
it talks to. Epochs and evaluations return their statistics; ``capsexp.train`` logs the epoch-level ones,
saves and decides.
"""

from __future__ import annotations

import itertools
import sys
import time
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from capsexp.checks import Check, choice, integer, one_of, positive
from capsexp.errors import UserError
from capsexp.engine.loop import EpochStats, Loop, StopTraining, TrainState
from capsexp.runtime import Runtime, all_reduce, all_reduce_mean, broadcast_buffers

NONFINITE_POLICIES = ("stop", "skip")
CHECKPOINT_POLICIES = ("last", "last+best", "none")  # what train.py writes into checkpoints/
CHECKS: list[Check] = [
    ("trainer.max_epochs", integer(1, optional=True), "a positive integer or null"),
    ("trainer.max_steps", integer(1, optional=True), "a positive integer or null"),
    ("trainer.limit_train_batches", integer(1, optional=True), "a positive integer or null"),
    ("trainer.limit_val_batches", integer(1, optional=True), "a positive integer or null"),
    ("trainer.log_every_n_steps", integer(1), "a positive integer"),
    ("trainer.warmup_steps_excluded", integer(0), "an integer >= 0"),
    ("trainer.grad_clip", positive(optional=True), "a positive number or null"),
    ("trainer.on_nonfinite", choice(*NONFINITE_POLICIES), one_of(NONFINITE_POLICIES)),
    ("trainer.progress", choice("auto", True, False), "auto, true or false"),
    ("trainer.progress_every_n_steps", integer(1), "a positive integer"),
    ("trainer.checkpoints", choice(*CHECKPOINT_POLICIES), one_of(CHECKPOINT_POLICIES)),
]
# fp16 loss scale below which overflow is taken for a real fault (fairseq's min_loss_scale)
MIN_LOSS_SCALE = 1e-4


def cross_check(cfg: Any) -> None:
    t = cfg.trainer
    if t.max_epochs is None and t.max_steps is None:
        raise UserError("trainer.max_epochs and trainer.max_steps are both null; set at least one.")
    if t.resume is not None and not isinstance(t.resume, str):
        raise UserError(f"trainer.resume={t.resume!r} is not allowed; it must be a checkpoint path, auto or null.")


def progress_bar(iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=not enabled,
                dynamic_ncols=True, mininterval=0.5)


@torch.no_grad()
def evaluate(objective: nn.Module, loader: DataLoader, rt: Runtime, limit: int | None,
             show_progress: bool) -> dict[str, float]:
    """Mean loss and accuracy over the validation set (over all ranks' samples under DDP).

    Under DDP ``objective`` must be the unwrapped module: ranks may hold different numbers of
    validation batches, and DDP's forward would wait for a collective the others never join.
    """
    objective.eval()
    broadcast_buffers(objective, rt)  # each rank updated its running statistics on its last batch
    sums = torch.zeros(3, device=rt.device)  # loss x n, correct, n
    total = len(loader) if limit is None else min(limit, len(loader))
    batches = itertools.islice(loader, total)  # not one batch more than the limit is loaded
    for images, targets in progress_bar(batches, total, "val", show_progress):
        images, targets = rt.to_device(images, targets)
        with rt.autocast():
            loss, scores, *_ = objective(images, targets, 1.0)
        n = torch.full((), float(targets.numel()), device=rt.device)
        sums += torch.stack([loss.float() * n, (scores.argmax(1) == targets).sum().float(), n])
    # sums, not per-rank means: under DDP the ranks may hold different numbers of samples
    loss_total, correct_total, count = all_reduce(sums, rt, "sum").tolist()  # note: one sync per evaluation
    return {"val/loss": loss_total / max(count, 1), "val/acc": correct_total / max(count, 1)}


def lr_scalars(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``lr`` is the head's learning rate; ``lr/<group>`` for every parameter group."""
    out = {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}
    out["lr"] = optimizer.param_groups[-1]["lr"]
    return out


def _grad_norms(params: list[nn.Parameter], device: torch.device) -> tuple[dict[int, Tensor], Tensor]:
    """Each parameter's gradient L2 norm (by ``id``; the diagnostics reuse them) and their total:
    the norm that clipping uses and that ``grad_norm/total`` reports (a learned loss scale included)."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return {}, torch.zeros((), device=device)
    norms = torch._foreach_norm([p.grad for p in with_grad if p.grad is not None])  # all of with_grad
    return {id(p): n for p, n in zip(with_grad, norms)}, torch.linalg.vector_norm(torch.stack(norms))


def train_step(loop: Loop, images: Tensor, targets: Tensor, state: TrainState) -> tuple[Tensor, Tensor, int]:
    """Forward, backward, diagnostics, guarded update.

    Returns (loss, correct, n): device tensors plus the number of images the step counts for
    (0 when its update was skipped, so a skipped step does not enter the logged averages).
    """
    rt, step = loop.rt, state.step + 1  # ``step``: the TensorBoard x-axis, counted from 1
    images, targets = rt.to_device(images, targets)
    loop.optimizer.zero_grad(set_to_none=True)
    measure = loop.monitor.before_forward(step)
    with rt.autocast():
        # a CPU tensor, not a float: a compiled objective guards on a float's value (one compile per
        # new value); reading it back in the eager loss is a host-side read, not a device sync.
        # 0 at the first step, 1 at the last, so annealed losses reach their end value
        progress = torch.tensor(state.step / max(loop.total_steps - 1, 1), dtype=torch.float64)
        loss, scores, telemetry, shown, hops = loop.objective(images, targets, progress, measure)
    loop.monitor.watch(hops, loop.scaler)  # tensor hooks on the ladder's activations: a logging step only
    loop.scaler.scale(loss).backward()
    loop.scaler.unscale_(loop.optimizer)
    norms, total_norm = _grad_norms(loop.params, rt.device)
    # the one measuring point: after backward and unscaling, before clipping and the step
    loop.monitor.after_backward(step, norms, total_norm, telemetry, shown)
    updated = _guarded_update(loop, state, loss, total_norm)
    loop.monitor.after_update(step, updated)
    if not updated:
        zero = torch.zeros((), device=rt.device)
        return zero, zero, 0
    return loss.detach(), (scores.argmax(1) == targets).sum(), targets.shape[0]


def _guarded_update(loop: Loop, state: TrainState, loss: Tensor, total_norm: Tensor) -> bool:
    """Clip and step unless the loss or the gradients are not finite; True when the weights moved."""
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
                f"are not finite at any scale; resume with trainer.precision=bf16 or fp32, or start a new "
                f"run with a lower optim.lr or trainer.grad_clip set.", exit_code=3)
        return False
    if loss_bad or grad_bad:
        _on_nonfinite(loop, state, loss_bad)
        return False
    if loop.config.grad_clip is not None:
        torch.nn.utils.clip_grads_with_norm_(loop.params, loop.config.grad_clip, total_norm)
    # not scaler.step(): it would read found_inf on the host a second time; the flags above
    # already proved the unscaled gradients finite, and update() reads found_inf on the device
    loop.optimizer.step()
    loop.scaler.update()
    loop.scheduler.step()
    return True


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


def _on_nonfinite(loop: Loop, state: TrainState, loss_bad: bool) -> None:
    from capsexp.diagnostics.gradients import nonfinite_stage

    stage = nonfinite_stage(loop.model.stages()) or "none (the loss itself)"
    step = state.step + 1
    what = "loss" if loss_bad else "gradient"
    if loop.config.on_nonfinite == "skip":
        _skip_update(loop, state)
        loop.logger.scalars({"train/skipped_steps": state.skipped_steps}, step)
        print(f"capsexp: non-finite {what} at step {step} (first stage: {stage}); update skipped "
              f"({state.skipped_steps} so far).", file=sys.stderr, flush=True)
        return
    raise StopTraining(
        f"non-finite {what} at step {step}; first stage with non-finite gradients: {stage}. Start a new run "
        f"with a lower optim.lr or trainer.grad_clip set, or resume with trainer.on_nonfinite=skip.",
        exit_code=3)


def train_one_epoch(loop: Loop, loader: Any, state: TrainState, batches: int) -> EpochStats:
    """Train until the epoch's ``batches`` are done (or ``loop.total_steps``, or a signal).

    Resumes mid-epoch at ``state.batch_in_epoch``: the loader's sampler already starts there.
    Train loss and accuracy are logged every ``log_every_n_steps``; the timed part starts after
    ``warmup_steps_excluded`` steps. Returns what it did; the caller keeps the throughput.
    """
    loop.objective.train()
    rt, cfg = loop.rt, loop.config
    sums = torch.tensor(state.window, device=rt.device)  # loss x n, correct, n since the last log
    count = max(min(batches - state.batch_in_epoch, loop.total_steps - state.step), 0)
    # islice: not one batch more than this epoch will train on is loaded
    bar = progress_bar(itertools.islice(loader, count), count, f"epoch {state.epoch}", loop.show_progress)
    tick, steps, images_seen, timed_images = None, 0, 0, 0
    loop.lines.begin_epoch()
    for images, targets in bar:
        if tick is None and state.step >= cfg.warmup_steps_excluded:
            rt.synchronize()
            tick = time.perf_counter()
        loss, correct, n = train_step(loop, images, targets, state)
        # torch.full, not torch.tensor: a host-to-GPU copy of a Python number would sync every step
        sums += torch.stack([loss.float() * n, correct.float(), torch.full((), float(n), device=rt.device)])
        state.step, state.batch_in_epoch, steps = state.step + 1, state.batch_in_epoch + 1, steps + 1
        images_seen += targets.shape[0]
        timed_images += targets.shape[0] if tick is not None else 0
        if state.step % cfg.log_every_n_steps == 0:
            _log_window(loop, sums, state, bar)
            sums.zero_()
        loop.lines.after_step(state, targets.shape[0])  # host values only: the step count, the last loss
        if loop.stop:
            break
    seconds = 0.0
    if tick is not None:
        rt.synchronize()
        seconds = time.perf_counter() - tick
    # kept in the state so a checkpoint taken now resumes the same logging window; averaged
    # over ranks, since every rank restores rank 0's checkpoint
    state.window = all_reduce_mean(sums, rt).tolist()
    if not loop.stop and state.window[2] > 0:
        _log_window(loop, sums, state, bar)
        state.window = [0.0, 0.0, 0.0]
    if not loop.stop:
        loop.lines.end_epoch(state)
    return EpochStats(steps, images_seen * rt.world_size, seconds, timed_images * rt.world_size,
                      state.last_train_loss)


def _log_window(loop: Loop, sums: Tensor, state: TrainState, bar: Any) -> None:
    loss_sum, correct, n = all_reduce_mean(sums, loop.rt).tolist()  # note: CPU-GPU sync, logging steps only
    values = {"train/loss": loss_sum / max(n, 1), "train/acc": correct / max(n, 1)}
    values.update(lr_scalars(loop.optimizer))
    loop.logger.scalars(values, state.step)
    state.last_train_loss = values["train/loss"]
    if hasattr(bar, "set_postfix"):
        bar.set_postfix(loss=f"{values['train/loss']:.3f}", acc=f"{values['train/acc']:.3f}")
