"""``train(cfg) -> dict``: one run, testable without Hydra's command line."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, cast

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from capsexp.errors import UserError, disk_cause, disk_error
from capsexp.rundir.checkpoint import link_checkpoint, load_checkpoint, newest_checkpoint, save_checkpoint
from capsexp.config.validation import flatten, validate
from capsexp.data.datasets import bad_image_count, build_datasets, build_loaders, shutdown_workers
from capsexp.data.sampling import EpochSampler
from capsexp.diagnostics.drift import probe_images
from capsexp.diagnostics.probe import ProbeSet
from capsexp.engine.assembly import build_loop, seed_everything
from capsexp.engine.step import evaluate, train_one_epoch
from capsexp.engine.loop import EpochStats, Loop, StopTraining, TrainState
from capsexp.engine.guards import first_nonfinite
from capsexp.engine.console import progress_lines
from capsexp.diagnostics.hparams import MARKED, compared_hparams
from capsexp.diagnostics.summary import ALARMS, print_summary, summary_metrics
from capsexp.config.naming import routing_iterates, swept_keys_of_this_job
from capsexp.rundir.resume import NothingToDo, check_classes, open_resume
from capsexp.rundir.files import shown
from capsexp.rundir.folder import (environment, output_dir, start_run_record, write_metrics,
                                   write_run_record)
from capsexp.rundir.lock import hold_run_folder
from capsexp.runtime import Runtime, all_reduce, barrier, setup_runtime, teardown


def train(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Run one experiment into ``run_dir`` (the Hydra output folder by default); return its metrics.

    The folder is locked for the whole run (one run per folder, ``capsexp.rundir.lock``); a resume
    follows ``capsexp.rundir.resume``'s rule, and a complete run is not run again (its metrics returned).
    """
    validate(cfg)  # every value checked before data or weights are touched
    run_dir = Path(run_dir) if run_dir is not None else output_dir()
    with hold_run_folder(run_dir):
        try:
            ckpt = open_resume(cfg, run_dir)
        except NothingToDo as done:
            if int(os.environ.get("RANK", "0")) == 0:
                print(done, flush=True)
            return done.metrics
        seed_everything(int(cfg.seed))
        rt = setup_runtime(cfg.trainer)
        try:
            return _fit(cfg, run_dir, rt, ckpt)
        except Exception as exc:
            raise _failed_write(run_dir, exc) or exc
        finally:
            teardown(rt)


def _failed_write(run_dir: Path, exc: Exception) -> UserError | None:
    """One sentence for a run stopped by its folder: removed under it, or a disk that refused a write
    (full, read-only, protected) at any point, TensorBoard's writer thread included; None otherwise."""
    if isinstance(exc, UserError):
        return None
    if not run_dir.is_dir():
        return UserError(f"the run folder '{shown(run_dir)}' was removed while the run was writing to it, so the "
                         f"run stopped; start it again.")
    if disk_cause(exc) is None:  # a bug or a stop of another kind: it says itself what happened
        return None
    path = newest_checkpoint(run_dir)
    kept = (f"its last checkpoint, {shown(path)}, is intact: make room, then trainer.resume=auto continues from it"
            if path is not None else "no checkpoint had been written yet, so the run must start again")
    return disk_error(run_dir, exc, kept)


