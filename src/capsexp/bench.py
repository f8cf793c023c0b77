"""``capsexp bench``: time real training steps for the FC and capsule heads and the gradient diagnostics.

Every row builds model, loss, optimizer, schedule, scaler and gradient monitor with the builders
``train`` uses and times ``engine.train_step`` itself, so a row costs what a training step costs
(device, precision, channels-last and compile come from ``trainer``). Inputs are synthetic random
batches of ``data.image_size`` x ``data.batch_size``: data loading is not timed. Per model it also
times what ``drift/<stage>`` adds to a validation, through the same monitor. Nothing is saved but
``bench.json`` and ``bench.md``; the monitor's TensorBoard events go to a temporary folder that is deleted.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from capsexp.engine.assembly import build_loop, seed_everything
from capsexp.checks import Check, boolean, integer
from capsexp.config.validation import validate
from capsexp.diagnostics.monitor import GradientMonitor
from capsexp.engine.step import train_step
from capsexp.engine.loop import Loop, TrainState
from capsexp.errors import UserError
from capsexp.config.tree import group_option
from capsexp.models.backbone import feature_size
from capsexp.rundir.files import write_atomic
from capsexp.rundir.folder import output_dir
from capsexp.data.catalog import CLASS_COUNTS
from capsexp.models.adapters import ADAPTERS
from capsexp.models.heads import POOLS
from capsexp.models.routing import ROUTINGS
from capsexp.report.bench import format_markdown, format_table  # noqa: F401 -- format_table: for callers
from capsexp.runtime import PeakMemory, Runtime, setup_runtime

BENCH_FILE = "bench.json"
BENCH_MARKDOWN = "bench.md"

BENCH_CHECKS: list[Check] = [  # (key under bench., predicate, what is allowed)
    ("warmup_steps", integer(0), "an integer >= 0"), ("steps", integer(1), "an integer >= 1"),
    ("drift_repeats", integer(0), "an integer >= 0"), ("heads", boolean, "true or false"),
    ("diagnostics", boolean, "true or false"), ("num_classes", integer(2, optional=True), "an integer >= 2 or null"),
    ("adapters", lambda v: v is None or (bool(v) and all(a in ADAPTERS for a in v)),
     f"null (every adapter) or a non-empty list of {', '.join(ADAPTERS)}"),
    ("routings", lambda v: v is None or (bool(v) and all(r in ROUTINGS for r in v)),
     f"null (every routing) or a non-empty list of {', '.join(ROUTINGS)}"),
    ("pools", lambda v: v is None or (bool(v) and all(p in POOLS for p in v)),
     f"null (every FC pooling) or a non-empty list of {', '.join(POOLS)}"),
    ("routing_iterations", lambda v: bool(v) and all(integer(1)(k) for k in v), "a non-empty list of integers >= 1"),
]
NO_DRIFT: dict[str, float | None] = {"drift_start_ms": None, "drift_ms_per_validation": None}
DRIFT_NOTE = ("drift/<stage> at one validation (a forward of the {images} probe images, centred Gram matrices, "
              "linear CKA), median of bench.drift_repeats, measured once per model; x step: that time in "
              "training steps of the row (median step time)")


@dataclass(frozen=True)
class Row:
    """One configuration to time: a head (an FC pooling or a routing), an adapter, routing iterations
    and a diagnostics setting."""

    name: str
    head: str
    adapter: str
    routing: str | None     # the capsule head's routing; None for the FC head
    pool: str | None        # the FC head's pooling; None for the capsule head
    iterations: int | None
    grads: str  # "default", "off" or "every"
    base: str   # the row name of the same model with the default diagnostics


def plan(cfg: DictConfig) -> list[Row]:
    """The rows ``bench`` times, from the ``bench`` config group (``bench.rows`` selects by name)."""
    b = cfg.bench
    caps_head = cfg.head if cfg.head.name == "capsule" else _group("head", "capsule")
    caps_iters, caps_routing = int(caps_head.routing.iterations), str(caps_head.routing.name)
    adapters = list(ADAPTERS) if b.adapters is None else list(b.adapters)
    routings = list(ROUTINGS) if b.routings is None else list(b.routings)
    pools = list(POOLS) if b.pools is None else list(b.pools)
    rows: list[Row] = []
    if b.heads or b.diagnostics:
        rows.append(Row("fc", "fc", "none", None, "avg", None, "default", "fc"))
    if b.heads:
        rows += [Row(f"fc-{pool}", "fc", "none", None, pool, None, "default", f"fc-{pool}")
                 for pool in pools if pool != "avg"]
        for routing in routings:
            # a routing without iterations gets one row, named without r<k>
            iterations = list(b.routing_iterations) if ROUTINGS[routing].iterations else [None]
            rows += [Row(name, "capsule", a, routing, None, k, "default", name)
                     for a in adapters for k in iterations
                     for name in [_capsule_name(a, routing, k)]]
    if b.diagnostics:
        caps = _capsule_name("conv", caps_routing, caps_iters if ROUTINGS[caps_routing].iterations else None)
        if caps not in {r.name for r in rows}:
            rows.append(Row(caps, "capsule", "conv", caps_routing, None, caps_iters, "default", caps))
        for grads in ("off", "every"):
            rows.append(Row(f"fc-grads-{grads}", "fc", "none", None, "avg", None, grads, "fc"))
            rows.append(Row(f"{caps}-grads-{grads}", "capsule", "conv", caps_routing, None, caps_iters, grads, caps))
    if b.rows is not None:
        known = {r.name: r for r in rows}
        names = [b.rows] if isinstance(b.rows, str) else list(b.rows)  # bench.rows=fc: one row
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UserError(f"bench.rows names '{unknown[0]}', which is not a row of this bench; "
                            f"choose from {', '.join(known)}.")
        rows = [known[n] for n in names]
    return rows


def _capsule_name(adapter: str, routing: str, iterations: int | None) -> str:
    """``capsule-conv-r3``, ``capsule-conv-em-r3``, ``capsule-conv-self``: as run folders are named."""
    parts = ["capsule", adapter] + ([routing] if routing != "dynamic" else []) + \
        ([f"r{iterations}"] if iterations is not None else [])
    return "-".join(parts)


def _check(cfg: DictConfig) -> None:
    b = cfg.get("bench")
    if b is None:
        raise UserError("the config has no 'bench' group; compose it from capsexp's conf/ folder.")
    for key, ok, allowed in BENCH_CHECKS:
        value = b.get(key)
        if not ok(value):
            shown = list(value) if OmegaConf.is_list(value) else value
            raise UserError(f"bench.{key}={shown!r} is not allowed; it must be {allowed}.")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("capsexp bench times one process; run it without torchrun.")


def _group(group: str, option: str) -> DictConfig:
    """A config group option as composing ``<group>=<option>`` would give it (its own defaults aside)."""
    node = group_option(group, option)
    # a _global_-package option (head=capsule) keeps its group under its own key
    return node[group] if group in node and "name" not in node else node


def variant(cfg: DictConfig, row: Row) -> DictConfig:
    """The user's config changed only where the row differs; the user's settings of a group are kept."""
    out = copy.deepcopy(cfg)
    OmegaConf.set_struct(out, False)
    if cfg.head.name != row.head:
        out.head = _group("head", row.head)
        out.loss = _group("loss", "default")  # the head's (or routing's) own loss, as composing head= gives
    if cfg.adapter.name != row.adapter:
        out.adapter = _group("adapter", row.adapter)
    if row.routing is not None and out.head.routing.name != row.routing:
        out.head.routing.name = row.routing
        out.loss = _group("loss", "default")
    if row.pool is not None:
        out.head.pool = row.pool
    if row.iterations is not None:
        out.head.routing.iterations = row.iterations
    if row.grads == "off":
        out.grads.enabled = False
    elif row.grads == "every":
        out.grads.enabled, out.grads.log_every_n_steps, out.grads.per_layer = True, 1, True
    # random weights on random inputs: a vanishing-gradient warning would only be noise here
    out.grads.alarm.patience = 10**9
    validate(out)
    return out


def _grads_label(cfg: DictConfig) -> str:
    g = cfg.grads
    if not g.enabled:
        return "off"
    every = "every step" if int(g.log_every_n_steps) == 1 else f"every {g.log_every_n_steps}"
    return every + (", per layer" if g.per_layer else "")


def num_classes(cfg: DictConfig) -> int:
    """``bench.num_classes``, or the class count of ``data.name`` (no images are read)."""
    if cfg.bench.get("num_classes") is not None:
        return int(cfg.bench.num_classes)
    name = cfg.data.name
    if name == "shapes":
        from capsexp.data.datasets import SHAPES_CLASSES

        return len(SHAPES_CLASSES)
    if name in CLASS_COUNTS:
        return CLASS_COUNTS[name]
    root = Path(str(cfg.data.get("root") or "."))
    folder = root / "train" if (root / "train").is_dir() else root
    classes = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    if len(classes) < 2:
        raise UserError(f"bench cannot count the classes of data.name={name}; set bench.num_classes.")
    return len(classes)


def device_name(rt: Runtime) -> str:
    """The GPU's name, or the CPU model and the number of threads torch uses."""
    if rt.device.type == "cuda":
        return torch.cuda.get_device_name(rt.device)
    if rt.device.type == "mps":
        return f"Apple {platform.machine()} GPU (mps)"
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor() or platform.machine())
    threads = torch.get_num_threads()
    return f"{model} ({threads} thread{'s' if threads != 1 else ''})"


