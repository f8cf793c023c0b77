"""The device fast path exercised on CPU: bf16 autocast, channels-last, compile, loader workers, host syncs.

bf16 autocast and channels-last run on CPU too, so these tiny runs go through the same
``Runtime`` code a GPU run uses. Host syncs are counted by intercepting every read of a tensor
value on the host (``item``/``bool``/``float`` dispatch ``aten._local_scalar_dense``;
``tolist``/``numpy`` are wrapped) while ``engine.train_step`` runs.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import traceback
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils._python_dispatch import TorchDispatchMode

import capsexp.engine.step as engine
from capsexp.errors import UserError
from capsexp.engine.loop import Loop, StopTraining, TrainState
from capsexp.runtime import resolve_device, setup_runtime
from capsexp.train import train
from conftest import make_cfg

# a short run: 3 steps, diagnostics and loss logging on step 2 only, backward through layer4 and up
QUICK = ["trainer.max_steps=3", "data.val_size=8", "trainer.limit_val_batches=1", "backbone.freeze_depth=4",
         "trainer.log_every_n_steps=2", "grads.log_every_n_steps=2", "grads.figure_every_n_steps=0"]
SRC = str(Path(engine.__file__).parents[1])


pytestmark = pytest.mark.usefixtures("one_thread")


def _site() -> str | None:
    """``module.function`` of the innermost capsexp frame; None for reads that stay on the host on a GPU."""
    stack = traceback.extract_stack()
    # Adam(W) reads its step count with item(): a CPU tensor on every device (capturable=False)
    if any(f.name == "_get_value" and f"torch{os.sep}optim" in f.filename for f in stack):
        return None
    for frame in reversed(stack):
        if frame.filename.startswith(SRC):
            # CPU's one_hot checks its class indices on the host; CUDA's leaves that to device asserts
            if "one_hot(" in (frame.line or ""):
                return None
            return f"{Path(frame.filename).stem}.{frame.name}"
    return "outside capsexp"


def scalar_tags(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class HostReads(TorchDispatchMode):
    """Records where tensor values are read on the host (on a GPU each is a device sync)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func.overloadpacket is torch.ops.aten._local_scalar_dense:
            self._record()
        return func(*args, **(kwargs or {}))

    def _record(self) -> None:
        site = _site()
        if site is not None:
            self.sites.append(site)

    def wrap(self, method: Any) -> Any:
        @functools.wraps(method)
        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self._record()
            return method(tensor, *args, **kwargs)
        return read


def recording_step(monkeypatch: pytest.MonkeyPatch, log: list[dict[str, Any]]) -> None:
    """Wrap ``engine.train_step`` (looked up by name in the epoch loop) to record each step."""
    real = engine.train_step

    def step(loop: Loop, images: torch.Tensor, targets: torch.Tensor, state: TrainState) -> Any:
        reads = HostReads()
        with monkeypatch.context() as patch, reads:
            for name in ("tolist", "numpy"):
                patch.setattr(torch.Tensor, name, reads.wrap(getattr(torch.Tensor, name)))
            out = real(loop, images, targets, state)
        log.append({"step": state.step + 1, "sites": reads.sites, "precision": loop.rt.precision,
                    "channels_last": loop.model.backbone.conv1.weight.is_contiguous(
                        memory_format=torch.channels_last)})
        return out

    monkeypatch.setattr(engine, "train_step", step)


@pytest.fixture(scope="module", params=["fc", "capsule"])
def bf16_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[str, Path, dict, list]]:
    head, log = request.param, []
    run_dir = tmp_path_factory.mktemp(f"bf16_{head}")
    with pytest.MonkeyPatch.context() as patch:
        recording_step(patch, log)
        metrics = train(make_cfg(f"head={head}", "trainer.precision=bf16", "trainer.channels_last=true",
                                 *QUICK), run_dir=run_dir)
    yield head, run_dir, metrics, log


def test_bf16_channels_last_trains_with_finite_losses_and_gradient_stats(bf16_run: tuple) -> None:
    head, run_dir, metrics, log = bf16_run
    assert [entry["precision"] for entry in log] == ["bf16"] * 3 and all(e["channels_last"] for e in log)
    tags = scalar_tags(run_dir)
    assert tags["train/loss"] and all(math.isfinite(v) for _, v in tags["train/loss"])
    assert {"grad_norm/layer4", "grad_norm/head", "grad_norm/total"} <= set(tags)
    grads = {k: v for k, v in metrics.items() if k.startswith("grad_norm/")}
    assert grads and all(math.isfinite(v) and v > 0 for v in grads.values()), grads
    assert metrics["status"] == "completed" and math.isfinite(metrics["val/loss"])


