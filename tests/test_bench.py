"""``capsexp bench``: which rows it times, the configs it derives, and a reduced run of the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from capsexp.bench import format_table, num_classes, plan, variant
from capsexp.errors import UserError
from capsexp.models.adapters import ADAPTERS
from capsexp.models.classifier import build_model
from capsexp.models.heads import POOLS
from capsexp.models.routing import ROUTINGS
from capsexp.runtime import PeakMemory
from conftest import make_cfg, run_cli

ROW_KEYS = {"name", "head", "adapter", "routing", "routing_iterations", "input_capsules", "head_input", "grads", "device",
            "precision", "image_size", "batch_size", "images_per_sec", "step_ms_median", "step_ms_mean",
            "peak_memory_mb", "vs_fc", "vs_grads_off", "drift_start_ms", "drift_ms_per_validation", "drift_vs_step"}


pytestmark = pytest.mark.usefixtures("one_thread")


def bench_cfg(*overrides: str) -> DictConfig:
    """The config ``capsexp bench`` composes: the training config plus the ``bench`` group."""
    return make_cfg(*overrides, config_name="bench")


def expected_rows() -> list[str]:
    """Every row the default plan should time, from the registries: a new adapter, pooling or
    routing appears here (and in bench) without editing either."""
    caps = [f"capsule-{a}" + ("" if r == "dynamic" else f"-{r}") + ("-r3" if ROUTINGS[r].iterations else "")
            for r in ROUTINGS for a in ADAPTERS]
    return ["fc", *(f"fc-{p}" for p in POOLS if p != "avg"), *caps, "fc-grads-off", "capsule-conv-r3-grads-off",
            "fc-grads-every", "capsule-conv-r3-grads-every"]


def test_the_default_plan_covers_heads_adapters_routing_and_diagnostics() -> None:
    cfg = bench_cfg()
    rows = plan(cfg)
    assert [r.name for r in rows] == expected_rows()
    assert "capsule-pool-r3" in [r.name for r in rows] and "capsule-conv-self" in [r.name for r in rows]
    for row in rows:
        derived = variant(cfg, row)
        assert (derived.head.name, derived.adapter.name) == (row.head, row.adapter)
        # each head with its own loss, each routing with its paper's, as composing head=<name> gives
        want = "ce" if row.head == "fc" else ROUTINGS[str(derived.head.routing.name)].default_loss
        assert derived.loss.name == want
        if row.routing is not None:
            assert derived.head.routing.name == row.routing
        if row.pool is not None:
            assert derived.head.pool == row.pool
        if row.iterations is not None:
            assert derived.head.routing.iterations == row.iterations
        grads = derived.grads
        assert grads.enabled == (row.grads != "off")
        if row.grads == "every":
            assert grads.log_every_n_steps == 1 and grads.per_layer
    assert bench_cfg().head.name == "fc"  # the user's config is never changed


def test_derived_configs_keep_the_users_group_settings() -> None:
    cfg = bench_cfg("head=capsule", "head.primary.types=8", "head.routing.iterations=2", "adapter=conv",
                    "adapter.width=64", "loss=spread", "trainer.precision=bf16")
    rows = {r.name: r for r in plan(cfg)}
    assert "capsule-conv-r2-grads-off" in rows  # diagnostics rows use the user's routing iterations
    caps = variant(cfg, rows["capsule-conv-r2"])
    assert (caps.head.primary.types, caps.adapter.width, caps.loss.name) == (8, 64, "spread")
    assert caps.head.routing.iterations == 2 and caps.trainer.precision == "bf16"
    em = variant(cfg, rows["capsule-conv-em-r3"])  # another routing: its own loss, the user's other settings
    assert (em.head.routing.name, em.loss.name, em.head.primary.types) == ("em", "spread", 8)
    fc = variant(cfg, rows["fc"])
    assert (fc.head.name, fc.adapter.name, fc.loss.name) == ("fc", "none", "ce")


def test_input_capsules_grow_with_the_feature_map_area() -> None:
    for size, side in ((32, 1), (64, 2), (128, 4)):
        row = next(r for r in plan(bench_cfg()) if r.name == "capsule-none-r3")
        cfg = variant(bench_cfg(f"data.image_size={size}"), row)
        head = build_model(cfg, num_classes(cfg)).head
        assert head.input_capsules == 32 * side * side  # I = types x h x w


def test_rows_select_by_name_and_bad_values_are_one_sentence() -> None:
    assert [r.name for r in plan(bench_cfg("bench.rows=[fc-grads-off,fc]"))] == ["fc-grads-off", "fc"]
    assert [r.name for r in plan(bench_cfg("bench.rows=capsule-conv-r3"))] == ["capsule-conv-r3"]  # one name
    assert [r.name for r in plan(bench_cfg("bench.diagnostics=false", "bench.adapters=[conv]", "bench.pools=[avg]",
                                           "bench.routings=[dynamic,self]", "bench.routing_iterations=[1,3]"))] == \
        ["fc", "capsule-conv-r1", "capsule-conv-r3", "capsule-conv-self"]
    with pytest.raises(UserError, match="bench.rows names 'fc-fast'"):
        plan(bench_cfg("bench.rows=[fc-fast]"))
    from capsexp.bench import bench

    with pytest.raises(UserError, match="pool") as err:  # the allowed adapters come from the registry
        bench(bench_cfg("bench.adapters=[mlp]"), run_dir=Path("/nonexistent"))
    assert "none, conv, linear, pool" in str(err.value)
    for overrides, key in ((["bench.steps=0"], "bench.steps=0"), (["bench.adapters=[mlp]"], "bench.adapters"),
                           (["bench.routings=[capsnet]"], "bench.routings"), (["bench.pools=[sum]"], "bench.pools"),
                           (["bench.routing_iterations=[0]"], "bench.routing_iterations"),
                           (["bench.heads=false", "bench.diagnostics=false"], "no rows")):
        with pytest.raises(UserError, match=key):
            bench(bench_cfg(*overrides), run_dir=Path("/nonexistent"))


def test_cpu_peak_memory_sees_a_short_lived_allocation() -> None:
    memory = PeakMemory(torch.device("cpu"))
    memory.start()
    block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched, then freed
    del block
    peak = memory.peak_mb()
    assert peak is not None and peak >= 60


def test_bench_cli_times_rows_and_writes_bench_json(tmp_path: Path) -> None:
    rows = ["fc", "capsule-conv-r3", "fc-grads-off", "fc-grads-every", "fc-max", "capsule-conv-em-r3"]
    done = run_cli("bench", "bench.warmup_steps=1", "bench.steps=2", "data.image_size=32", "data.batch_size=4",
                   "grads.drift.probe_images=8", "bench.drift_repeats=2", f"bench.rows=[{','.join(rows)}]",
                   f"hydra.run.dir={tmp_path}", cwd=tmp_path, timeout=600, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert f"capsexp: wrote {tmp_path / 'bench.json'}" in done.stdout
    assert report["steps"] == 2 and "synthetic" in report["inputs"] and "resident set" in report["memory"]
    got = {r["name"]: r for r in report["rows"]}
    assert list(got) == rows and all(set(r) == ROW_KEYS for r in report["rows"])
    assert got["fc"]["vs_fc"] == 1 and got["fc-grads-off"]["vs_grads_off"] == 1
    assert got["fc-grads-every"]["vs_grads_off"] > 0 and got["capsule-conv-r3"]["vs_grads_off"] is None
    caps = got["capsule-conv-r3"]
    assert (caps["input_capsules"], caps["head_input"], caps["routing_iterations"]) == (32, "256x1x1", 3)
    assert (caps["routing"], got["capsule-conv-em-r3"]["routing"], got["fc-max"]["head"]) == ("dynamic", "em", "fc-max")
    assert got["fc"]["input_capsules"] is None and got["fc-grads-off"]["grads"] == "off"
    for row in report["rows"]:
        assert row["images_per_sec"] > 0 and row["step_ms_median"] > 0 and row["peak_memory_mb"] > 0
        assert (row["device"], row["precision"], row["image_size"], row["batch_size"])[1:] == ("fp32", 32, 4)
        assert row["device"] in done.stdout and row["name"] in done.stdout
    # what drift/<stage> adds to a validation, timed once per model, for the rows with diagnostics on
    assert "8 probe images" in report["drift"]
    for name in ("fc", "capsule-conv-r3", "fc-grads-every"):
        row = got[name]
        assert row["drift_start_ms"] > 0 and row["drift_ms_per_validation"] > 0 and row["drift_vs_step"] > 0
        assert row["drift_vs_step"] == pytest.approx(row["drift_ms_per_validation"] / row["step_ms_median"])
    assert got["fc-grads-every"]["drift_ms_per_validation"] == got["fc"]["drift_ms_per_validation"]  # one model
    assert all(got["fc-grads-off"][k] is None for k in ("drift_start_ms", "drift_ms_per_validation", "drift_vs_step"))
    assert format_table(report["rows"]).splitlines()[0] in done.stdout
    # the same table as Markdown, under where and how it ran
    markdown = (tmp_path / "bench.md").read_text().splitlines()
    assert markdown[0].startswith(f"{got['fc']['device']}, fp32, channels-last off, compile off, 32 px, batch 4, "
                                  "1 warm-up + 2 timed steps, PyTorch ")
    table = [line.split(" | ") for line in markdown if line.startswith("| ") and "---" not in line][1:]
    assert [cells[0].lstrip("| ") for cells in table] == rows
    fc = dict(zip(["name", "adapter", "routing", "iters", "I", "grads", "ms"], table[0]))
    assert fc["ms"] == f"{got['fc']['step_ms_median']:.1f}" and fc["iters"] == "–"
    assert table[0][-2] == f"{got['fc']['drift_ms_per_validation']:.1f}" and table[2][-2] == "–"  # fc-grads-off
    assert table[5][2] == "em"
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("events.out.tfevents.*"))  # no checkpoints, no logs


def test_diagnostics_rows_share_one_model_and_take_turns_in_blocks(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Drift of the machine's speed must not fall on one diagnostics setting: they alternate."""
    from capsexp import bench as bench_module
    from capsexp.diagnostics import monitor as diagnostics
    from capsexp.runtime import setup_runtime

    created: list[diagnostics.GradientMonitor] = []
    real_init = diagnostics.GradientMonitor.__init__

    def init(self: diagnostics.GradientMonitor, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)
        created.append(self)

    order: list[int] = []  # which monitor each step ran with
    real_step = bench_module.train_step

    def step(loop: object, *args: object) -> object:
        order.append(created.index(loop.monitor))
        return real_step(loop, *args)

    figures: list[tuple[int, int]] = []  # (monitor, step) of every gradient figure drawn
    real_figures = diagnostics.GradientMonitor._log_figures

    def log_figures(self: diagnostics.GradientMonitor, at: int) -> None:
        figures.append((created.index(self), at))
        real_figures(self, at)

    monkeypatch.setattr(diagnostics.GradientMonitor, "__init__", init)
    monkeypatch.setattr(diagnostics.GradientMonitor, "_log_figures", log_figures)
    monkeypatch.setattr(bench_module, "train_step", step)
    cfg = bench_cfg("head=fc", "backbone.freeze_depth=4", "bench.warmup_steps=1", "bench.steps=5",
                    "grads.log_every_n_steps=2", "grads.figure_every_n_steps=4", "grads.drift.probe_images=4",
                    "bench.drift_repeats=1")
    rows = [r for r in plan(cfg) if r.base == "fc"]
    assert [r.name for r in rows] == ["fc", "fc-grads-off", "fc-grads-every"]
    results = bench_module.time_rows([variant(cfg, r) for r in rows], setup_runtime(cfg.trainer), 8, tmp_path)
    # one model, one monitor per diagnostics setting, and a fresh one that times drift from its start
    assert len(created) == 4
    # warm-up, then blocks of log_every_n_steps in turn; the last block cut to bench.steps=5 in all
    assert order == [0, 1, 2] + [0, 0, 1, 1, 2, 2] * 2 + [0, 1, 2]
    # each setting counts its own steps 1..6 (1 warm-up + 5 timed): the default interval logs at
    # steps 2, 4, 6; off never; every step at all six
    logged = [sorted({at for at, _ in m.history.records}) for m in created[:3]]
    assert logged == [[2, 4, 6], [], [1, 2, 3, 4, 5, 6]]
    # a logging step measures all of it: gradient norms, update/weight after the step and the
    # gradient entering the backbone; the figures come at their own interval
    for monitor, steps in zip(created[:3], logged):
        for at in steps:
            keys = set().union(*(values for s, values in monitor.history.records if s == at))
            assert {"grad_norm/total", "grad_norm/head", "update_to_weight/head", "update_to_weight/layer4",
                    "grad_norm/features"} <= keys
    assert {(0, 4), (2, 4)} <= set(figures) and {at for _, at in figures} == {4}
    # drift, timed through a monitor of the default setting: a probe, its starting Gram matrices, a measurement
    assert created[3].drift.reference and created[3].history.last_drift
    assert results[0]["drift_ms_per_validation"] > 0 and results[1]["drift_ms_per_validation"] is None
    assert all(r["step_ms_median"] > 0 and r["images_per_sec"] > 0 for r in results) and len(results) == 3
