"""Every routing and every FC pooling trains end to end through ``train(cfg)``, writes the diagnostics,
resumes bit for bit, and compares in one sweep and one report."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from capsexp.errors import UserError
from capsexp.models.heads import POOLS
from capsexp.models.routing import ROUTINGS
from capsexp.rundir.checkpoint import load_checkpoint
from capsexp.train import train
from conftest import make_cfg, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

# every step logged, no figures: a short run that still writes every diagnostic
QUICK = ["head=capsule", "adapter=conv", "optim.scheduler=constant", "optim.warmup_steps=0",
         "grads.figure_every_n_steps=0", "data.train_size=32", "data.val_size=8", "grads.probe.images=8"]


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# three runs per routing: the default routing in the quick suite, the others with the longer runs
@pytest.mark.parametrize("routing", [r if r == "dynamic" else pytest.param(r, marks=pytest.mark.slow)
                                     for r in ROUTINGS])
def test_each_routing_trains_writes_every_diagnostic_and_resumes_bit_for_bit(routing: str, tmp_path: Path) -> None:
    args = [*QUICK, f"head.routing.name={routing}", "trainer.max_epochs=2"]
    if ROUTINGS[routing].default_loss == "spread":
        # the spread margin anneals over the run's length, so a shorter first leg would be another
        # run: a constant margin makes the two legs the same run
        args += ["loss=spread", "loss.m_end=0.2"]
    straight = tmp_path / "straight"
    metrics = train(make_cfg(*args, "trainer.max_steps=6"), run_dir=straight)
    assert metrics["status"] == "completed" and math.isfinite(metrics["train/loss"])
    tags = scalars(straight)
    for tag in ("grad_norm/head", "grad_norm/stem", "update_to_weight/head", "grad_norm/features", "drift/head",
                "capsule/coupling_entropy/iter1", "capsule/true_class_length", "val/acc", "grad_ladder/scores",
                "grad_ladder/features", "routing/entropy_deficit", "routing/change", "probe/layer4"):
        assert tag in tags, (routing, tag)
    # the head's own loss, as the registry says
    assert load_checkpoint(straight / "checkpoints" / "last.pt")["config"]["loss"]["name"] == \
        ROUTINGS[routing].default_loss
    # stopped after step 4 (inside the second epoch), then resumed to 6: the same steps, bit for bit
    first = tmp_path / "first"
    train(make_cfg(*args, "trainer.max_steps=4"), run_dir=first)
    resumed = tmp_path / "resumed"
    train(make_cfg(*args, "trainer.max_steps=6", f"trainer.resume={first / 'checkpoints' / 'last.pt'}"),
          run_dir=resumed)
    a = load_checkpoint(straight / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(resumed / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), routing
    assert scalars(resumed)["train/loss"] == tags["train/loss"][-len(scalars(resumed)["train/loss"]):]


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_each_routing_trains_under_bf16_autocast_and_routes_in_float32(routing: str, tmp_path: Path) -> None:
    metrics = train(make_cfg(*QUICK, f"head.routing.name={routing}", "trainer.precision=bf16",
                             "trainer.max_steps=2"), run_dir=tmp_path / "run")
    assert metrics["status"] == "completed" and math.isfinite(metrics["train/loss"])
    assert all(math.isfinite(v) for k, v in metrics.items() if k.startswith(("grad_norm/", "routing/")))


@pytest.mark.slow
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_each_routing_trains_on_the_7x7_map_of_224_px(routing: str, tmp_path: Path) -> None:
    """1568 input capsules (32 types x 7 x 7), as the seed's ResNet50 at 224 px gives."""
    metrics = train(make_cfg(*QUICK, f"head.routing.name={routing}", "data.image_size=224", "data.batch_size=2",
                             "data.train_size=4", "data.val_size=2", "trainer.max_steps=2",
                             "grads.drift.probe_images=2"), run_dir=tmp_path / "run")
    assert metrics["status"] == "completed" and math.isfinite(metrics["train/loss"])
    assert all(math.isfinite(metrics[f"grad_norm/{s}"]) for s in ("stem", "head"))


