"""The training loop's contract: what a step needs (``Loop``), the trainer settings it reads
(``StepConfig``), the two Protocols it talks to (``Logger``, ``Monitor``), the counters a checkpoint
restores (``TrainState``) and what an epoch returns (``EpochStats``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from capsexp.models.classifier import Classifier
from capsexp.diagnostics.tensorboard import Logger  # noqa: F401 -- part of the loop's contract
from capsexp.models.heads import NOTHING, Measure
from capsexp.runtime import Runtime, SignalGuard


@dataclass(frozen=True)
class StepConfig:
    """The trainer settings a step and an epoch read (already validated)."""

    grad_clip: float | None
    on_nonfinite: str            # one of capsexp.engine.step.NONFINITE_POLICIES
    log_every_n_steps: int
    warmup_steps_excluded: int

    @classmethod
    def from_config(cls, trainer: Any) -> "StepConfig":
        clip = trainer.grad_clip
        return cls(None if clip is None else float(clip), str(trainer.on_nonfinite),
                   int(trainer.log_every_n_steps), int(trainer.warmup_steps_excluded))


class Monitor(Protocol):
    """Per-step diagnostics (``capsexp.diagnostics.monitor.GradientMonitor``); does work only at its
    intervals. ``NullMonitor`` stands in on ranks that do not log.

    ``step`` counts optimizer steps including the current one (the TensorBoard x-axis).
    """

    frozen: list[str]                   # stages without gradients (no gradient tags)
    alarm_messages: dict[str, str]      # the alarms that fired, by condition

    def before_forward(self, step: int) -> Measure: ...
    def watch(self, hops: dict[str, Tensor], scaler: torch.amp.GradScaler) -> None: ...
    def after_backward(self, step: int, grad_norms: dict[int, Tensor], total_norm: Tensor,
                       telemetry: dict[str, Tensor], images: dict[str, Tensor]) -> None: ...
    def after_update(self, step: int, updated: bool) -> None: ...
    def start(self, rt: Runtime) -> None: ...
    def on_validation(self, step: int, rt: Runtime) -> dict[str, float]: ...
    def finish(self, step: int) -> None: ...
    def summary(self) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NullMonitor:
    """The monitor of a rank that does not log: measures nothing, keeps nothing."""

    def __init__(self) -> None:
        self.frozen: list[str] = []
        self.alarm_messages: dict[str, str] = {}

    def before_forward(self, step: int) -> Measure:
        return NOTHING

    def watch(self, hops: dict[str, Tensor], scaler: torch.amp.GradScaler) -> None:
        pass

    def after_backward(self, step: int, grad_norms: dict[int, Tensor], total_norm: Tensor,
                       telemetry: dict[str, Tensor], images: dict[str, Tensor]) -> None:
        pass

    def after_update(self, step: int, updated: bool) -> None:
        pass

    def start(self, rt: Runtime) -> None:
        pass

    def on_validation(self, step: int, rt: Runtime) -> dict[str, float]:
        return {}

    def finish(self, step: int) -> None:
        pass

    def summary(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Lines(Protocol):
    """Progress as log lines (``capsexp.engine.console.ProgressLines``), or nothing (``NoLines``)."""

    def begin_epoch(self) -> None: ...
    def after_step(self, state: Any, images: int) -> None: ...
    def end_epoch(self, state: Any) -> None: ...


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


@dataclass
class Loop:
    """What one training step needs; built once by ``capsexp.engine.assembly.build_loop``."""

    objective: nn.Module                  # what runs (maybe DDP-wrapped, maybe compiled)
    model: Classifier                     # the bare model: stages, state dicts
    evaluator: nn.Module                  # the objective without the DDP wrapper
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    rt: Runtime
    config: StepConfig
    logger: Logger
    monitor: Monitor                      # a NullMonitor on ranks that do not log
    guard: SignalGuard
    total_steps: int
    show_progress: bool
    lines: Lines                          # progress as log lines, where no terminal shows the bar
    params: list[nn.Parameter] = field(default_factory=list)
    # set when every rank has agreed (in the per-step check) to stop after this step; the loop
    # acts on this, never on its own signal flag, so all ranks leave after the same step
    stop: bool = False

    def __post_init__(self) -> None:
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]


@dataclass(frozen=True)
class EpochStats:
    """What one call of ``train_one_epoch`` did: the caller logs and keeps it."""

    steps: int
    images: int
    seconds: float           # timed part only (after trainer.warmup_steps_excluded)
    timed_images: int
    train_loss: float        # the last logged window's mean loss (nan when none was logged)
