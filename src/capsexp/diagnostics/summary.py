"""The run's history of per-stage measures and what ``metrics.json`` keeps of it."""

from __future__ import annotations

import math
import statistics
from typing import Any

from capsexp.diagnostics.gradients import median_over_run


class RunHistory:
    """Host values of every logging step: medians and maxima per key, the last drift."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, float]]] = []
        self.last_drift: dict[str, float] = {}
        self.last_probe: dict[str, float] = {}

    def add(self, step: int, values: dict[str, float]) -> None:
        self.records.append((step, values))

    def series(self, prefix: str, order: tuple[str, ...]) -> list[tuple[int, dict[str, float]]]:
        """``(step, {stage: value})`` for the keys under ``prefix``, stages in ``order``."""
        out = []
        for step, values in self.records:
            picked = {s: values[prefix + s] for s in order if prefix + s in values}
            if picked:
                out.append((step, picked))
        return out

    def early_to_head(self, early: list[str]) -> dict[str, float]:
        """``early/head``: median over logging steps of sqrt(sum of the trainable early stages'
        grad_norm^2) / the head's, what the vanishing-gradient alarm watches."""
        ratios = []
        for _, values in self.records:
            parts = [values[f"grad_norm/{s}"] for s in early if f"grad_norm/{s}" in values]
            head = values.get("grad_norm/head", 0.0)
            if parts and head > 0:
                ratios.append(math.sqrt(sum(p * p for p in parts)) / head)
        return {"early/head": statistics.median(ratios)} if ratios else {}

    def summary(self, early: list[str]) -> dict[str, float]:
        """Medians of every key, then ``max/<key>`` of the per-stage ones (medians hide transients),
        ``early/head``, then ``drift/<stage>`` of the last validation."""
        medians = median_over_run([values for _, values in self.records])
        maxima: dict[str, float] = {}
        for _, values in self.records:
            for key, value in values.items():
                # per-stage measures only: medians hide their transients
                if key.startswith(("grad_norm/", "update_to_weight/")) and key != "grad_norm/total" \
                        and not math.isnan(value):
                    maxima[f"max/{key}"] = max(maxima.get(f"max/{key}", -math.inf), value)
        return medians | maxima | self.early_to_head(early) | self.last_drift | self.last_probe

    def state_dict(self) -> dict[str, Any]:
        return {"records": self.records, "last_drift": self.last_drift, "last_probe": self.last_probe}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = [(int(s), dict(v)) for s, v in state.get("records", [])]
        self.last_drift = dict(state.get("last_drift", {}))
        self.last_probe = dict(state.get("last_probe", {}))


ALARMS = ("vanishing_gradients", "not_learning", "exploding")  # metrics.json: alarm/<name>, null if silent
# what the HParams table shows of a run, as ``summary/<key>`` scalars
SUMMARY_KEYS = ("val/acc", "best/val/acc", "val/loss", "early/head", "grad_norm/adapter", "grad_norm/features")
SUMMARY_PREFIXES = ("update_to_weight/", "drift/")


def summary_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """``summary/<key>`` values of a finished run, plus ``summary/alarm``: 1 when any alarm fired."""
    keep = {k: v for k, v in metrics.items() if k in SUMMARY_KEYS or k.startswith(SUMMARY_PREFIXES)}
    out = {f"summary/{k}": float(v) for k, v in keep.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    out["summary/alarm"] = float(any(metrics.get(f"alarm/{name}") for name in ALARMS))
    return out


def _cell(value: float | None, spec: str = "11.4g") -> str:
    return f"{value:{spec}}" if value is not None and math.isfinite(value) else f"{'-':>{spec.split('.')[0]}}"


def stage_table(grads: dict[str, float]) -> list[str]:
    """The terminal table: per stage, median and max gradient norm, its ratio to the head's,
    median and max update/weight, and the last drift."""
    stages = [k.split("/", 1)[1] for k in grads
              if k.startswith("grad_norm/") and k not in ("grad_norm/total", "grad_norm/features")]
    head = grads.get("grad_norm/head")
    lines = ["per stage over the run (median, max; drift at the last validation):",
             f"  {'stage':<9}{'grad_norm':>11}{'max':>11}{'/ head':>9}{'update/w':>11}{'max':>11}{'drift':>8}"]
    for s in stages:
        norm = grads[f"grad_norm/{s}"]
        rel = norm / head if head else None
        lines.append(f"  {s:<9}{_cell(norm)}{_cell(grads.get(f'max/grad_norm/{s}'))}{_cell(rel, '9.3g')}"
                     f"{_cell(grads.get(f'update_to_weight/{s}'), '11.3g')}"
                     f"{_cell(grads.get(f'max/update_to_weight/{s}'), '11.3g')}{_cell(grads.get(f'drift/{s}'), '8.3f')}")
    if "grad_norm/features" in grads:
        lines.append(f"  {'features':<9}{_cell(grads['grad_norm/features'])}"
                     f"{_cell(grads.get('max/grad_norm/features'))}   (dL/dF entering the head)")
    return lines


def why_lines(metrics: dict[str, Any]) -> list[str]:
    """The gradient ladder (median |dL/d hop| over the run, scores to features, each hop over the
    previous) and the routing telemetry (medians, in scientific notation: the effects are small)."""
    hops = [k.split("/", 1)[1] for k in metrics if k.startswith("grad_ladder/")]
    lines: list[str] = []
    if hops:
        lines.append("gradient ladder (median |dL/d hop| over the run; x: over the hop before):")
        previous = None
        for hop in hops:
            value = metrics[f"grad_ladder/{hop}"]
            ratio = f"x {value / previous:.3g}" if previous else ""
            lines.append(f"  {hop:<18}{_cell(value)}   {ratio}".rstrip())
            previous = value
    routing = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("routing/")}
    if routing:
        lines.append("routing (median over the run): " + ", ".join(
            f"{name.replace('_', ' ')} {value:.3e}" for name, value in routing.items()))
    probes = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("probe/")}
    if probes:
        lines.append("linear probe accuracy per stage (last probe): " + ", ".join(
            f"{stage} {value:.3f}" for stage, value in probes.items()))
    return lines


def print_summary(cfg: Any, metrics: dict[str, Any]) -> None:
    """The run's last lines in the terminal: the result, then the per-stage table and any alarm."""
    speed = metrics["images_per_sec"]
    speed = f"{speed:.1f} images/s" if math.isfinite(speed) else \
        f"images/s not measured (trainer.warmup_steps_excluded={cfg.trainer.warmup_steps_excluded} steps are untimed)"
    print(f"capsexp: {metrics['status']} after {metrics['steps']} steps: val/acc {metrics['val/acc']:.4f} "
          f"(best {metrics['best/val/acc']:.4f}), val/loss {metrics['val/loss']:.4f}, {speed}", flush=True)
    grads = {k: v for k, v in metrics.items() if k.split("/", 1)[0] in ("grad_norm", "update_to_weight", "max", "drift")}
    if not any(k.startswith("grad_norm/") for k in grads):
        if cfg.grads.enabled:
            print(f"no gradient statistics were logged: the run ended before step "
                  f"grads.log_every_n_steps={cfg.grads.log_every_n_steps}.", flush=True)
        return
    print("\n".join(stage_table(grads) + why_lines(metrics)), flush=True)
    for name in ALARMS:
        if metrics.get(f"alarm/{name}"):
            print(f"  ! {metrics[f'alarm/{name}']}", flush=True)
