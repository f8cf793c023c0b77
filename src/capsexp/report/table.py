"""The rows and tables of ``capsexp report``: labels, what each run measured, the seed spread,
and the terminal, Markdown and CSV forms.

``early/head`` is what the vanishing-gradient alarm watches: at each logged step the combined L2
norm of the trainable stages among stem and layer1, ``sqrt(stem^2 + layer1^2)``, over
``grad_norm/head``; the median over the run (from metrics.json's medians without event files).
"""

from __future__ import annotations

import csv
import io
import math
import re
import statistics
from pathlib import Path
from typing import Any, Sequence

from capsexp.report.runs import IGNORED_KEYS, Run
from capsexp.rundir.files import write_atomic
from capsexp.diagnostics.summary import ALARMS
from capsexp.models.stages import STAGES

# a run that predates metrics.json's early/head: the alarm's default early stages
EARLY_STAGES = ("stem", "layer1")
RUNNING = "running/crashed"
ENTROPY_TAG = "capsule/coupling_entropy/iter"
TEXT_COLUMNS = frozenset({"run", "routing", "status", "alarms", "alarm"})
# what the seed table summarises of each group of runs that differ only by their seed
SEED_KEYS = ("best_val_acc", "early/head", "update_to_weight/stem", "update_to_weight/layer1", "drift/stem",
             "drift/layer1")
SHORT = {"best_val_acc": "best acc", "early/head": "early/head", "update_to_weight/stem": "u/w stem",
         "update_to_weight/layer1": "u/w layer1", "drift/stem": "drift stem", "drift/layer1": "drift layer1"}
SEED_DISPLAY = [("run", "runs (seeds)"), *((c, t) for k in SEED_KEYS for c, t in ((k, SHORT[k]), (f"spread/{k}", "±")))]



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


def _last(run: Run, tag: str) -> float | None:
    values = _series(run, tag)
    return values[-1] if values else None


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
    present = [v for s in EARLY_STAGES if (v := grads[s]) is not None]
    head_norm = grads["head"]
    if present and head_norm:
        return math.sqrt(sum(v * v for v in present)) / head_norm
    return None


def summarize(run: Run) -> dict[str, Any]:
    """One table row: metrics.json where it has a finite value, the event files otherwise."""
    m = run.metrics or {}
    val = _series(run, "val/acc")
    steps = max((s for points in run.scalars.values() for s, _ in points), default=None)
    grads = {s: _finite(m.get(f"grad_norm/{s}"), _median(run, f"grad_norm/{s}")) for s in STAGES}
    fired = [name for name in ALARMS if m.get(f"alarm/{name}")]
    alarm = "; ".join(str(m[f"alarm/{name}"]) for name in fired) or run.alarm
    return {
        "routing": routing_label(run),
        "status": (f"failed: {m['reason']}" if "reason" in m else str(m.get("status", "completed")))
        if run.metrics is not None else RUNNING,
        "steps": None if (n := _finite(m.get("steps"), steps)) is None else int(n),
        "best_val_acc": _finite(m.get("best/val/acc"), max(val, default=None)),
        "final_val_acc": _finite(m.get("val/acc"), val[-1] if val else None),
        "images_per_sec": _finite(m.get("images_per_sec"), _last(run, "throughput/images_per_sec")),
        **{f"grad_norm/{s}": v for s, v in grads.items()},
        "early/head": _finite(m.get("early/head"), early_to_head(run, grads)),
        **{f"update_to_weight/{s}": _finite(m.get(f"update_to_weight/{s}"), _median(run, f"update_to_weight/{s}"))
           for s in STAGES},
        **{f"drift/{s}": _finite(m.get(f"drift/{s}"), _last(run, f"drift/{s}")) for s in STAGES},
        **coupling_entropy(run),
        **{k: v for k, v in m.items() if k.startswith(("grad_ladder/", "routing/", "probe/"))
           and isinstance(v, (int, float)) and math.isfinite(v)},
        "alarms": ",".join(fired) or ("yes" if run.alarm else ""),
        "alarm": str(alarm) if alarm else "",
    }


