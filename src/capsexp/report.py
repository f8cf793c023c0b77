"""``capsexp report <folder>``: every run below a folder, side by side.

A run is any folder holding TensorBoard event files or ``metrics.json`` (event files of runs made
before they moved into the run folder itself are read from its ``tb/``). The report reads what each run was run with
(``.hydra/overrides.yaml``, else ``config.yaml``), ``metrics.json`` and the TensorBoard scalars,
prints a table and writes ``report.md``, ``report.csv`` and ``report.png`` into the folder. A run
without ``metrics.json`` is ``running/crashed`` and shows what its event files hold; a frozen stage
logs no gradient tags and shows as blank, never as zero.

``early/head`` is what the vanishing-gradient alarm watches: at each logged step the combined L2
norm of the trainable stages among stem and layer1, ``sqrt(stem^2 + layer1^2)``, over
``grad_norm/head``; the median over the run (from metrics.json's medians without event files).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml

from capsexp.chance import accuracy_meaningless, chance_level, short_note
from capsexp.config import flatten
from capsexp.errors import UserError

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "adapter", "head")
EARLY_STAGES = ("stem", "layer1")
RUNNING = "running/crashed"
IGNORED_KEYS = frozenset({"trainer.resume"})  # continuing a run does not make it a different run
ALARM_TAG = "alarm/vanishing_gradients"
EVENTS_PREFIX = "events.out.tfevents."  # TensorBoard's event file names
NUMBERS = ("steps", "best_val_acc", "final_val_acc", "images_per_sec",
           *(f"grad_norm/{s}" for s in STAGES), "early/head")


@dataclass
class Run:
    """What one run folder holds; ``metrics`` is None while it runs or after a crash."""

    path: Path
    name: str
    overrides: dict[str, str] | None  # .hydra/overrides.yaml; None for a run not launched by the CLI
    config: dict[str, Any]            # flattened, resolved
    metrics: dict[str, Any] | None
    scalars: dict[str, list[tuple[int, float]]]
    alarm: str | None


# ---------------------------------------------------------------- discovery and reading

def find_runs(root: Path) -> list[Path]:
    """Every folder at or below ``root`` holding event files (or ``tb/``) or ``metrics.json``; runs
    are not searched inside."""
    runs = []
    for here, subdirs, files in os.walk(root):
        if "metrics.json" in files or "tb" in subdirs or any(f.startswith(EVENTS_PREFIX) for f in files):
            runs.append(Path(here))
            subdirs.clear()
        else:  # .hydra, .submitit and the like hold no runs
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
    return sorted(runs)


def parse_overrides(items: Iterable[Any]) -> dict[str, str]:
    """``key=value`` strings as a dict keyed like the config (``+key`` and ``key@pkg`` as ``key``)."""
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.lstrip("+~").split("@")[0]
        if sep and key not in IGNORED_KEYS:
            out[key] = value
    return out


def _load(path: Path, parse: Callable[[str], Any]) -> Any:
    """A file's parsed content; None when absent, half-written or damaged."""
    try:
        return parse(path.read_text()) if path.is_file() else None
    except (OSError, ValueError, yaml.YAMLError):
        return None


def read_events(tb: Path) -> tuple[dict[str, list[tuple[int, float]]], str | None]:
    """All scalar points and the alarm text from a run's event files; nothing when unreadable."""
    if not tb.is_dir():
        return {}, None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    try:
        acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "tensors": 0, "images": 1,
                                                       "histograms": 1})
        acc.Reload()
        tags = acc.Tags()
        scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags["scalars"]}
        alarm = None
        for tag in tags["tensors"]:  # add_text stores "<tag>/text_summary"
            if tag.startswith(ALARM_TAG) and acc.Tensors(tag):
                alarm = acc.Tensors(tag)[0].tensor_proto.string_val[0].decode("utf-8", "replace")
        return scalars, alarm
    except Exception:  # noqa: BLE001 -- a file being written or damaged must not stop the report
        return {}, None