def _fit(cfg: DictConfig, run_dir: Path, rt: Runtime, ckpt: dict[str, Any] | None) -> dict[str, Any]:
    train_ds, val_ds, num_classes = build_datasets(cfg.data, seed=int(cfg.seed))
    if ckpt is not None:
        check_classes(ckpt, cfg, num_classes)
    if rt.is_main:  # the last refusal is behind us: Hydra's record and the log file may be written
        start_run_record(run_dir, cfg)
    train_loader, val_loader = build_loaders(cfg.data, train_ds, val_ds, seed=int(cfg.seed),
                                             pin_memory=rt.device.type == "cuda", rank=rt.rank,
                                             world_size=rt.world_size)
    batches = len(train_loader) if cfg.trainer.limit_train_batches is None else \
        min(int(cfg.trainer.limit_train_batches), len(train_loader))
    max_epochs = int(cfg.trainer.max_epochs) if cfg.trainer.max_epochs is not None else None
    max_steps = int(cfg.trainer.max_steps) if cfg.trainer.max_steps is not None else None
    total_steps = min(s for s in (max_steps, max_epochs and max_epochs * batches) if s)
    show = rt.is_main and (sys.stderr.isatty() if str(cfg.trainer.progress) == "auto" else bool(cfg.trainer.progress))
    lines = progress_lines(cfg.trainer, rt.is_main, total_steps, batches, rt.world_size)
    probe = probe_images(val_ds, int(cfg.grads.drift.probe_images))
    # the run folder is the TensorBoard run
    probe_set = ProbeSet.from_datasets(train_ds, val_ds, int(cfg.grads.probe.images)) if rt.is_main else None
    loop = build_loop(cfg, rt, num_classes, total_steps, run_dir, show, lines=lines, probe=probe,
                      probe_set=probe_set)
    state = TrainState()
    if ckpt is not None:
        restore(ckpt, loop, state)
    loop.monitor.start(rt)  # the starting Gram matrices, unless the checkpoint had them
    if rt.is_main:
        if ckpt is None and str(cfg.trainer.resume) == "auto":
            print(f"capsexp: trainer.resume=auto found no checkpoint in {run_dir}; starting at step 0.", flush=True)
        _announce(cfg, run_dir, loop, ckpt is not None, state)
    try:
        with loop.guard:
            metrics, stop = _epochs(cfg, loop, state, train_loader, val_loader, batches, max_epochs,
                                    total_steps, run_dir, num_classes)
    except BaseException:  # out of memory, a second Ctrl-C, a bug: what was logged reaches the disk
        loop.logger.close()
        raise
    finally:
        shutdown_workers(train_loader, val_loader)
    metrics = _finish(cfg, run_dir, loop, state, metrics, stop, _data_facts(cfg, train_ds, val_ds, num_classes, rt))
    if stop is not None:
        raise _with_kept(stop, cfg, run_dir)
    return metrics


def _epochs(cfg: DictConfig, loop: Loop, state: TrainState, train_loader: DataLoader, val_loader: DataLoader,
            batches: int, max_epochs: int | None, total_steps: int, run_dir: Path,
            num_classes: int) -> tuple[dict[str, float], StopTraining | None]:
    """The epoch loop: train, validate, checkpoint; returns the last validation metrics."""
    val: dict[str, float] = {}
    while state.step < total_steps and (max_epochs is None or state.epoch < max_epochs):
        # build_loaders gives the loader an EpochSampler; DataLoader.sampler is typed as any iterable
        cast(EpochSampler, train_loader.sampler).set_epoch(state.epoch,
                                                           skip=state.batch_in_epoch * int(cfg.data.batch_size))
        try:
            _keep(state, train_one_epoch(loop, train_loader, state, batches))
        except StopTraining as exc:  # weights may be poisoned: keep the last good checkpoint as it is
            return val, exc
        if loop.stop:
            return val, _poisoned(loop, state, None) or _interrupted(cfg, loop, state, run_dir, num_classes)
        if state.batch_in_epoch >= batches:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        limit = cfg.trainer.limit_val_batches
        val = evaluate(loop.evaluator, val_loader, loop.rt, None if limit is None else int(limit),
                       loop.show_progress)
        loop.logger.scalars(val | _throughput(state), state.step)
        poisoned = _poisoned(loop, state, val)  # before anything is saved
        if poisoned is not None:
            return val, poisoned
        loop.monitor.on_validation(state.step, loop.rt)
        improved = val["val/acc"] > state.best_val_acc
        state.best_val_acc = max(state.best_val_acc, val["val/acc"])
        if str(cfg.trainer.checkpoints) != "none":
            last = _save(loop, state, cfg, run_dir, num_classes, "last.pt")
            if improved and loop.rt.is_main and str(cfg.trainer.checkpoints) == "last+best":
                link_checkpoint(last, last.with_name("best.pt"))
    return val, None


def _interrupted(cfg: DictConfig, loop: Loop, state: TrainState, run_dir: Path, num_classes: int) -> StopTraining:
    """A signal: save ``last.pt`` (unless trainer.checkpoints=none) and say how to continue."""
    keep = str(cfg.trainer.checkpoints) != "none"
    path = _save(loop, state, cfg, run_dir, num_classes, "last.pt") if keep else None
    # every rank stopped after this same step; none exits (and makes torchrun end the
    # others) before rank 0 has written the checkpoint
    barrier(loop.rt)
    return StopTraining(
        f"interrupted at step {state.step}; checkpoint saved to {path}. Continue with "
        f"trainer.resume={path} (or trainer.resume=auto in the same run folder)." if keep else
        f"interrupted at step {state.step}; trainer.checkpoints=none, so nothing was saved and "
        f"this run cannot be resumed.", exit_code=130)


