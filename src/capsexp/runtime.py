"""Everything device-specific in one place: device choice, precision, memory format, compile, DDP,
and the peak-memory probe ``capsexp bench`` reads.

The CUDA fast path (bf16/fp16 autocast, GradScaler, channels-last, cudnn.benchmark, compile) is
chosen here and nowhere else; bf16 autocast and channels-last also run on CPU, which is how the
tests exercise this path without a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Iterator, TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from capsexp.checks import Check, boolean, choice, one_of
from capsexp.errors import UserError

# ``trainer.precision``: name -> autocast dtype (None: fp32); auto is resolved per device
PRECISIONS: dict[str, torch.dtype | None] = {"auto": None, "fp32": None, "bf16": torch.bfloat16,
                                             "fp16": torch.float16}
CHECKS: list[Check] = [
    ("trainer.precision", choice(*PRECISIONS), one_of(PRECISIONS)),
    ("trainer.channels_last", choice("auto", True, False), "auto, true or false"),
    ("trainer.compile", boolean, "true or false"),
]


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None = fp32
    channels_last: bool
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self) -> ContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # only fp16 needs loss scaling; a disabled scaler is a no-op with the same interface
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def to_device(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        non_blocking = self.device.type == "cuda"  # with pinned memory the copy overlaps compute
        images = images.to(self.device, non_blocking=non_blocking, memory_format=fmt)
        return images, targets.to(self.device, non_blocking=non_blocking)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def peak_memory_mb(self) -> float:
        """CUDA peak allocated on GPU; the process's peak resident set size on CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class PeakMemory:
    """Peak memory in MB since ``start`` (or the last ``skip_warmup``): CUDA's peak allocated memory, or
    the process's peak resident set on a Linux CPU above where ``start`` found it; None where it cannot
    be measured (e.g. on mps)."""

    NOTES = {  # what the peak is, per device type, in words for a benchmark's reader
        "cuda": "torch.cuda.max_memory_allocated during the timed steps (peak reset after warm-up; model, "
                "optimizer state and activations, not cuDNN's algorithm search)",
        "cpu": "peak resident set size during the timed steps (Linux VmHWM, reset after warm-up through "
               "/proc/self/clear_refs) minus the resident size before the model was built",
    }

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base_kb = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu":
            try:  # hand freed heap back to the OS, so the baseline is what is held now
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
                self.base_kb = _status_kb("VmRSS")
            except OSError:
                self.base_kb = -1

    def skip_warmup(self) -> None:
        """Forget the peaks of the warm-up steps (cuDNN's algorithm search, compilation), keeping
        what they left allocated (model, optimizer state): the row reports a steady step."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu" and self.base_kb >= 0:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.base_kb = -1

    def peak_mb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.device.type != "cpu" or self.base_kb < 0:
            return None
        return max(_status_kb("VmHWM") - self.base_kb, 0) / 1024


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"trainer.device must be auto, cpu, cuda, cuda:N or mps; got '{name}'.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but no CUDA GPU is visible; use trainer.device=auto or cpu.")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def _resolve_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        if device.type != "cuda":
            return None  # CPU stays a correct fp32 path by default
        return torch.bfloat16 if _native_bf16() else torch.float16
    return PRECISIONS[precision]


def _native_bf16() -> bool:
    """bf16 in hardware (Ampere and newer). Older GPUs emulate it slowly: fp16 + scaler is faster."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.4 had no emulation to exclude
        return torch.cuda.is_bf16_supported()


def setup_runtime(trainer_cfg: Any) -> Runtime:
    """Resolve device and precision; join the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(str(trainer_cfg.device), local_rank)
    if world_size > 1 and device.type == "cuda" and device.index != local_rank:
        raise UserError(f"trainer.device={trainer_cfg.device} would put every process on one GPU; "
                        f"under torchrun use trainer.device=auto or cuda (each rank takes LOCAL_RANK's GPU).")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group, so NCCL binds this rank's GPU
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = _resolve_dtype(str(trainer_cfg.precision), device)
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("trainer.precision=fp16 needs a CUDA GPU; on CPU use fp32 or bf16.")
    cl = trainer_cfg.channels_last
    channels_last = device.type == "cuda" if str(cl) == "auto" else bool(cl)
    return Runtime(device, dtype, channels_last, rank, world_size, local_rank)


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def prepare_model(model: ModuleT, rt: Runtime, compile_model: bool
                  ) -> tuple[nn.Module, nn.Module, ModuleT]:
    """Move, format, wrap: returns ``(runnable, evaluator, bare)``.

    The bare model is what gets saved and inspected; the evaluator is the runnable without the
    DDP wrapper (evaluation needs no gradient synchronisation, and ranks may run different
    numbers of validation batches).
    """
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    runnable: nn.Module = model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # no device_ids: inputs are already on this rank's device (Runtime.to_device), and DDP
        # would otherwise also copy the step's CPU-side ``progress`` scalar to the GPU
        runnable = DistributedDataParallel(model, device_ids=None)
    # torch.compile of a Module returns an OptimizedModule; its stubs only promise a callable
    if compile_model:
        runnable = cast(nn.Module, torch.compile(runnable))
    evaluator = runnable
    if rt.distributed:
        evaluator = cast(nn.Module, torch.compile(model)) if compile_model else model
    return runnable, evaluator, model


def all_reduce_mean(value: Tensor, rt: Runtime) -> Tensor:
    if rt.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= rt.world_size
    return value


def all_reduce(value: Tensor, rt: Runtime, op: str = "sum") -> Tensor:
    """In place: the element-wise ``sum`` or ``max`` over all ranks (a no-op in one process)."""
    if rt.distributed:
        dist.all_reduce(value, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return value


def broadcast_buffers(module: nn.Module, rt: Runtime) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), as DDP does before each
    training forward: evaluation then measures the model rank 0 saves."""
    if rt.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier(rt: Runtime) -> None:
    """Wait for every rank (a no-op in one process)."""
    if rt.distributed:
        dist.barrier()


def teardown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


class SignalGuard:
    """SIGINT, SIGTERM and SIGHUP set a flag; the loop finishes the current step, checkpoints and
    stops. A second signal aborts at once, except while a checkpoint is being written
    (``protect``): then it takes effect when the file is complete."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._protected = False
        self._pending = False

    def __enter__(self) -> "SignalGuard":
        for sig in self.SIGNALS:
            if signal.getsignal(sig) is signal.SIG_IGN:  # ignored by whoever started capsexp (nohup: SIGHUP)
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some launchers): leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second Ctrl-C: the user really wants out now
            if self._protected:
                self._pending = True
                return
            raise KeyboardInterrupt
        self.received = signum
        print(f"\ncapsexp: received {signal.Signals(signum).name}; finishing this step and saving a "
              f"checkpoint (press Ctrl-C again to abort at once).", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def protect(self) -> Iterator[None]:
        """No abort inside: a checkpoint is written whole, then a pending second signal aborts."""
        self._protected = True
        try:
            yield
        finally:
            self._protected = False
        if self._pending:
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