def routing_label(run: Run) -> str:
    """``dynamic-r3``, ``em-r2``, ``self`` for a capsule head; ``(fc avg)``, ``(fc max)`` for an FC head."""
    head = setting(run, "head") or "?"
    if head == "capsule":
        routing = setting(run, "head.routing.name") or "dynamic"  # runs before the routing registry
        iterations = setting(run, "head.routing.iterations")
        return routing + (f"-r{iterations}" if routing != "self" and iterations else "")
    return f"({head} {setting(run, 'head.pool') or 'avg'})"


def coupling_entropy(run: Run) -> dict[str, float | None]:
    """``entropy/iter<k>``: the last logged coupling entropy of each routing iteration (capsule
    runs), beside ``log J``: uniform coupling over the J classes, what routing starts from."""
    tags = sorted((t for t in run.scalars if t.startswith(ENTROPY_TAG)), key=lambda t: int(t[len(ENTROPY_TAG):]))
    out: dict[str, float | None] = {f"entropy/iter{t[len(ENTROPY_TAG):]}": _last(run, t) for t in tags}
    classes = (run.metrics or {}).get("num_classes")
    if out and isinstance(classes, int) and classes > 0:
        out["entropy/uniform"] = math.log(classes)
    return out


def build_rows(runs: Sequence[Run]) -> tuple[list[str], list[dict[str, Any]]]:
    """The differing keys and one row per run (``run`` label, ``folder``, settings, numbers)."""
    keys = differing_keys(runs)
    return keys, [{"run": label, "folder": run.name, **{k: setting(run, k) or "" for k in keys}, **summarize(run)}
                  for label, run in zip(labels(runs, keys), runs)]


FORMATS = {"steps": "{:.0f}", "best_val_acc": "{:.3f}", "final_val_acc": "{:.3f}", "images_per_sec": "{:.1f}"}


def _fmt(key: str, value: Any) -> str:
    if value is None or value == "":
        return ""
    spec = FORMATS.get(key) or ("{:.3f}" if key.startswith(("drift/", "entropy/", "spread/drift/", "spread/best",
                                                            "probe/"))
                                else "{:.3e}" if key.startswith("routing/") else "{:.3g}")
    return spec.format(value) if isinstance(value, (int, float)) else str(value)


DISPLAY = [("run", "run"), ("routing", "routing"), ("status", "status"), ("steps", "steps"), ("best_val_acc", "best acc"),
           ("final_val_acc", "final acc"), ("images_per_sec", "img/s"),
           *((f"grad_norm/{s}", s) for s in STAGES), ("early/head", "early/head"), ("alarms", "alarm")]
# why, from metrics.json: one table each, columns as the runs name them (title, key prefix)
WHY_TABLES = [("gradient ladder: median |dL/d hop| over the run, from the scores to the features", "grad_ladder/"),
              ("routing, median over the run (entropy deficit: log J - H in nats; change: against uniform "
               "coupling)", "routing/"),
              ("linear probe accuracy per stage, last probe", "probe/")]
# the per-stage learning measures, one table each: (title, key prefix)
STAGE_TABLES = [("median update/weight per stage (one step's ||dw|| / ||w||)", "update_to_weight/"),
                ("drift per stage at the last validation (linear CKA to the start; 1 = unchanged)", "drift/")]