def _poisoned(loop: Loop, state: TrainState, val: dict[str, float] | None) -> StopTraining | None:
    """Non-finite weights, buffers (BatchNorm's running statistics), optimizer state or
    validation loss: the run stops, whatever trainer.on_nonfinite says (there is no update left
    to skip: the model itself is no longer finite), and nothing is saved."""
    bad = first_nonfinite(loop.model, loop.optimizer, loop.rt)
    loss = None if val is None else val.get("val/loss")
    if bad is None and (loss is None or math.isfinite(loss)):
        return None
    what = f"{bad} is not finite" if bad is not None else f"val/loss is {loss}"
    return StopTraining(f"non-finite values after step {state.step}: {what}, so the model is poisoned and the run "
                        f"stops (trainer.on_nonfinite=skip cannot skip this). Start a new run with a lower "
                        f"optim.lr or trainer.grad_clip set.", exit_code=3)


def _with_kept(stop: StopTraining, cfg: DictConfig, run_dir: Path) -> StopTraining:
    """A non-finite stop's message, completed with what it kept: the newest checkpoint on disk
    (every one written was checked finite), or nothing."""
    if stop.exit_code == 130:  # an interrupt says itself what it saved
        return stop
    path = newest_checkpoint(run_dir)
    if path is not None:
        step = load_checkpoint(path, mmap=True).get("state", {}).get("step")
        kept = f"the last good checkpoint, {shown(path)} (step {step}), is kept as it was"
    elif str(cfg.trainer.checkpoints) == "none":
        kept = "trainer.checkpoints=none, so no checkpoint was kept"
    else:
        kept = f"no checkpoint had been written in {shown(run_dir)} yet, so none was kept"
    return StopTraining(f"{stop} Stopped; {kept}.", stop.exit_code)


def _data_facts(cfg: DictConfig, train_ds: Any, val_ds: Any, num_classes: int, rt: Runtime) -> dict[str, int]:
    """What ``capsexp report`` needs to tell accuracy from chance: the class count and how many
    validation images each evaluation sees; and how many image files were skipped as unreadable
    (``data.on_bad_image=skip``; under DDP the largest count of any process)."""
    limit = cfg.trainer.limit_val_batches
    images = len(val_ds) if limit is None else \
        min(len(val_ds), int(limit) * int(cfg.data.batch_size) * rt.world_size)
    bad = torch.tensor([float(bad_image_count(train_ds, val_ds))], device=rt.device)
    return {"num_classes": num_classes, "val_images": images, "bad_images": int(all_reduce(bad, rt, "max").item())}


def _keep(state: TrainState, stats: EpochStats) -> None:
    """The epoch's timed part joins the run's throughput measurement."""
    state.timed_seconds += stats.seconds
    state.timed_images += stats.timed_images


def _throughput(state: TrainState) -> dict[str, float]:
    if state.timed_seconds <= 0:
        return {}
    return {"throughput/images_per_sec": state.timed_images / state.timed_seconds}


def _save(loop: Loop, state: TrainState, cfg: DictConfig, run_dir: Path, num_classes: int, name: str) -> Path:
    path = run_dir / "checkpoints" / name
    if not loop.rt.is_main:
        return path
    with loop.guard.protect():  # a second Ctrl-C waits for the file to be whole
        _write_checkpoint(loop, state, cfg, num_classes, path)
    return path


def _write_checkpoint(loop: Loop, state: TrainState, cfg: DictConfig, num_classes: int, path: Path) -> None:
    save_checkpoint({
        "model": loop.model.state_dict(),
        "criterion": loop.criterion.state_dict(),
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(),
        "scaler": loop.scaler.state_dict(),
        "state": state.as_dict(),
        "monitor": loop.monitor.state_dict(),
        "rng": torch.get_rng_state(),
        "num_classes": num_classes,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": environment(),
    }, path)