def read_run(path: Path, root: Path) -> Run:
    """Read one run folder; anything missing or unreadable is simply absent."""
    config = _load(path / "config.yaml", yaml.safe_load) or _load(path / ".hydra" / "config.yaml", yaml.safe_load)
    listed = _load(path / ".hydra" / "overrides.yaml", yaml.safe_load)
    metrics = _load(path / "metrics.json", json.loads)
    scalars, alarm = read_events(path / "tb" if (path / "tb").is_dir() else path)  # tb/: older runs
    name = path.relative_to(root).as_posix() if path != root else path.resolve().name
    return Run(path, name, parse_overrides(listed) if isinstance(listed, list) else None,
               flatten(config) if isinstance(config, dict) else {},
               metrics if isinstance(metrics, dict) else None, scalars, alarm)


# ---------------------------------------------------------------- labels and the table

def _text(value: Any) -> str:
    """A config value written the way an override would write it."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return "[" + ",".join(map(_text, value)) + "]" if isinstance(value, list) else str(value)


def setting(run: Run, key: str) -> str | None:
    """A run's value for ``key``: its resolved config (``key``, or ``key.name`` for a group), else
    its override; None when the run does not say."""
    for name in (key, f"{key}.name"):
        if name in run.config:
            return _text(run.config[name])
    return (run.overrides or {}).get(key)


def _candidates(run: Run) -> set[str]:
    if run.overrides is not None:
        return set(run.overrides)
    # not launched by the CLI: every config value may be what differs, a group by its name
    return {k[:-5] if k.endswith(".name") else k for k in run.config} - IGNORED_KEYS


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """Keys whose known values are not the same in every run, sorted.

    A key under a group whose choice differs (``head.primary.types`` when ``head`` differs) is left
    out unless a run set it on its command line: the group choice already says it.
    """
    keys = sorted(set().union(*map(_candidates, runs)))
    differ = [k for k in keys if len({setting(run, k) for run in runs} - {None}) > 1]
    chosen = set().union(*(run.overrides or {} for run in runs))
    return [k for k in differ if k in chosen or not any(k.startswith(f"{p}.") for p in differ)]


def _shown(run: Run, key: str) -> bool:
    """A run's label names a differing key it has a value for, but not a null it did not set."""
    value = setting(run, key)
    return value is not None and (value != "null" or key in (run.overrides or {}))


def labels(runs: Sequence[Run], keys: Sequence[str]) -> list[str]:
    """``key=value,...`` over the differing keys; the folder name when nothing is known or names clash."""
    out = [",".join(f"{k}={setting(run, k)}" for k in keys if _shown(run, k)) or run.name for run in runs]
    return [f"{label} ({run.name})" if out.count(label) > 1 else label for label, run in zip(out, runs)]


def _finite(*values: Any) -> float | None:
    """The first value that is a finite number."""
    for value in values:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def _series(run: Run, tag: str) -> list[float]:
    return [v for _, v in run.scalars.get(tag, []) if math.isfinite(v)]


def _median(run: Run, tag: str) -> float | None:
    values = _series(run, tag)
    return statistics.median(values) if values else None


def early_to_head(run: Run, grads: dict[str, float | None]) -> float | None:
    """Median over logged steps of sqrt(sum of trainable early stages^2) / head; see the module doc."""
    head = dict(run.scalars.get("grad_norm/head", []))
    early = [dict(run.scalars[f"grad_norm/{s}"]) for s in EARLY_STAGES if f"grad_norm/{s}" in run.scalars]
    ratios = [math.sqrt(sum(e[step] ** 2 for e in early)) / h for step, h in head.items()
              if early and h > 0 and all(step in e for e in early)]
    ratios = [r for r in ratios if math.isfinite(r)]
    if ratios:
        return statistics.median(ratios)
    present = [grads[s] for s in EARLY_STAGES if grads[s] is not None]
    if present and grads["head"]:
        return math.sqrt(sum(v * v for v in present)) / grads["head"]
    return None