def _batches(cfg: DictConfig, classes: int, rt: Runtime) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(int(cfg.seed))
    size, batch = int(cfg.data.image_size), int(cfg.data.batch_size)
    pairs = [(torch.randn(batch, 3, size, size, generator=gen),
              torch.randint(0, classes, (batch,), generator=gen)) for _ in range(2)]
    if rt.device.type == "cuda":  # as the DataLoader delivers them (pin_memory on CUDA)
        pairs = [(images.pin_memory(), targets.pin_memory()) for images, targets in pairs]
    return pairs


def time_rows(cfgs: list[DictConfig], rt: Runtime, classes: int, tb_dir: Path) -> list[dict[str, Any]]:
    """Time configurations that differ only in their ``grads`` settings on one model, interleaved.

    The model, loss, optimizer, schedule and scaler are built once from ``cfgs[0]`` as ``train``
    builds them; each configuration gets its own gradient monitor. The timed steps run in blocks of
    the longest ``grads.log_every_n_steps`` among them, the configurations taking turns block by
    block, so each block holds exactly one logging step of that interval and a slow drift of the machine's
    speed (other tenants, clocks) falls on every configuration alike instead of on whichever row
    happened to run last. One configuration is simply timed step after step.
    """
    base = cfgs[0]
    warmup, steps = int(base.bench.warmup_steps), int(base.bench.steps)
    # the longest logging interval among them: the default one (an "every step" variant has 1)
    block = max(int(c.grads.log_every_n_steps) for c in cfgs) if len(cfgs) > 1 else steps
    blocks = -(-steps // block)  # per configuration
    if base.trainer.compile:
        torch._dynamo.reset()  # every row is a new model: start from an empty compile cache
    memory = PeakMemory(rt.device)
    memory.start()
    seed_everything(int(base.seed))
    loop = build_loop(base, rt, classes, warmup * len(cfgs) + blocks * block * len(cfgs), tb_dir,
                      show_progress=False)
    monitors = [loop.monitor] + [GradientMonitor(c.grads, loop.logger, loop.model, loop.total_steps, torch.empty(0))
                                 for c in cfgs[1:]]
    # a step counter per configuration: each monitor sees steps 1, 2, ... as in a run of its own,
    # so work due at a step (a logging step, a flow figure) falls on the configuration it belongs to
    states, batches = [TrainState() for _ in cfgs], _batches(base, classes, rt)
    times: list[list[float]] = [[] for _ in cfgs]
    peaks: list[float | None] = [None for _ in cfgs]

    def run(which: int, count: int, timed: bool) -> None:
        loop.monitor, state = monitors[which], states[which]
        for _ in range(count):
            images, targets = batches[state.step % len(batches)]
            ms = _timed(lambda: train_step(loop, images, targets, state), rt)
            if timed:
                times[which].append(ms)
            state.step += 1

    loop.objective.train()
    for which in range(len(cfgs)):
        run(which, warmup, timed=False)
    for index in range(blocks):
        count = min(block, steps - index * block)  # exactly bench.steps timed steps each
        for which in range(len(cfgs)):
            memory.skip_warmup()  # this block's peak only
            run(which, count, timed=True)
            peak, previous = memory.peak_mb(), peaks[which]
            peaks[which] = peak if previous is None or peak is None else max(previous, peak)
    enabled = [i for i, c in enumerate(cfgs) if c.grads.enabled]
    drift = time_drift(loop, states[enabled[0]].step, cfgs[enabled[0]], rt) if enabled else NO_DRIFT
    loop.logger.close()
    return [{**_shape(loop, int(base.data.image_size)),
             "images_per_sec": 1000 * int(base.data.batch_size) * len(ms) / sum(ms),
             "step_ms_median": statistics.median(ms), "step_ms_mean": statistics.fmean(ms),
             "peak_memory_mb": peak, **(drift if c.grads.enabled else NO_DRIFT)}
            for c, ms, peak in zip(cfgs, times, peaks)]


def _shape(loop: Loop, image_size: int) -> dict[str, Any]:
    """What the head reads: its input capsules I (None for the FC head) and the adapter's output."""
    head, side = loop.model.head, loop.model.adapter.out_size(feature_size(image_size))
    return {"input_capsules": head.input_capsules,
            "head_input": f"{loop.model.adapter.out_channels}x{side}x{side}"}


def _timed(work: Callable[[], Any], rt: Runtime) -> float:
    """Milliseconds of ``work``'s own device work: nothing queued before it, all of its own."""
    rt.synchronize()
    tick = time.perf_counter()
    work()
    rt.synchronize()
    return 1000 * (time.perf_counter() - tick)


def time_drift(loop: Loop, step: int, cfg: DictConfig, rt: Runtime) -> dict[str, float | None]:
    """Milliseconds of ``drift/<stage>`` as a run spends them, through a monitor of ``cfg``: the starting Gram
    matrices (once per run) and the median of ``bench.drift_repeats`` validations' measurements, on
    ``grads.drift.probe_images`` synthetic images (None when drift is off)."""
    count, repeats = int(cfg.grads.drift.probe_images), int(cfg.bench.drift_repeats)
    if count == 0 or repeats == 0:
        return dict(NO_DRIFT)
    size = int(cfg.data.image_size)
    images = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(int(cfg.seed) + 1))
    # a fresh probe: its starting Gram matrices are timed too
    monitor = GradientMonitor(cfg.grads, loop.logger, loop.model, loop.total_steps, images)
    start = _timed(lambda: monitor.start(rt), rt)
    validations = [_timed(lambda: monitor.on_validation(step, rt), rt) for _ in range(repeats)]
    return {"drift_start_ms": start, "drift_ms_per_validation": statistics.median(validations)}


