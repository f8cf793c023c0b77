"""``capsexp report``: discovery, labels and rows on synthetic runs; the real command on a tiny sweep."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import yaml

from capsexp.errors import UserError
from capsexp.report import RUNNING, Run, build_rows, find_runs, main, parse_overrides, summarize
from conftest import run_cli
from test_sweeps import tiny_sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sweep(tmp_path_factory.getbasetemp())[0]


def fake_run(name: str, overrides: dict[str, str] | None = None, config: dict | None = None,
             metrics: dict | None = None, scalars: dict | None = None) -> Run:
    return Run(Path("/nowhere") / name, name, overrides, config or {}, metrics, scalars or {}, None)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------- pure parts

def test_find_runs_finds_single_runs_and_sweep_jobs(tmp_path: Path) -> None:
    (tmp_path / "runs" / "a" / "tb").mkdir(parents=True)
    (tmp_path / "multirun" / "s" / "00_head=fc").mkdir(parents=True)
    (tmp_path / "multirun" / "s" / "00_head=fc" / "metrics.json").write_text("{}")
    (tmp_path / "runs" / "a" / "nested" / "tb").mkdir(parents=True)  # a run inside a run: still a run
    (tmp_path / "runs" / "a" / "checkpoints" / "tb").mkdir(parents=True)  # a run's own folder: not searched
    (tmp_path / "multirun" / "s" / ".submitit" / "x" / "tb").mkdir(parents=True)  # hidden: skipped
    (tmp_path / "multirun" / "s" / "empty").mkdir()
    (tmp_path / "multirun" / "s" / "01_head=capsule").mkdir()
    (tmp_path / "multirun" / "s" / "01_head=capsule" / "failed.json").write_text('{"reason": "r"}')  # a failed job
    jobs = [tmp_path / "multirun" / "s" / "00_head=fc", tmp_path / "multirun" / "s" / "01_head=capsule"]
    runs = [tmp_path / "runs" / "a", tmp_path / "runs" / "a" / "nested"]
    assert find_runs(tmp_path) == [*jobs, *runs]
    assert find_runs(tmp_path / "runs" / "a") == runs  # a run folder itself
    (tmp_path / "multirun" / "s" / "metrics.json").write_text("{}")  # a run made at the top of the sweep
    assert find_runs(tmp_path / "multirun") == [tmp_path / "multirun" / "s", *jobs]  # hides no job


def test_labels_say_what_differs() -> None:
    tiny = {"data.image_size": "32", "trainer.max_steps": "4"}
    runs = [fake_run("0", {"head": "fc", **tiny}, {"head.name": "fc", "adapter.name": "none"}),
            fake_run("1", {"head": "capsule", "adapter": "conv", **tiny},
                     {"head.name": "capsule", "adapter.name": "conv", "head.primary.types": 32})]
    keys, rows = build_rows(runs)
    assert keys == ["adapter", "head"]  # adapter defaults to none in run 0, read from its config
    assert [r["run"] for r in rows] == ["adapter=none,head=fc", "adapter=conv,head=capsule"]
    same = build_rows([fake_run("a", {"seed": "1"}), fake_run("b", {"seed": "1"})])[1]
    assert [r["run"] for r in same] == ["a", "b"]  # nothing differs: folder names


def test_runs_without_overrides_compare_their_configs() -> None:
    runs = [fake_run("x", None, {"head.name": "fc", "head.dropout": 0.0, "seed": 0, "trainer.compile": False}),
            fake_run("y", None, {"head.name": "capsule", "head.class_dim": 16, "seed": 0,
                                 "trainer.compile": True})]
    keys, rows = build_rows(runs)
    assert keys == ["head", "trainer.compile"]  # head.* under a differing group choice are implied
    assert rows[1]["run"] == "head=capsule,trainer.compile=true"
    assert parse_overrides(["+foo=1", "bar@pkg=x", "~gone", "trainer.resume=auto"]) == {"foo": "1", "bar": "x"}


def test_rows_leave_frozen_stages_blank_and_fall_back_to_event_files() -> None:
    metrics = {"status": "completed", "val/acc": 0.5, "best/val/acc": 0.75, "steps": 4,
               "images_per_sec": float("nan"), "grad_norm/layer2": 2.0, "grad_norm/head": 4.0}
    row = summarize(fake_run("frozen", metrics=metrics,
                             scalars={"throughput/images_per_sec": [(2, 10.0), (4, 12.0)]}))
    assert row["grad_norm/stem"] is None and row["grad_norm/layer1"] is None  # frozen, not zero
    assert row["early/head"] is None and row["images_per_sec"] == 12.0  # NaN in metrics: TB value
    scalars = {"val/acc": [(2, 0.25), (4, 0.5), (6, 0.375)], "grad_norm/stem": [(1, 3.0), (2, 0.3)],
               "grad_norm/layer1": [(1, 4.0), (2, 0.4)], "grad_norm/head": [(1, 10.0), (2, 10.0)]}
    live = summarize(fake_run("live", scalars=scalars))
    assert live["status"] == RUNNING and live["steps"] == 6
    assert (live["best_val_acc"], live["final_val_acc"]) == (0.5, 0.375)
    assert math.isclose(live["early/head"], (0.5 + 0.05) / 2)  # median over steps of |(stem, layer1)| / head
    assert math.isclose(live["grad_norm/stem"], 1.65)


def test_missing_or_empty_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is not a folder"):
        main([str(tmp_path / "absent")])
    with pytest.raises(UserError, match="no runs below"):
        main([str(tmp_path)])


@pytest.mark.slow
def test_missing_folder_is_one_sentence_from_the_command(tmp_path: Path) -> None:
    proc = run_cli("report", str(tmp_path / "absent"), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("capsexp: error:") and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- the command on real runs

def check_png(path: Path) -> None:
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
    assert float(np.std(image[..., :3])) > 0.05  # lines and text, not a blank canvas


def test_report_compares_the_sweep(sweep: Path, tmp_path: Path) -> None:
    proc = run_cli("report", str(sweep), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["run", "routing", "status", "steps"]
    assert any(line.startswith("head=fc ") for line in lines)
    assert any(line.startswith("head=capsule ") for line in lines)
    rows = {row["run"]: row for row in read_csv(sweep / "report.csv")}
    assert set(rows) == {"head=fc", "head=capsule"}
    for label, row in rows.items():
        metrics = json.loads((sweep / row["folder"] / "metrics.json").read_text())
        assert row["status"] == "completed" and row["head"] == label.split("=")[1] and row["steps"] == "4"
        assert row["routing"] == {"fc": "(fc avg)", "capsule": "dynamic-r3"}[row["head"]]
        assert math.isclose(float(row["grad_norm/layer1"]), metrics["grad_norm/layer1"], rel_tol=1e-6)
        assert float(row["early/head"]) > 0 and row["grad_norm/adapter"] == ""  # adapter=none
    markdown = (sweep / "report.md").read_text()
    assert "| head=capsule | dynamic-r3 | completed |" in markdown and "report.png" in markdown
    check_png(sweep / "report.png")


@pytest.mark.slow
def test_report_survives_crashed_and_running_runs(sweep: Path, tmp_path: Path) -> None:
    folder = tmp_path / "sweep"
    shutil.copytree(sweep, folder, ignore=shutil.ignore_patterns("checkpoints", "report.*"))
    (folder / "01_head=capsule" / "metrics.json").unlink()  # crashed after some steps
    (folder / "02_just_started" / "tb").mkdir(parents=True)  # nothing logged yet
    proc = run_cli("report", str(folder), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {row["folder"]: row for row in read_csv(folder / "report.csv")}
    assert rows["00_head=fc"]["status"] == "completed"
    crashed, started = rows["01_head=capsule"], rows["02_just_started"]
    assert crashed["status"] == RUNNING and float(crashed["grad_norm/head"]) > 0  # from the event files
    assert crashed["best_val_acc"] != ""
    assert started["status"] == RUNNING and started["run"] == "02_just_started" and started["steps"] == ""
    assert sum(RUNNING in line for line in proc.stdout.splitlines()) == 2
    check_png(folder / "report.png")


def test_report_of_one_run_folder(sweep: Path, tmp_path: Path) -> None:
    run = tmp_path / "single"
    shutil.copytree(sweep / "00_head=fc", run, ignore=shutil.ignore_patterns("checkpoints"))
    main([str(run)])
    assert [row["run"] for row in read_csv(run / "report.csv")] == ["single"]


# ---------------------------------------------------------------- safe to open

PAYLOAD = "=cmd|' /C calc'!A0"  # a spreadsheet that evaluates this cell starts a program
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def hand_made_run(folder: Path, overrides: list[str], config: dict, metrics: dict) -> None:
    """A run folder as the CLI leaves it: .hydra/overrides.yaml, config.yaml, metrics.json."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_report_files_are_safe_to_open(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    alarm = "@SUM(A1) <img src=x onerror=alert(1)> `code` | cell\n# injected heading"
    hand_made_run(root / "00_evil", ["head=fc", f"trainer.note={PAYLOAD}", "seed=-1"],
                  {"head": {"name": "fc"}, "seed": -1, "trainer": {"note": PAYLOAD}},
                  {"status": "completed", "steps": 4, "val/acc": -0.25, "best/val/acc": 0.5,
                   "alarm/vanishing_gradients": alarm})
    hand_made_run(root / "@SUM(1+1)", ["head=capsule", "trainer.note=plain", "seed=2"],
                  {"head": {"name": "capsule"}, "seed": 2, "trainer": {"note": "plain"}},
                  {"status": "completed", "steps": 4, "val/acc": 0.75, "best/val/acc": 0.75})
    main([str(root)])

    with (root / "report.csv").open(newline="") as handle:
        table = list(csv.reader(handle))
    rows = {row["folder"]: row for row in read_csv(root / "report.csv")}
    evil, other = rows["00_evil"], rows["'@SUM(1+1)"]
    assert evil["trainer.note"] == "'" + PAYLOAD and evil["alarm"] == "'" + alarm
    assert evil["seed"] == "-1" and evil["final_val_acc"] == "-0.25"  # numbers stay numbers
    assert other["trainer.note"] == "plain" and other["seed"] == "2"
    assert all(not cell.startswith(FORMULA_START) or cell.lstrip("-").replace(".", "").isdigit()
               for line in table for cell in line)

    markdown = (root / "report.md").read_text()
    lines = markdown.splitlines()
    first = lines.index(next(line for line in lines if line.startswith("|")))
    table_lines = [line for line in lines[first:first + 5] if line.startswith("|")]
    assert len(table_lines) == 4  # the runs table: header, rule, two runs; no value broke a row
    pipes = {len(re.findall(r"(?<!\\)\|", line)) for line in table_lines}
    assert len(pipes) == 1  # the same number of columns in every row
    assert "<img" not in markdown and "&lt;img src=x onerror=alert(1)&gt;" in markdown
    assert "\\`code\\`" in markdown and "# injected heading" not in [line.strip() for line in lines]
    assert "calc'!A0" in markdown and "\\|' /C calc" in markdown
    alarm_lines = [line for line in lines if line.startswith("- alarm in ")]
    assert len(alarm_lines) == 1 and alarm_lines[0].endswith("\\| cell # injected heading")  # one line


