"""DDP on CPU with gloo, launched the documented way: ``torchrun --nproc_per_node=2 -m capsexp train``.

Two processes with ``data.batch_size=B`` must train exactly like one process with ``2B``: same
per-step losses (TensorBoard ``train/loss``, written by rank 0) and same final weights.

BatchNorm would break that equivalence (each rank normalises with its own half-batch
statistics), so these runs freeze the whole backbone (``backbone.freeze_depth=5`` keeps its
BatchNorm layers in eval mode) and use an adapter without batch statistics (GroupNorm, or none).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from capsexp.engine.assembly import seed_everything
from capsexp.rundir.checkpoint import load_checkpoint
from capsexp.models.classifier import build_model
from capsexp.data.shapes import SHAPES_CLASSES
from capsexp.train import train
from conftest import TINY, cli_env, make_cfg

BATCH = 4  # per process; the single-process reference uses 2 x BATCH
# SGD: its update is linear in the gradient, so the two runs' float rounding differences stay at
# rounding level (Adam divides by sqrt(v) + 1e-8 and magnifies them in near-zero gradients)
# 15 validation images: rank 0 gets 8, rank 1 gets 7 (no padding, so no image counts twice)
COMMON = ["data.train_size=32", "data.val_size=15", "trainer.max_steps=6", "trainer.max_epochs=2", "backbone.freeze_depth=5",
          "trainer.precision=fp32", "grads.figure_every_n_steps=0", "optim=sgd"]
CASES = {
    "fc": ["head=fc", "adapter=conv", "adapter.norm=group", "adapter.width=64"],
    "capsule": ["head=capsule", "adapter=none", "head.primary.types=8"],
    # another routing, with its own loss (ce); self and EM routing normalise their primary capsules
    # with BatchNorm, whose batch statistics differ between one batch and two halves by design
    "capsule-attention": ["head=capsule", "adapter=none", "head.primary.types=8", "head.routing.name=attention"],
}


def free_port() -> int:
    """A port the OS just handed out on the loopback interface (the rendezvous port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(overrides: list[str]) -> list[str]:
    """``torchrun --nproc_per_node=2 -m capsexp train ...`` on loopback, as the README shows it."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "-m", "capsexp", "train", *overrides]


def torchrun(overrides: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(overrides), cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=300)


# How far float reordering can move the final weights, relative to how far training moved them.
# The two processes add the same per-sample gradients in another order (two half-batch sums, then
# the all-reduce) and run their kernels on half the batch: a reordered K-term float32 sum moves by
# about sqrt(K) * u relative (u = 2**-24; K up to the 2048-wide feature sums: ~3e-6; the bound
# (K - 1) * u ~ 1e-4 needs every rounding to err the same way). Over the run an error in the update
# grows up to ~16x here (a 1% larger lr moves the final weights by 2-16% of their change), so
# reordering should stay near 5e-5 of ||w_single - w_init||; measured: 3e-6 (fc), 0 (capsule).
# 1e-3 leaves a 20x margin over that and still rejects a 1% error in every update (the planted
# fault below); skipped gradient averaging (a 2x step), a lost shard or another seed are far
# larger. The change is the scale, not the weights' size: a tolerance on the weights themselves
# would pass a run that barely trained.
WEIGHT_RTOL = 1e-3


def initial_weights(cfg: DictConfig) -> dict[str, torch.Tensor]:
    """The weights ``train(cfg)`` starts from: it seeds, then builds the model (data draws no torch numbers)."""
    seed_everything(int(cfg.seed))
    return build_model(cfg, len(SHAPES_CLASSES)).state_dict()


def change_and_floor(want: torch.Tensor, init: torch.Tensor) -> tuple[float, float]:
    """``||want - init||`` and the rounding floor ``eps * ||want||``: a change of the weights far below
    their size still moves some of them by one float32 step (2u |w|) when it is added, however small."""
    return (want.double() - init.double()).norm().item(), torch.finfo(torch.float32).eps * want.double().norm().item()


def weight_mismatches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                      init: dict[str, torch.Tensor]) -> dict[str, float]:
    """Tensors with ||got - want|| > WEIGHT_RTOL * ||want - init|| + the rounding floor, mapped to
    how many times over; integer tensors (BatchNorm counters) must be equal."""
    out = {}
    for key, ref in want.items():
        if not ref.is_floating_point():
            if not torch.equal(got[key], ref):
                out[key] = float("inf")
            continue
        change, floor = change_and_floor(ref, init[key])
        diff, allowed = (got[key].double() - ref.double()).norm().item(), WEIGHT_RTOL * change + floor
        if diff > allowed:
            out[key] = diff / allowed if allowed > 0 else float("inf")
    return out


def losses(run_dir: Path) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("train/loss")]


@pytest.mark.slow
@pytest.mark.parametrize("head", list(CASES))
def test_two_processes_train_like_one_with_twice_the_batch(head: str, tmp_path: Path) -> None:
    overrides = [*TINY, *COMMON, *CASES[head]]
    ddp_dir = tmp_path / "ddp"
    # every rank must name the same run folder: Hydra's default folder name holds the start time
    done = torchrun([*overrides, f"data.batch_size={BATCH}", f"hydra.run.dir={ddp_dir}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("capsexp: new run") == 1  # rank 0 alone announces, logs and saves
    assert "world size 2" in done.stdout
    assert len(list(ddp_dir.glob("events.out.tfevents.*"))) == 1
    # Hydra's own files (.hydra/, the job log) aside, the run folder holds one run's outputs
    assert sorted(p.name for p in ddp_dir.iterdir() if not p.name.startswith((".", "events.out.tfevents."))
                  and p.suffix != ".log") == ["checkpoints", "config.yaml", "environment.json", "metrics.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]  # no rank wrote anywhere else

    single_dir, faulty_dir = tmp_path / "single", tmp_path / "faulty"
    single_cfg = make_cfg(*COMMON, *CASES[head], f"data.batch_size={2 * BATCH}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1): same summation order
    try:
        single = train(single_cfg, run_dir=single_dir)
        # the planted fault: every update 1% too large
        faulty_metrics = train(make_cfg(*COMMON, *CASES[head], f"data.batch_size={2 * BATCH}",
                                        f"optim.lr={float(single_cfg.optim.lr) * 1.01}"), run_dir=faulty_dir)
        init = initial_weights(single_cfg)
    finally:
        torch.set_num_threads(threads)

    # rank 0 measures the all-reduced gradients: the same statistics as the one-process run
    ddp = json.loads((ddp_dir / "metrics.json").read_text())
    stats = [k for k in single if k.startswith("grad_norm/")]
    assert stats and ddp["steps"] == single["steps"] == 6
    for key in stats:  # float reordering: measured up to 4.3e-4 (fc, conv adapter with GroupNorm) on some CPUs
        assert ddp[key] == pytest.approx(single[key], rel=1e-3), key
    # the update ratios too: rank 0 measures the step every rank took (the same all-reduced update)
    updates = [k for k in single if k.startswith("update_to_weight/")]
    assert updates and {k for k in ddp if k.startswith("update_to_weight/")} == set(updates)
    for key in updates:
        assert ddp[key] == pytest.approx(single[key], rel=1e-3), key
    # and that bound tells a 1% larger step apart
    assert faulty_metrics["update_to_weight/head"] != pytest.approx(single["update_to_weight/head"], rel=1e-3)
    # validation over both ranks' unequal shards is validation over the whole set: the accuracy
    # exactly; the loss to the weights' own agreement after 6 steps (the gradients agree to 1e-4,
    # a shard counted twice or left out would be off by percents)
    for key in ("val/acc", "best/val/acc"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key
    assert ddp["val/loss"] == pytest.approx(single["val/loss"], rel=1e-4), "val/loss"

    ddp_losses, single_losses = losses(ddp_dir), losses(single_dir)
    assert [s for s, _ in ddp_losses] == [s for s, _ in single_losses] == list(range(1, 7))
    # the reordering moves a loss by up to 2e-5 relative on some CPUs (measured: fc, step 6)
    assert torch.allclose(torch.tensor([v for _, v in ddp_losses]), torch.tensor([v for _, v in single_losses]),
                          rtol=1e-4, atol=1e-6)
    ddp_weights = load_checkpoint(ddp_dir / "checkpoints" / "last.pt")["model"]
    single_weights = load_checkpoint(single_dir / "checkpoints" / "last.pt")["model"]
    faulty_weights = load_checkpoint(faulty_dir / "checkpoints" / "last.pt")["model"]
    assert ddp_weights.keys() == single_weights.keys() == init.keys()
    moved = {k for k, v in single_weights.items() if not torch.equal(v, init[k])}
    backbone = [k for k in init if k.startswith("backbone.")]
    assert moved and backbone and not moved & set(backbone)  # frozen, so init is where training started
    assert weight_mismatches(ddp_weights, single_weights, init) == {}
    # the criterion sees a real divergence: it rejects the faulty run, in every tensor whose change
    # is large enough for the relative bound to count (not only at the rounding floor)
    rejected = set(weight_mismatches(faulty_weights, single_weights, init))
    scales = {k: change_and_floor(single_weights[k], init[k]) for k in moved}
    resolvable = {k for k, (change, floor) in scales.items() if WEIGHT_RTOL * change > floor}
    assert rejected and resolvable <= rejected <= moved, (rejected, resolvable)


def _worker_of_rank(launcher_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker process with ``RANK=rank`` (read from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker processes through /proc")
def test_a_signal_to_one_process_stops_every_process_after_the_same_step(tmp_path: Path) -> None:
    import signal
    import time

    run = tmp_path / "run"
    overrides = [*TINY, *COMMON, *CASES["fc"], "trainer.max_steps=10000", "trainer.max_epochs=1000",
                 f"data.batch_size={BATCH}", f"hydra.run.dir={run}"]
    proc = subprocess.Popen(torchrun_command(overrides), cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "last.pt").exists():  # the first epoch is done
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        worker = _worker_of_rank(proc.pid, 1)
        assert worker is not None
        os.kill(worker, signal.SIGTERM)  # rank 1 only, as when signals reach the processes one by one
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # torchrun starts each worker in a session of its own
            workers = [_worker_of_rank(proc.pid, rank) for rank in (0, 1)]
            for pid in [w for w in workers if w is not None] + [proc.pid]:
                os.kill(pid, signal.SIGKILL)
            proc.wait()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "interrupted", err[-3000:]
    assert f"interrupted at step {metrics['steps']}; checkpoint saved" in err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == metrics["steps"]


@pytest.mark.slow
def test_validation_under_ddp_measures_the_model_rank_0_saves(tmp_path: Path) -> None:
    """BatchNorm trains here, so each rank's running statistics drift apart on its own batches;
    evaluation must use rank 0's (those in the checkpoint) on every rank."""
    from omegaconf import OmegaConf

    from capsexp.data.datasets import build_datasets, build_loaders
    from capsexp.engine.step import evaluate
    from capsexp.models.objective import Objective
    from capsexp.models.losses import build_loss
    from capsexp.models.classifier import build_model
    from capsexp.runtime import setup_runtime

    run = tmp_path / "run"
    overrides = [*TINY, "data.train_size=32", "data.val_size=15", "trainer.max_steps=4", "backbone.freeze_depth=3",
                 "trainer.precision=fp32", "grads.figure_every_n_steps=0", "optim=sgd", "head=fc",
                 f"data.batch_size={BATCH}", f"hydra.run.dir={run}"]
    done = torchrun(overrides, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    cfg = OmegaConf.create(ckpt["config"])
    train_ds, val_ds, classes = build_datasets(cfg.data, seed=int(cfg.seed))
    model = build_model(cfg, classes)
    model.load_state_dict(ckpt["model"])
    objective = Objective(model, build_loss(cfg.loss))
    val_loader = build_loaders(cfg.data, train_ds, val_ds, seed=int(cfg.seed))[1]
    single = evaluate(objective, val_loader, setup_runtime(cfg.trainer), None, show_progress=False)
    assert metrics["val/loss"] == pytest.approx(single["val/loss"], rel=1e-5)
    assert metrics["val/acc"] == pytest.approx(single["val/acc"], abs=1e-6)