def restore(ckpt: dict[str, Any], loop: Loop, state: TrainState) -> None:
    """The checkpoint's states into the loop; a part that is missing or does not fit is one sentence."""
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("model", lambda: loop.model.load_state_dict(ckpt["model"])),
        ("criterion", lambda: loop.criterion.load_state_dict(ckpt["criterion"])),
        ("optimizer", lambda: loop.optimizer.load_state_dict(ckpt["optimizer"])),
        ("scheduler", lambda: loop.scheduler.load_state_dict(ckpt["scheduler"])),
        ("scaler", lambda: _load_scaler(loop, ckpt["scaler"])),
        ("state", lambda: state.__dict__.update(dict(ckpt["state"]))),
        ("monitor", lambda: loop.monitor.load_state_dict(ckpt.get("monitor", {}))),
        ("rng", lambda: torch.set_rng_state(ckpt["rng"]))]
    for part, step in steps:
        try:
            step()
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as exc:
            detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise UserError(f"trainer.resume: the checkpoint's {part} state is missing or does not fit this run "
                            f"({detail}); resume from another checkpoint, or start a new run.") from None


def _load_scaler(loop: Loop, saved: dict[str, Any]) -> None:
    if saved:  # empty when the checkpoint was made without fp16 loss scaling
        loop.scaler.load_state_dict(saved)


def _announce(cfg: DictConfig, run_dir: Path, loop: Loop, resumed: bool, state: TrainState) -> None:
    rt, model, monitor, logger = loop.rt, loop.model, loop.monitor, loop.logger
    resolved = write_run_record(run_dir, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = ", ".join(monitor.frozen) or "none"
    where = f"resumed at step {state.step}" if resumed else "new run"
    print(f"capsexp: {where} in {shown(run_dir)}\ncapsexp: device {rt.device} ({rt.precision}, world size "
          f"{rt.world_size}); head={_head(cfg)} adapter={cfg.adapter.name} loss={cfg.loss.name}; "
          f"{trainable / 1e6:.2f}M trainable parameters; frozen stages: {frozen}", flush=True)
    if cfg.backbone.reinit:
        print(f"capsexp: re-initialised {', '.join(cfg.backbone.reinit)} after loading backbone.weights="
              f"{cfg.backbone.weights} (torchvision's initialisation): backbone.reinit.", flush=True)
    if cfg.head.name == "capsule" and not routing_iterates(str(cfg.head.routing.name)):
        print(f"capsexp: head.routing.iterations does not apply to head.routing.name={cfg.head.routing.name} "
              f"(it routes once, by construction); the value {cfg.head.routing.iterations} is ignored.", flush=True)
    logger.text("config", "```\n" + resolved + "\n```", state.step)
    logger.text("frozen_stages", f"frozen stages (no gradient tags): {frozen}", state.step)
    logger.gradient_layout([s for s in model.stages() if s not in monitor.frozen])


def _head(cfg: DictConfig) -> str:
    """``fc``, ``fc(pool=max)``, ``capsule(routing=em, 3 iterations)``: the head as the start line names it."""
    if cfg.head.name == "capsule":
        name = str(cfg.head.routing.name)
        return f"capsule(routing={name}" + (f", {cfg.head.routing.iterations} iterations)" if routing_iterates(name) else ")")
    return "fc" if cfg.head.get("pool", "avg") == "avg" else f"fc(pool={cfg.head.pool})"


def _finish(cfg: DictConfig, run_dir: Path, loop: Loop, state: TrainState, val: dict[str, float],
            stop: StopTraining | None, data: dict[str, int]) -> dict[str, Any]:
    """metrics.json, the HParams entry, the gradient table in the terminal."""
    loop.monitor.finish(state.step)
    grads, messages = loop.monitor.summary(), loop.monitor.alarm_messages
    status = "completed" if stop is None else ("interrupted" if stop.exit_code == 130 else "failed")
    metrics: dict[str, Any] = {
        "val/acc": val.get("val/acc", float("nan")),
        "val/loss": val.get("val/loss", float("nan")),
        "best/val/acc": state.best_val_acc if state.best_val_acc > float("-inf") else float("nan"),
        "train/loss": state.last_train_loss,
        "steps": state.step,
        "epochs": state.epoch,
        "images_per_sec": _throughput(state).get("throughput/images_per_sec", float("nan")),
        "skipped_steps": state.skipped_steps,
        **data,
        **grads,
        **{f"alarm/{name}": messages.get(name) for name in ALARMS},
        "status": status,
    }
    if not loop.rt.is_main:
        return metrics
    swept = swept_keys_of_this_job()
    hparams = compared_hparams(flatten(OmegaConf.to_container(cfg, resolve=True)), swept)
    loop.logger.hparams(hparams, [*MARKED, *swept], summary_metrics(metrics), state.step)
    loop.logger.close()
    write_metrics(run_dir, metrics)
    print_summary(cfg, metrics)
    return metrics