def summarize(run: Run) -> dict[str, Any]:
    """One table row: metrics.json where it has a finite value, the event files otherwise."""
    m = run.metrics or {}
    val = _series(run, "val/acc")
    steps = max((s for points in run.scalars.values() for s, _ in points), default=None)
    grads = {s: _finite(m.get(f"grad_norm/{s}"), _median(run, f"grad_norm/{s}")) for s in STAGES}
    alarm = m.get("alarm/vanishing_gradients") or run.alarm
    return {
        "status": str(m.get("status", "completed")) if run.metrics is not None else RUNNING,
        "steps": None if (n := _finite(m.get("steps"), steps)) is None else int(n),
        "best_val_acc": _finite(m.get("best/val/acc"), max(val, default=None)),
        "final_val_acc": _finite(m.get("val/acc"), val[-1] if val else None),
        "images_per_sec": _finite(m.get("images_per_sec"),
                                  (_series(run, "throughput/images_per_sec") or [None])[-1]),
        **{f"grad_norm/{s}": v for s, v in grads.items()},
        "early/head": early_to_head(run, grads),
        "alarm": str(alarm) if alarm else "",
    }


def build_rows(runs: Sequence[Run]) -> tuple[list[str], list[dict[str, Any]]]:
    """The differing keys and one row per run (``run`` label, ``folder``, settings, numbers)."""
    keys = differing_keys(runs)
    return keys, [{"run": label, "folder": run.name, **{k: setting(run, k) or "" for k in keys}, **summarize(run)}
                  for label, run in zip(labels(runs, keys), runs)]


FORMATS = {"steps": "{:.0f}", "best_val_acc": "{:.3f}", "final_val_acc": "{:.3f}", "images_per_sec": "{:.1f}"}


def _fmt(key: str, value: Any) -> str:
    if value is None or value == "":
        return ""
    return FORMATS.get(key, "{:.3g}").format(value) if isinstance(value, (int, float)) else str(value)


DISPLAY = [("run", "run"), ("status", "status"), ("steps", "steps"), ("best_val_acc", "best acc"),
           ("final_val_acc", "final acc"), ("images_per_sec", "img/s"),
           *((f"grad_norm/{s}", s) for s in STAGES), ("early/head", "early/head"), ("alarm", "alarm")]


def table_cells(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the comparison table (the alarm column says ``yes``)."""
    cells = [[("yes" if row["alarm"] else "") if key == "alarm" else _fmt(key, row[key])
              for key, _ in DISPLAY] for row in rows]
    return [title for _, title in DISPLAY], cells


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The table as aligned text for the terminal: text left, numbers right."""
    header, cells = table_cells(rows)
    widths = [max(len(c) for c in col) for col in zip(header, *cells)]
    left = {0, 1, len(header) - 1}

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, cells)])


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def markdown_text(value: Any) -> str:
    """Text from a run folder as literal Markdown: it cannot end a table row or a line, open a code
    span, emphasis or a link, nor carry HTML."""
    text = " ".join(str(value).splitlines())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def format_markdown(rows: Sequence[dict[str, Any]], root: Path, note: str | None = None) -> str:
    """report.md: the table, what the columns mean, the alarm messages, the figure."""
    header, cells = table_cells(rows)
    out = [f"# capsexp report: {markdown_text(root)}", "", *([markdown_text(note), ""] if note else []),
           "| " + " | ".join(header) + " |",
           "|" + "|".join(":--" if i < 2 else "--:" for i in range(len(header))) + "|",
           *("| " + " | ".join(map(markdown_text, row)) + " |" for row in cells), "",
           "stem..head: median gradient L2 norm per stage over the run (blank: frozen or absent). "
           "early/head: median over logged steps of sqrt(stem^2 + layer1^2) / head, over the trainable "
           f"early stages. status `{RUNNING}`: no metrics.json (values from the event files).", ""]
    out += [f"- alarm in {markdown_text(row['run'])}: {markdown_text(row['alarm'])}" for row in rows if row["alarm"]]
    return "\n".join([*out, "", "![report](report.png)", ""])


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def csv_cell(value: Any) -> Any:
    """A cell no spreadsheet evaluates: text that starts like a formula gets a leading ' (OWASP's
    advice against CSV injection). Numbers stay numbers, and so does text that is just a number
    (an override such as seed=-1): a spreadsheet reads that as the number, runs nothing."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def write_csv(rows: Sequence[dict[str, Any]], keys: Sequence[str], path: Path) -> None:
    """report.csv: full precision, blank where there is no value, no cell a spreadsheet would run."""
    columns = ["run", "folder", *keys, "status", *NUMBERS, "alarm"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[csv_cell(c) for c in columns], extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({csv_cell(k): "" if row[k] is None else csv_cell(row[k]) for k in columns})


# ---------------------------------------------------------------- the figure

def plot(runs: Sequence[Run], rows: Sequence[dict[str, Any]], path: Path) -> None:
    """report.png: ``report_figure`` as a PNG file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(report_figure(runs, rows)).print_png(str(path))