def table_cells(rows: Sequence[dict[str, Any]], display: Sequence[tuple[str, str]] = DISPLAY
                ) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of one table."""
    cells = [[_fmt(key, row.get(key)) for key, _ in display] for row in rows]
    return [title for _, title in display], cells


def tables(rows: Sequence[dict[str, Any]]) -> list[tuple[str, list[tuple[str, str]], list[dict[str, Any]]]]:
    """Every table of the report: (title, columns, rows); a table with no values is left out."""
    out = [("runs (stem..head: median gradient norm per stage)", DISPLAY, list(rows))]
    for title, prefix in STAGE_TABLES:
        display = [("run", "run"), *((f"{prefix}{s}", s) for s in STAGES)]
        if any(row.get(f"{prefix}{s}") is not None for row in rows for s in STAGES):
            out.append((title, display, list(rows)))
    for title, prefix in WHY_TABLES:
        keys = list(dict.fromkeys(k for row in rows for k in row if k.startswith(prefix)))
        if keys:
            display = [("run", "run"), *((k, k[len(prefix):]) for k in keys)]
            out.append((title, display, [row for row in rows if any(k in row for k in keys)]))
    routed = [row for row in rows if "entropy/uniform" in row or "entropy/iter1" in row]
    if routed:
        iters = sorted({k for row in routed for k in row if k.startswith("entropy/iter")}, key=lambda k: int(k[12:]))
        display = [("run", "run"), *((k, k.split("/")[1]) for k in iters), ("entropy/uniform", "log J")]
        out.append(("coupling entropy per routing iteration, last logged step (log J: uniform)", display, routed))
    groups = seed_groups(rows)
    if groups:
        out.append(("over seeds: mean, and the spread (max - min) across seeds", SEED_DISPLAY, groups))
    return out


def format_tables(rows: Sequence[dict[str, Any]]) -> str:
    """Every table as aligned text for the terminal, each under its title."""
    return "\n\n".join(f"{title}:\n{format_table(rows_, display)}" if i else format_table(rows_, display)
                        for i, (title, display, rows_) in enumerate(tables(rows)))


def format_table(rows: Sequence[dict[str, Any]], display: Sequence[tuple[str, str]] = DISPLAY) -> str:
    """One table as aligned text for the terminal: text left, numbers right."""
    header, cells = table_cells(rows, display)
    widths = [max(len(c) for c in col) for col in zip(header, *cells)]
    left = {i for i, (key, _) in enumerate(display) if key in TEXT_COLUMNS}

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


def _markdown_table(rows: Sequence[dict[str, Any]], display: Sequence[tuple[str, str]]) -> list[str]:
    header, cells = table_cells(rows, display)
    align = [":--" if key in TEXT_COLUMNS else "--:" for key, _ in display]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(map(markdown_text, row)) + " |" for row in cells)]


def format_markdown(rows: Sequence[dict[str, Any]], root: Path, note: str | None = None) -> str:
    """report.md: the tables, what the columns mean, the alarm messages, the figure."""
    out = [f"# capsexp report: {markdown_text(root)}", "", *([markdown_text(note), ""] if note else [])]
    for i, (title, display, rows_) in enumerate(tables(rows)):
        out += [*([f"### {title}", ""] if i else []), *_markdown_table(rows_, display), ""]
        if i == 0:
            out += ["stem..head: median gradient L2 norm per stage over the run (blank: frozen or absent). "
                    "early/head: median over logged steps of sqrt(stem^2 + layer1^2) / head, over the trainable "
                    f"early stages. alarm: the conditions that fired. status `{RUNNING}`: no metrics.json "
                    "(values from the event files).", ""]
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
    numbers = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in ("run", "folder", "routing",
               "status", "alarms", "alarm", *keys)]
    columns = ["run", "folder", *keys, "routing", "status", *numbers, "alarms", "alarm"]
    handle = io.StringIO(newline="")
    writer = csv.DictWriter(handle, fieldnames=[csv_cell(c) for c in columns], extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({csv_cell(k): "" if row.get(k) is None else csv_cell(row[k]) for k in columns})
    write_atomic(path, handle.getvalue())


def seed_groups(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs that differ only by ``seed``, grouped: the mean of each ``SEED_KEYS`` value and its
    spread (max - min); empty when no two runs share everything but the seed."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        label = ",".join(p for p in str(row["run"]).split(",") if not p.startswith("seed="))
        groups.setdefault(label, []).append(row)
    out = []
    for label, members in groups.items():
        if len(members) < 2 or not any("seed=" in str(r["run"]) for r in members):
            continue
        entry: dict[str, Any] = {"run": f"{label or 'all'} ({len(members)})"}
        for key in SEED_KEYS:
            values = [r[key] for r in members if r.get(key) is not None]
            entry[key] = statistics.fmean(values) if values else None
            entry[f"spread/{key}"] = max(values) - min(values) if len(values) > 1 else None
        out.append(entry)
    return out