def test_a_step_syncs_once_and_a_diagnostics_step_once_more_per_measurement(bf16_run: tuple) -> None:
    head, _, _, log = bf16_run
    by_step = {e["step"]: e["sites"] for e in log}
    # steps 1 and 3: one read, the same one each step (the documented non-finite check), in capsexp
    assert len(by_step[1]) == 1 and by_step[3] == by_step[1] and by_step[1] != ["outside capsexp"]
    # step 2 (a logging step): that read, then the gradient statistics in one transfer, the update
    # ratios (with the features gradient) in one more after the step, and the capsule head's
    # telemetry in one more; each from its own place, none repeated
    extra = list(by_step[2])
    assert by_step[1][0] in extra
    extra.remove(by_step[1][0])
    assert len(extra) == (3 if head == "capsule" else 2), by_step[2]
    assert len(set(extra)) == len(extra) and by_step[1][0] not in extra and "outside capsexp" not in extra


def test_auto_precision_on_cpu_is_fp32() -> None:
    rt = setup_runtime(make_cfg("trainer.device=cpu", "trainer.precision=auto").trainer)
    assert rt.dtype is None and rt.precision == "fp32" and not rt.channels_last
    assert not rt.grad_scaler().is_enabled()
    bf16 = setup_runtime(make_cfg("trainer.device=cpu", "trainer.precision=bf16").trainer)
    assert bf16.dtype == torch.bfloat16 and not bf16.grad_scaler().is_enabled()


def test_fp16_on_cpu_is_one_clear_sentence(tmp_path: Path) -> None:
    message = "trainer.precision=fp16 needs a CUDA GPU; on CPU use fp32 or bf16."
    with pytest.raises(UserError) as caught:
        setup_runtime(make_cfg("trainer.device=cpu", "trainer.precision=fp16").trainer)
    assert str(caught.value) == message
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):  # before any data or weights
        train(make_cfg("trainer.device=cpu", "trainer.precision=fp16"), run_dir=tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_each_rank_gets_the_gpu_of_its_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", 1) == torch.device("cuda", 1)
    assert resolve_device("cuda", 1) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", 1) == torch.device("cuda", 0)  # an explicit index wins
    assert resolve_device("cpu", 1) == torch.device("cpu")


def test_one_gpu_index_for_every_rank_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match=r"trainer.device=cuda:0 would put every process on one GPU"):
        setup_runtime(make_cfg("trainer.device=cuda:0").trainer)


# the capsule head with the spread loss has the most to recompile (its telemetry graph, a progress
# value that changes every step); the plain FC head runs with the longer runs
@pytest.mark.parametrize("head, loss", [pytest.param("fc", "ce", marks=pytest.mark.slow), ("capsule", "spread")])
def test_compile_trains_and_never_recompiles_after_the_first_step(
        head: str, loss: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # inductor needs minutes of C++ compilation on a 2-core machine; aot_eager traces the same
    # graphs (forward and backward through AOTAutograd) without generating code
    compiled: list[int] = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        compiled.append(len(gm.graph.nodes))
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting))
    after_step: list[int] = []  # graphs compiled so far, after each training step
    real = engine.train_step

    def step(*args: Any) -> Any:
        out = real(*args)
        after_step.append(len(compiled))
        return out

    monkeypatch.setattr(engine, "train_step", step)
    # the spread loss reads the training progress, a new value at every step
    metrics = train(make_cfg(f"head={head}", f"loss={loss}", "trainer.compile=true", *QUICK,
                             "backbone.freeze_depth=5", "trainer.max_steps=6"), run_dir=tmp_path)
    torch._dynamo.reset()
    assert metrics["status"] == "completed" and math.isfinite(metrics["train/loss"])
    assert all(math.isfinite(v) for k, v in metrics.items() if k.startswith("grad_norm/"))
    # compiled in step 1; a logging step (every 2nd) asks the head for its telemetry, a graph of its
    # own, compiled at the first one (2) and the plain step's resumed pieces once more after it (3);
    # from then on, logging steps and plain steps alike reuse what was compiled
    assert after_step[0] > 0 and after_step[3:] == [after_step[2]] * 3, after_step


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++")),
                    reason="inductor compiles C++ kernels on CPU and no C++ compiler was found")
def test_inductor_compile_trains(tmp_path: Path) -> None:
    # the real default backend, once: about 30 s of kernel compilation on 2 cores
    torch._dynamo.reset()
    metrics = train(make_cfg("head=fc", "trainer.compile=true", *QUICK, "backbone.freeze_depth=5"),
                    run_dir=tmp_path)
    torch._dynamo.reset()
    assert metrics["status"] == "completed" and math.isfinite(metrics["train/loss"])


def test_loader_workers_persist_across_epochs(tmp_path: Path) -> None:
    metrics = train(make_cfg("data.num_workers=1", "data.train_size=16", "trainer.max_epochs=2",
                             "trainer.max_steps=4", *QUICK[1:]), run_dir=tmp_path)
    assert metrics["steps"] == 4 and metrics["epochs"] == 2
    assert math.isfinite(metrics["train/loss"])