def report_figure(runs: Sequence[Run], rows: Sequence[dict[str, Any]]) -> Any:
    """Median gradient norm per stage (log y) and validation accuracy per step (0 to 1, chance
    dashed), a line per run; a matplotlib Figure."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:  # headless, as in capsexp.figures; pyplot is never used
        matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    stages = [s for s in STAGES if any(row[f"grad_norm/{s}"] is not None for row in rows)]
    fig = Figure(figsize=(13, 5.5), dpi=110, layout="constrained")
    grads_ax, acc_ax = fig.subplots(1, 2)
    for i, (run, row) in enumerate(zip(runs, rows)):
        color = matplotlib.colormaps["tab20" if len(rows) > 10 else "tab10"](i % 20)
        points = [(x, row[f"grad_norm/{s}"]) for x, s in enumerate(stages)
                  if row[f"grad_norm/{s}"] is not None and row[f"grad_norm/{s}"] > 0]
        if points:  # frozen stages are skipped, so a line starts at the first trainable stage
            grads_ax.plot(*zip(*points), marker="o", color=color, label=row["run"])
        val = run.scalars.get("val/acc", [])
        if val:
            acc_ax.plot(*zip(*val), marker=".", color=color, label=None if points else row["run"])
    for chance in sorted({c for c in (chance_level(run.metrics, run.config) for run in runs) if c}):
        acc_ax.axhline(chance, color="0.35", linestyle="--", linewidth=1, label=f"chance (1/{round(1 / chance)})")
    grads_ax.set(yscale="log", xticks=range(len(stages)), xticklabels=stages, xlabel="stage",
                 ylabel="median gradient norm", title="gradient norm per stage (median over the run)")
    acc_ax.set(xlabel="step", ylabel="val/acc", title="validation accuracy", ylim=(0, 1))  # never zoomed in
    acc_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (grads_ax, acc_ax):
        ax.grid(True, alpha=0.3)
    if any(ax.get_legend_handles_labels()[0] for ax in (grads_ax, acc_ax)):
        fig.legend(loc="outside lower center", ncol=min(3, len(rows)), fontsize=8)
    return fig


# ---------------------------------------------------------------- the command

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capsexp report", description=(
        "Compare every run below FOLDER (a run folder, a sweep folder, or outputs/): print a table "
        "and write report.md, report.csv and report.png into FOLDER."))
    parser.add_argument("folder", type=Path, help="a folder holding runs (folders with event files or metrics.json)")
    return parser


def main(argv: list[str]) -> None:
    """``capsexp report <folder>``: raises UserError for a missing folder or one without runs."""
    root = _parser().parse_args(argv).folder
    if not root.is_dir():
        raise UserError(f"'{root}' is not a folder; pass a run or sweep folder, "
                        f"e.g. outputs/multirun/<date>/<time>.")
    runs = [read_run(path, root) for path in find_runs(root)]
    if not runs:
        raise UserError(f"no runs below '{root}': a run folder holds TensorBoard event files or metrics.json.")
    keys, rows = build_rows(runs)
    meaningless = [accuracy_meaningless(row["steps"], row["best_val_acc"], run.metrics, run.config)
                   for run, row in zip(runs, rows)]
    note = short_note([row["run"] for row in rows], meaningless)
    try:  # the files first: `capsexp report ... | head` may close the terminal side early
        (root / "report.md").write_text(format_markdown(rows, root, note))
        write_csv(rows, keys, root / "report.csv")
        plot(runs, rows, root / "report.png")
    except OSError as exc:
        raise UserError(f"could not write the report into '{root}': {exc.strerror or exc}.") from None
    print(format_table(rows))
    for row in (r for r in rows if r["alarm"]):
        print(f"  ! {row['run']}: {row['alarm']}")
    if note:
        print(note)
    print(f"capsexp: {len(runs)} run{'s' if len(runs) != 1 else ''}; wrote report.md, report.csv and "
          f"report.png to {root}")
