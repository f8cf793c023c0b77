"""``capsexp bench``'s tables: the fixed-width text table it prints and the Markdown table of ``bench.md``."""

from __future__ import annotations

from typing import Any

# (text-table title, width: negative = left-aligned text, Markdown title or None, row key, format)
COLUMNS: list[tuple[str, int, str | None, str, str]] = [
    ("name", -28, "row", "name", ""), ("head", -10, None, "head", ""), ("adapter", -7, "adapter", "adapter", ""),
    ("routing", -9, "routing", "routing", ""), ("iters", 5, "routing iters", "routing_iterations", ""),
    ("I", 6, "input capsules I", "input_capsules", ""),
    ("grads", -22, "grad diagnostics", "grads", ""), ("ms/step", 9, "step ms (median)", "step_ms_median", ".1f"),
    ("img/s", 8, "images/s", "images_per_sec", ".1f"), ("peak MB", 8, "peak MB", "peak_memory_mb", ".0f"),
    ("x fc", 6, "x fc", "vs_fc", ".2f"), ("x off", 6, "x grads off", "vs_grads_off", ".2f"),
    ("drift ms", 9, "drift ms / validation", "drift_ms_per_validation", ".1f"),
    ("x step", 6, "drift in steps", "drift_vs_step", ".2f")]


def _cell(value: Any, spec: str, none: str) -> str:
    return none if value is None else format(value, spec)


def _align(text: str, width: int) -> str:
    return f"{text:<{-width}}" if width < 0 else f"{text:>{width}}"


def format_markdown(report: dict[str, Any]) -> str:
    """The bench as a Markdown table under a line saying where and how it ran (for a README)."""
    columns = [c for c in COLUMNS if c[2] is not None]
    lines = [f"{report['setup']}.", "", "| " + " | ".join(t for _, _, t, _, _ in columns if t is not None) + " |",
             "|" + "|".join("---" if width < 0 else "---:" for _, width, *_ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r[key], spec, "–") for *_, key, spec in columns) + " |" for r in report["rows"]]
    lines += ["", f"Peak MB: {report['memory']}. Drift: {report['drift']}."]
    return "\n".join(lines) + "\n"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table (step time is the median, images/s the mean)."""
    header = " ".join(_align(title, width) for title, width, *_ in COLUMNS)
    return "\n".join([header, "-" * len(header)] + [" ".join(_align(_cell(r[key], spec, "-"), width)
                                                            for _, width, _, key, spec in COLUMNS) for r in rows])
