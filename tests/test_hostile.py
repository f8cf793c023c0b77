"""The hostile-input battery: every case runs the real command on real files and folders, and must end
with exit code 2, one sentence naming the key or file (the last line on stderr), no traceback, and
every folder as it was. docs/troubleshooting.md lists its classes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, run_cli
from test_untrusted import digest

Setup = Callable[[Path], None]


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]           # "{tmp}" stands for the case's folder
    says: str                       # the start of the one sentence after "capsexp: error: "
    setup: Setup | None = None
    code: int = 2
    env: dict[str, str] = field(default_factory=dict)


def images(root: Path, classes: tuple[str, ...] = ("a", "b"), count: int = 4) -> None:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def with_file(rel: str, content: bytes | str) -> Setup:
    def make(tmp: Path) -> None:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return make


def capsexp_run(rel: str = "run") -> Setup:
    """A finished run folder, as capsexp leaves one (no checkpoint)."""
    def make(tmp: Path) -> None:
        with_file(f"{rel}/environment.json", json.dumps({"capsexp": "0.1.0"}))(tmp)
        with_file(f"{rel}/config.yaml", "seed: 0\n")(tmp)
        with_file(f"{rel}/metrics.json", '{"status": "completed"}')(tmp)
    return make


def linked_report(name: str) -> Setup:
    """A sweep folder with one run, and a link at one of the report's output names to the user's file."""
    def make(tmp: Path) -> None:
        capsexp_run("s/0")(tmp)
        with_file("keep", "mine\n")(tmp)
        (tmp / "s" / name).symlink_to(tmp / "keep")
    return make


def data_folder(extra: Callable[[Path], None] | None = None, classes: tuple[str, ...] = ("a", "b")) -> Setup:
    def make(tmp: Path) -> None:
        images(tmp / "imgs", classes)
        if extra is not None:
            extra(tmp / "imgs")
    return make


def postscript(root: Path) -> None:
    (root / "a" / "page.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\nshowpage\n")


def truncated(root: Path) -> None:
    path = root / "a" / "0.png"
    path.write_bytes(path.read_bytes()[:50])


def link_loop(root: Path) -> None:
    (root / "a" / "x.jpg").symlink_to(root / "a" / "y.jpg")
    (root / "a" / "y.jpg").symlink_to(root / "a" / "x.jpg")


def fifo(root: Path) -> None:
    os.mkfifo(root / "b" / "pipe.jpg")


def foreign(tmp: Path) -> None:
    with_file("mine/notes.txt", "the user's own notes\n")(tmp)


def resnet18_weights(change: Callable[[dict[str, torch.Tensor]], None]) -> Setup:
    def make(tmp: Path) -> None:
        import torchvision

        state = torchvision.models.resnet18().state_dict()
        change(state)
        torch.save(state, tmp / "w.pt")
    return make


def nan_weights(state: dict[str, torch.Tensor]) -> None:
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")


def wrong_shape(state: dict[str, torch.Tensor]) -> None:
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)


I = ("data=imagefolder", "data.root={tmp}/imgs", "data.val_fraction=0.5", "data.batch_size=2")
CASES = [
    # ---- values and keys
    Case("freeze-depth", ("backbone.freeze_depth=9",), "backbone.freeze_depth=9 is not allowed;"),
    Case("unknown-head", ("head=transformer",), "head=transformer is not an option of head;"),
    Case("misspelt-key", ("trainer.max_step=5",), "trainer.max_step is not a key of this configuration; did you mean"),
    Case("key-of-other-head", ("head.routing.iterations=5",), "head.routing.iterations is not a key of this "
                                                                  "configuration; it exists only with head=capsule"),
    Case("negative-lr", ("optim.lr=-1",), "optim.lr=-1 is not allowed;"),
    Case("text-lr", ("optim.lr=abc",), "optim.lr='abc' is not allowed;"),
    Case("tiny-image", ("data.image_size=16",), "data.image_size=16 is not allowed;"),
    Case("zero-batch", ("data.batch_size=0",), "data.batch_size=0 is not allowed;"),
    Case("negative-epochs", ("trainer.max_epochs=-1",), "trainer.max_epochs=-1 is not allowed;"),
    Case("unknown-routing", ("head=capsule", "head.routing.name=magic"), "head.routing.name='magic' is not allowed;"),
    Case("unknown-loss", ("loss=hinge",), "loss=hinge is not an option of loss;"),
    Case("unknown-precision", ("trainer.precision=fp8",), "trainer.precision='fp8' is not allowed;"),
    Case("unknown-device", ("trainer.device=tpu",), "trainer.device must be auto, cpu, cuda, cuda:N or mps; got 'tpu'."),
    Case("unknown-optim", ("optim=rmsprop",), "optim=rmsprop is not an option of optim;"),
    Case("unknown-adapter", ("adapter=transformer",), "adapter=transformer is not an option of adapter;"),
    Case("unknown-backbone", ("backbone=vgg16",), "backbone=vgg16 is not an option of backbone;"),
    Case("null-data", ("data=null",), "data=null is not an option of data;"),
    Case("null-head", ("head=null",), "head=null is not an option of head;"),
    Case("zero-patience", ("grads.alarm.patience=0",), "grads.alarm.patience=0 is not allowed;"),
    Case("betas", ("optim.betas=[2,3]",), "optim.betas=[2, 3] is not allowed;"),
    Case("checkpoints-mode", ("trainer.checkpoints=sometimes",), "trainer.checkpoints='sometimes' is not allowed;"),
    Case("negative-val-size", ("data.val_size=-5",), "data.val_size=-5 is not allowed;"),
    Case("text-seed", ("seed=abc",), "seed='abc' is not allowed;"),
    Case("nonfinite-mode", ("trainer.on_nonfinite=ignore",), "trainer.on_nonfinite='ignore' is not allowed;"),
    Case("zero-capsule-types", ("head=capsule", "head.primary.types=0"), "head.primary.types=0 is not allowed;"),
    Case("moved-key", ("loss.reconstruction_weight=0.5",), "loss.reconstruction_weight is now head.decoder.weight"),
    # ---- the command line and sweeps
    Case("several-values-without-m", ("head=fc,capsule",), "head=fc,capsule gives several values; add -m"),
    Case("zero-jobs", ("-m", "seed=range(0,0)"), "seed=range(0,0) gives no values, so the sweep would run no job;"),
    Case("misspelt-experiment", ("experiment=fc_vs_capsul",), "experiment=fc_vs_capsul is not an experiment preset;"),
    Case("misspelt-swept-experiment", ("-m", "experiment=fc_vs_capsule,routing_swep"),
         "experiment=routing_swep is not an experiment preset;"),
    Case("bad-value-far-in-sweep", ("-m", "seed=range(0,100)", "data.image_size=32,16"),
         "in the job with seed=0, data.image_size=16: data.image_size=16 is not allowed;"),
    Case("not-an-override", ("head",), "'head' is not a valid override"),
    Case("modes-combined", ("--cfg", "job", "-m"), "--cfg and -m cannot be combined;"),
    Case("key-only-in-some-jobs", ("-m", "head=fc,capsule", "head.routing.iterations=1,3"),
         "in the job with head=fc, head.routing.iterations=1: head.routing.iterations is not a key"),
    # ---- run folders
    Case("users-folder", ("hydra.run.dir={tmp}/mine",), "the run folder '{tmp}/mine' already holds files that "
                                                        "capsexp did not write;", foreign),
    Case("users-folder-interpolated", ("hydra.run.dir=${hydra:runtime.cwd}/mine",),
         "the run folder '{tmp}/mine' already holds files that capsexp did not write;", foreign),
    Case("run-folder-is-a-file", ("hydra.run.dir={tmp}/afile",), "the run folder '{tmp}/afile' is a file",
         with_file("afile", "x\n")),
    Case("run-folder-is-a-link", ("hydra.run.dir={tmp}/alink",), "the run folder '{tmp}/alink' is a symbolic link",
         lambda tmp: (tmp / "alink").symlink_to(tmp)),
    Case("taken-run-folder", ("hydra.run.dir={tmp}/run",), "the run folder '{tmp}/run' already holds a run;",
         capsexp_run()),
    Case("name-too-long", ("hydra.run.dir={tmp}/" + "x" * 300,), "hydra.run.dir: the name 'xxxx"),
    Case("resume-in-users-folder", ("hydra.run.dir={tmp}/mine", "trainer.resume=auto"),
         "the run folder '{tmp}/mine' already holds files that capsexp did not write;", foreign),
    Case("resume-missing-file", ("trainer.resume={tmp}/none.pt",), "trainer.resume: no checkpoint at"),
    Case("resume-text-file", ("trainer.resume={tmp}/t.pt",), "trainer.resume: '{tmp}/t.pt' is not a readable "
                                                             "checkpoint", with_file("t.pt", "not torch\n")),
    Case("resume-foreign-torch-file", ("trainer.resume={tmp}/w.pt",), "trainer.resume: '{tmp}/w.pt' is not a "
                                                                      "capsexp checkpoint", resnet18_weights(id)),
    Case("lock-is-a-folder", ("hydra.run.dir={tmp}/run",), "'{tmp}/run/.capsexp.lock' is a folder where capsexp "
                                                           "keeps its lock file", with_file("run/.capsexp.lock/x", "")),
    # ---- data
    Case("missing-data-root", ("data=imagefolder", "data.root={tmp}/nothing"), "data.root: no folder at"),
    Case("data-root-is-a-file", ("data=imagefolder", "data.root={tmp}/f"), "data.root: no folder at '{tmp}/f';",
         with_file("f", "x")),
    Case("empty-data-root", ("data=imagefolder", "data.root={tmp}/empty"), "data.root '{tmp}/empty' has no class",
         lambda tmp: (tmp / "empty").mkdir()),
    Case("single-class", I, "data.root '{tmp}/imgs' has only one class folder ('a');", data_folder(classes=("a",))),
    Case("postscript-as-jpeg", I, "data: cannot decode image '{tmp}/imgs/a/page.jpg' (not an image in a format "
                                  "capsexp reads", data_folder(postscript)),
    Case("truncated-image", I, "data: cannot decode image '{tmp}/imgs/a/0.png'", data_folder(truncated)),
    Case("link-loop", I, "data: cannot decode image '{tmp}/imgs/a/x.jpg' (Too many levels of symbolic links",
         data_folder(link_loop)),
    Case("fifo-image", I, "data: cannot decode image '{tmp}/imgs/b/pipe.jpg' (not a regular file",
         data_folder(fifo)),
    Case("no-download", ("data=cifar10", "data.root={tmp}/cifar"), "data.root: no CIFAR-10 found at "
                                                                     "'{tmp}/cifar'; download it with data.download=true",
         lambda tmp: (tmp / "cifar").mkdir()),
    Case("weights-missing", ("backbone.weights={tmp}/none.pt",), "backbone.weights: no file at"),
    Case("weights-text", ("backbone.weights={tmp}/t.pt",), "backbone.weights: '{tmp}/t.pt' is not a readable",
         with_file("t.pt", "text\n")),
    Case("weights-nan", ("backbone.weights={tmp}/w.pt",), "backbone.weights: '{tmp}/w.pt' holds NaN or infinite "
                                                          "values (first in 'layer2.0.conv1.weight')",
         resnet18_weights(nan_weights)),
    Case("weights-wrong-shape", ("backbone.weights={tmp}/w.pt",), "backbone.weights: '{tmp}/w.pt' does not fit "
                                                                  "resnet18", resnet18_weights(wrong_shape)),
    Case("weights-not-tensors", ("backbone.weights={tmp}/d.pt",), "backbone.weights: '{tmp}/d.pt' holds no "
                                                                  "state_dict of tensors",
         lambda tmp: torch.save({"a": 1}, tmp / "d.pt")),
]
REPORT_CASES = [
    Case("report-missing", ("{tmp}/nothing",), "'{tmp}/nothing' is not a folder;"),
    Case("report-a-file", ("{tmp}/f",), "'{tmp}/f' is not a folder;", with_file("f", "x")),
    Case("report-no-runs", ("{tmp}/empty",), "no runs below '{tmp}/empty'", lambda tmp: (tmp / "empty").mkdir()),
    *(Case(f"report-link-at-{name}", ("{tmp}/s",), f"'{{tmp}}/s/{name}' is a symbolic link;", linked_report(name))
      for name in ("report.md", "report.csv", "report.png")),
]


def check(case: Case, command: str, tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    if case.setup is not None:
        case.setup(work)
    before = digest(tmp_path)
    argv = [a.replace("{tmp}", str(work)) for a in case.argv]
    other_data = any(a.startswith("data=") for a in argv)  # the sizes are keys of data=shapes only
    extra = [a for a in [*TINY, "data.batch_size=2"] if not (other_data and a.startswith(("data.train_size",
             "data.val_size")))] if command == "train" else []
    proc = run_cli(command, *extra, *argv, cwd=work, env=case.env, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == case.code, proc.stderr[-3000:]
    said = case.says.replace("{tmp}", str(work))
    assert lines and lines[-1].startswith("capsexp: error: " + said), lines[-3:]
    after = digest(tmp_path)
    # a refusal changes no file, link or folder; a run stopped by its data may leave only its own new folder
    assert {k: v for k, v in after.items() if k in before} == before
    assert all(k.startswith("w/outputs") for k in set(after) - set(before)), sorted(set(after) - set(before))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_train_refuses_in_one_sentence_and_changes_nothing(case: Case, tmp_path: Path) -> None:
    check(case, "train", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", REPORT_CASES, ids=[c.id for c in REPORT_CASES])
def test_report_refuses_in_one_sentence_and_changes_nothing(case: Case, tmp_path: Path) -> None:
    check(case, "report", tmp_path)


def test_the_battery_has_at_least_sixty_cases() -> None:
    assert len(CASES) + len(REPORT_CASES) >= 60 and len({c.id for c in CASES + REPORT_CASES}) == len(CASES) + len(
        REPORT_CASES)