def _ratios(rows: list[dict[str, Any]], plan_rows: list[Row]) -> None:
    # mean step times: a diagnostics step every N steps counts at its amortised cost
    by_name = {r["name"]: r for r in rows}
    off = {p.base: by_name[p.name] for p in plan_rows if p.grads == "off"}
    fc = by_name.get("fc")
    for row, p in zip(rows, plan_rows):
        row["vs_fc"] = row["step_ms_mean"] / fc["step_ms_mean"] if fc else None
        ref = off.get(p.base)
        row["vs_grads_off"] = row["step_ms_mean"] / ref["step_ms_mean"] if ref else None
        drift = row["drift_ms_per_validation"]  # in steps of this row: what a validation adds
        row["drift_vs_step"] = drift / row["step_ms_median"] if drift is not None else None


def bench(cfg: DictConfig, run_dir: Path | None = None) -> list[dict[str, Any]]:
    """Time every planned row; print a table and write ``bench.json`` into ``run_dir``."""
    validate(cfg)
    _check(cfg)
    run_dir = output_dir() if run_dir is None else run_dir
    rows_plan = plan(cfg)
    if not rows_plan:
        raise UserError("this bench has no rows: set bench.heads or bench.diagnostics to true, or name "
                        "rows in bench.rows.")
    variants = [variant(cfg, row) for row in rows_plan]  # every config checked before any timing
    classes = num_classes(cfg)
    rt = setup_runtime(cfg.trainer)
    common = {"device": device_name(rt), "precision": rt.precision, "image_size": int(cfg.data.image_size),
              "batch_size": int(cfg.data.batch_size)}
    print(f"capsexp bench: {len(rows_plan)} rows on {common['device']}, {rt.precision}, "
          f"{common['image_size']} px, batch {common['batch_size']}; {cfg.bench.warmup_steps} warm-up + "
          f"{cfg.bench.steps} timed steps each, on synthetic batches", flush=True)
    _warn_interval(cfg, rows_plan)
    results = [{**r, **common} for r in _time_rows(rows_plan, variants, rt, classes)]
    _ratios(results, rows_plan)
    report = {"memory": PeakMemory.NOTES.get(rt.device.type, "not measured on this device"),
              "inputs": "synthetic random batches (data loading not timed)",
              "warmup_steps": int(cfg.bench.warmup_steps), "steps": int(cfg.bench.steps),
              "drift": DRIFT_NOTE.format(images=int(cfg.grads.drift.probe_images)),
              "torch": str(torch.__version__), "rows": results}
    report["setup"] = (f"{common['device']}, {rt.precision}, channels-last {'on' if rt.channels_last else 'off'}, "
                       f"compile {'on' if cfg.trainer.compile else 'off'}, {common['image_size']} px, batch "
                       f"{common['batch_size']}, {cfg.bench.warmup_steps} warm-up + {cfg.bench.steps} timed "
                       f"steps, PyTorch {torch.__version__}")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / BENCH_FILE
    write_atomic(path, json.dumps(report, indent=2) + "\n")
    write_atomic(run_dir / BENCH_MARKDOWN, format_markdown(report))
    print(format_table(results))
    print(f"ms/step: median; img/s: mean; x fc, x off: mean step time over the fc row's, over the same "
          f"model's grads-off row's\npeak MB: {report['memory']}\ndrift ms, x step: {report['drift']}\n"
          f"capsexp: wrote {path} and {BENCH_MARKDOWN}", flush=True)
    return results