def test_learning_measures_and_the_seed_spread_are_tabled() -> None:
    def run(name: str, seed: int, acc: float, stem_update: float) -> Run:
        metrics = {"status": "completed", "steps": 60, "best/val/acc": acc, "val/acc": acc, "num_classes": 8,
                   "grad_norm/stem": 1.0, "grad_norm/head": 2.0, "update_to_weight/stem": stem_update,
                   "update_to_weight/head": 0.01, "drift/stem": 0.99, "drift/head": 0.2,
                   "alarm/exploding": "exploding: grad_norm/stem jumped" if seed else None}
        scalars = {"capsule/coupling_entropy/iter1": [(5, 2.0794)], "capsule/coupling_entropy/iter3": [(5, 1.5)]}
        return fake_run(name, {"head": "capsule", "seed": str(seed)}, {"head.name": "capsule", "seed": seed},
                        metrics, scalars)

    _, rows = build_rows([run("a", 0, 0.5, 1e-4), run("b", 1, 0.7, 3e-4)])
    assert rows[0]["update_to_weight/stem"] == 1e-4 and rows[1]["drift/head"] == 0.2
    assert rows[1]["alarms"] == "exploding" and rows[0]["alarms"] == ""
    assert rows[0]["entropy/iter3"] == 1.5 and rows[0]["entropy/uniform"] == pytest.approx(math.log(8))
    from capsexp.report.table import format_tables, seed_groups

    (group,) = seed_groups(rows)
    assert group["best_val_acc"] == pytest.approx(0.6) and group["spread/best_val_acc"] == pytest.approx(0.2)
    assert group["update_to_weight/stem"] == pytest.approx(2e-4)
    text = format_tables(rows)
    for title in ("median update/weight per stage", "drift per stage", "coupling entropy", "over seeds"):
        assert title in text