@pytest.mark.parametrize("pool", [p for p in POOLS if p != "avg"])
def test_each_fc_pooling_trains(pool: str, tmp_path: Path) -> None:
    metrics = train(make_cfg("head=fc", f"head.pool={pool}", "data.image_size=64"), run_dir=tmp_path / "run")
    assert metrics["status"] == "completed" and metrics["grad_norm/head"] > 0


@pytest.mark.parametrize("routing", ["dynamic", "attention"])
def test_one_iteration_is_uniform_coupling(routing: str, tmp_path: Path) -> None:
    metrics = train(make_cfg(*QUICK, f"head.routing.name={routing}", "head.routing.iterations=1",
                             "trainer.max_steps=2"), run_dir=tmp_path / "run")
    entropy = [v for _, v in scalars(tmp_path / "run")["capsule/coupling_entropy/iter1"]]
    assert metrics["num_classes"] == 8 and entropy == pytest.approx([math.log(8)] * len(entropy), abs=1e-6)


def test_a_loss_that_cannot_take_the_routing_score_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        train(make_cfg(*QUICK, "head.routing.name=attention", "loss=margin"), run_dir=tmp_path / "run")
    assert str(err.value) == ("loss=margin cannot take head.routing.name=attention's class scores (logits); use "
                              "loss=ce, or leave loss out for its default, loss=ce.")
    assert not (tmp_path / "run").exists()


def test_the_old_reconstruction_key_names_the_new_one(tmp_path: Path) -> None:
    proc = run_cli("train", "loss.reconstruction_weight=0.5", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("capsexp: error: loss.reconstruction_weight is now head.decoder.weight, an option "
                                   "of head=capsule: write head=capsule head.decoder.weight=0.5.")


@pytest.mark.slow
def test_one_sweep_over_every_routing_and_pooling_gives_one_report(tmp_path: Path) -> None:
    """The sweep the README shows: four routings with the default config unchanged (self ignores
    the iterations and says so), then one report table with a routing column."""
    tiny = ["backbone=resnet18", "data.image_size=32", "data.train_size=16", "data.val_size=8", "data.batch_size=8",
            "trainer.max_steps=2", "trainer.progress=false", "grads.figure_every_n_steps=0"]
    heads = tmp_path / "heads"
    proc = run_cli("train", "-m", "head=capsule", "adapter=conv", "head.routing.name=dynamic,attention,self,em",
                   *tiny, f"hydra.sweep.dir={heads / 'routings'}", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "head.routing.iterations does not apply to head.routing.name=self" in proc.stdout
    proc = run_cli("train", "-m", "head=fc", "head.pool=avg,max,flatten", *tiny, f"hydra.sweep.dir={heads / 'fc'}",
                   cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one report over both sweeps: one table, a routing column
    proc = run_cli("report", str(heads), cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.splitlines()[0].split()[:2] == ["run", "routing"]
    with (heads / "report.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["routing"] for r in rows) == ["(fc avg)", "(fc flatten)", "(fc max)", "attention-r3",
                                                  "dynamic-r3", "em-r3", "self"]


def test_a_single_self_routing_run_is_named_without_iterations(tmp_path: Path) -> None:
    proc = run_cli("train", "head=capsule", "head.routing.name=self", "backbone=resnet18", "data.image_size=32",
                   "data.train_size=8", "data.val_size=8", "data.batch_size=8", "trainer.max_steps=1",
                   "trainer.progress=false", "grads.figure_every_n_steps=0", "grads.drift.probe_images=0",
                   "grads.probe.images=0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folders = [p.name for p in (tmp_path / "outputs" / "runs").glob("*/*")]
    assert len(folders) == 1 and folders[0].endswith("_capsule-none-self-resnet18"), folders
    assert "head=capsule(routing=self) adapter=none loss=ce" in proc.stdout
    assert "head.routing.iterations does not apply to head.routing.name=self" in proc.stdout