def _time_rows(rows: list[Row], variants: list[DictConfig], rt: Runtime, classes: int
               ) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="capsexp-bench-") as tb:
        # one untimed step first, so that one-time library set-up counts against no row's memory
        prime = copy.deepcopy(variants[0])
        prime.bench.warmup_steps, prime.bench.steps, prime.bench.drift_repeats = 0, 1, 0
        time_rows([prime], rt, classes, Path(tb) / "prime")
        # rows of one model that differ only in their diagnostics are timed together, interleaved
        measured: dict[int, dict[str, Any]] = {}
        for base in dict.fromkeys(row.base for row in rows):
            members = [i for i, row in enumerate(rows) if row.base == base]
            measured.update(zip(members, time_rows([variants[i] for i in members], rt, classes, Path(tb) / base)))
            for i in members:
                drift = measured[i]["drift_ms_per_validation"]
                print(f"  {rows[i].name}: {measured[i]['step_ms_median']:.1f} ms/step"
                      + (f", drift {drift:.1f} ms/validation" if drift is not None else ""), flush=True)
    return [{"name": row.name, "head": row.head if row.pool in (None, "avg") else f"fc-{row.pool}",
             "adapter": row.adapter, "routing": row.routing, "routing_iterations": row.iterations,
             "grads": _grads_label(row_cfg), **measured[i]} for i, (row, row_cfg) in enumerate(zip(rows, variants))]


def _warn_interval(cfg: DictConfig, rows: list[Row]) -> None:
    every, figures = int(cfg.grads.log_every_n_steps), int(cfg.grads.figure_every_n_steps)
    default = cfg.grads.enabled and any(r.grads == "default" for r in rows)
    if default and int(cfg.bench.steps) < every:
        print(f"capsexp: note: bench.steps={cfg.bench.steps} is below grads.log_every_n_steps={every}, so "
              f"rows with the default diagnostics interval time no diagnostics step; use a multiple of "
              f"{every} to count them at their share.", flush=True)
    elif default and 0 < figures and int(cfg.bench.warmup_steps) + int(cfg.bench.steps) < figures:
        print(f"capsexp: note: the rows time no gradient figure (grads.figure_every_n_steps={figures}); "
              f"bench.steps={figures} counts one at its share.", flush=True)