def _scaled_loop(tmp_path: Path) -> Loop:
    """A real loop with an enabled GradScaler: the fp16 update path, on the CPU."""
    from capsexp.engine.assembly import build_loop

    cfg = make_cfg("head=fc", "backbone.freeze_depth=4", "grads.enabled=false", "optim.warmup_steps=0")
    rt = setup_runtime(cfg.trainer)
    loop = build_loop(cfg, rt, 8, 10, tmp_path / "tb", show_progress=False)
    loop.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    return loop


def test_scaled_update_path_syncs_once_and_overflow_skips_update_and_schedule(tmp_path: Path) -> None:
    loop = _scaled_loop(tmp_path)
    state = TrainState()
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    weight = loop.model.head.fc.weight

    def step() -> tuple[Any, list[str]]:
        reads = HostReads()
        with pytest.MonkeyPatch.context() as patch, reads:
            patch.setattr(torch.Tensor, "tolist", reads.wrap(torch.Tensor.tolist))
            out = engine.train_step(loop, images, targets, state)
        state.step += 1
        return out, reads.sites

    before = weight.detach().clone()
    (loss, correct, n), flags = step()
    assert len(flags) == 1 and flags != ["outside capsexp"] and n == 4 and torch.isfinite(loss)
    assert not torch.equal(weight, before) and loop.scheduler.last_epoch == 1
    assert loop.scaler.get_scale() == 2.0**10

    # an overflow: the scaled gradient of the head turns infinite
    handle = weight.register_hook(lambda grad: grad * float("inf"))
    before = weight.detach().clone()
    (loss, correct, n), sites = step()
    handle.remove()
    # the flags, and on an overflow step only, the new scale (to tell overflow from a real fault):
    # one more read, from somewhere else
    assert len(sites) == 2 and sites[0] == flags[0] and sites[1] not in (flags[0], "outside capsexp")
    assert n == 0 and float(loss) == 0.0
    assert torch.equal(weight, before), "an overflow step must not update the weights"
    assert loop.scheduler.last_epoch == 1, "nor advance the learning-rate schedule"
    assert loop.scaler.get_scale() == 2.0**9 and state.skipped_steps == 1

    (loss, correct, n), _ = step()  # and training goes on at the smaller scale
    assert n == 4 and not torch.equal(weight, before) and loop.scheduler.last_epoch == 2


def test_a_checkpoint_without_loss_scaling_resumes_under_a_scaler(tmp_path: Path) -> None:
    """fp32/bf16 checkpoints hold an empty scaler state; resuming them with fp16 starts a fresh scale."""
    from capsexp.rundir.checkpoint import load_checkpoint
    from capsexp.train import restore

    train(make_cfg("head=fc", "backbone.freeze_depth=4", "trainer.max_steps=2", "grads.enabled=false",
                   "optim.warmup_steps=0"),
          run_dir=tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["scaler"] == {}
    loop, state = _scaled_loop(tmp_path), TrainState()
    restore(ckpt, loop, state)
    assert state.step == 2 and loop.scaler.get_scale() == 2.0**10
    assert torch.equal(loop.model.head.fc.weight, ckpt["model"]["head.fc.weight"])


def test_gradients_that_overflow_at_any_scale_stop_the_run(tmp_path: Path) -> None:
    loop = _scaled_loop(tmp_path)
    loop.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**-12)
    loop.model.head.fc.weight.register_hook(lambda grad: grad * float("inf"))  # every step
    state = TrainState()
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    engine.train_step(loop, images, targets, state)  # 2^-12 -> 2^-13: still an overflow step
    state.step += 1
    with pytest.raises(StopTraining, match=r"fp16 loss scale fell below 0.0001 at step 2") as caught:
        engine.train_step(loop, images, targets, state)  # 2^-14 < 1e-4
    assert caught.value.exit_code == 3 and state.skipped_steps == 2


def test_a_logging_step_reads_the_gradients_once_for_their_norms(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from capsexp.engine.assembly import build_loop

    cfg = make_cfg("head=fc", "backbone.freeze_depth=4", "grads.log_every_n_steps=1", "grads.figure_every_n_steps=0")
    loop = build_loop(cfg, setup_runtime(cfg.trainer), 8, 10, tmp_path / "tb", show_progress=False)
    gradients: list[int] = []  # calls of the batched L2 norm over gradient tensors
    real = torch._foreach_norm

    def counting(tensors: Any, *args: Any, **kwargs: Any) -> Any:
        grads = {id(p.grad) for p in loop.params if p.grad is not None}
        ord_ = args[0] if args else kwargs.get("ord", 2)
        if ord_ == 2 and any(id(t) in grads for t in tensors):
            gradients.append(len(tensors))
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", counting)
    try:
        engine.train_step(loop, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), TrainState())
    finally:
        loop.logger.close()  # its writer thread must finish before the test's folder goes
    assert "grad_norm/head" in loop.monitor.summary()  # it was a logging step, statistics taken
    assert gradients == [len([p for p in loop.params if p.grad is not None])]
