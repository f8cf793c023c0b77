"""The Findings page, from the study's runs alone: the paired tests, the tables, the figures, and the
README's summary table. Every number in the prose is formatted by the same function as the table it comes from."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from capsexp.report.runs import Run, read_run  # noqa: E402
from capsexp.rundir.files import write_atomic  # noqa: E402
from capsexp.report.stats import NO_DIFFERENCE, Difference, binomial_se, paired_bootstrap, verdict  # noqa: E402

README_START, README_END = "<!-- findings:start -->", "<!-- findings:end -->"


def series(run: Run, tag: str) -> list[tuple[int, float]]:
    return [(s, v) for s, v in run.scalars.get(tag, []) if math.isfinite(v)]


def last(run: Run, tag: str) -> float:
    points = series(run, tag)
    return points[-1][1] if points else math.nan


def first(run: Run, tag: str) -> float:
    points = series(run, tag)
    return points[0][1] if points else math.nan


def log_median(run: Run, tag: str) -> float:
    values = [v for _, v in series(run, tag) if v > 0]
    return math.log10(statistics.median(values)) if values else math.nan


@dataclass(frozen=True)
class Measure:
    name: str
    of: Callable[[Run], float]
    scored_on: Callable[[Run], int] | None = None  # an accuracy: the images it is measured on


def val_images(run: Run) -> int:
    return int((run.metrics or {}).get("val_images") or run.config.get("data.val_size") or 0)


def probe_images(run: Run) -> int:  # the probe is scored on that many validation images
    return int(run.config.get("grads.probe.images") or 0)


MEASURES = {m.name: m for m in [
    Measure("final val/acc", lambda r: last(r, "val/acc"), val_images),
    Measure("probe stem", lambda r: last(r, "probe/stem"), probe_images),
    Measure("probe layer1", lambda r: last(r, "probe/layer1"), probe_images),
    Measure("probe layer2", lambda r: last(r, "probe/layer2"), probe_images),
    Measure("drift stem (CKA)", lambda r: last(r, "drift/stem")),
    Measure("log10 u/w stem", lambda r: log_median(r, "update_to_weight/stem")),
    Measure("log10 u/w layer1", lambda r: log_median(r, "update_to_weight/layer1")),
    Measure("log10 grad stem", lambda r: log_median(r, "grad_norm/stem")),
    Measure("log10 |dL/dF|", lambda r: log_median(r, "grad_norm/features")),
    Measure("max coupling", lambda r: last(r, "routing/max_coupling")),
    Measure("routing change", lambda r: last(r, "routing/change")),
]}


@dataclass(frozen=True)
class Test:
    claim: int
    a: str          # the reference arm
    b: str          # the arm compared with it: the difference is b - a
    measure: str
    predicts: int   # the sign of b - a the claim expects; 0: "they differ"
    primary: bool = False


def sgd_arm(runs: dict[str, list[Run]], head: str) -> str:
    """The SGD learning rate that serves ``head`` best (highest mean final val/acc), so that no head is
    judged at a rate that makes it diverge. Chosen on the validation accuracy it is then compared on."""
    options = sorted(a for a in runs if a.startswith(f"reinit-{head}-sgd"))
    return max(options, key=lambda a: mean([MEASURES["final val/acc"].of(r) for r in runs[a]]), default="")


def tests(runs: dict[str, list[Run]]) -> list[Test]:
    sgd_fc, sgd_caps = sgd_arm(runs, "fc"), sgd_arm(runs, "dynamic")
    out = [Test(1, "reinit-fc", "reinit-dynamic", "probe layer1", -1, True),
           Test(1, "reinit-fc", "reinit-dynamic", "probe stem", -1),
           Test(1, "reinit-fc", "reinit-dynamic", "final val/acc", -1),
           Test(1, "reinit-fc", "reinit-dynamic", "log10 u/w stem", -1),
           Test(1, "reinit-fc", "reinit-dynamic", "drift stem (CKA)", +1),
           *(Test(1, "reinit-fc", f"reinit-{r}", m, -1) for r in ("attention", "self", "em")
             for m in ("probe layer1", "final val/acc")),
           Test(1, sgd_fc, sgd_caps, "probe layer1", -1),
           Test(1, sgd_fc, sgd_caps, "final val/acc", -1),
           Test(1, sgd_fc, sgd_caps, "log10 u/w stem", -1),
           Test(2, "fc", "dynamic", "log10 grad stem", -1, True),
           Test(2, "fc", "ce", "log10 grad stem", -1),  # the same loss as FC's: the head alone differs
           *(Test(2, "fc", r, "log10 |dL/dF|", -1) for r in ("dynamic", "attention", "self", "em", "pooled")),
           Test(3, "dynamic-r1", "dynamic", "final val/acc", -1, True),
           Test(3, "attention-r1", "attention", "final val/acc", -1),
           Test(3, "em-r1", "em", "final val/acc", -1),
           Test(3, "dynamic", "dynamic-scale100", "max coupling", +1),
           Test(3, "dynamic", "dynamic-scale100", "final val/acc", 0),
           Test(4, "pooled", "dynamic", "final val/acc", +1, True),
           Test(4, "pooled", "none", "final val/acc", +1),
           Test(4, "pooled", "linear", "final val/acc", +1),
           Test(4, "none", "dynamic", "final val/acc", +1),
           Test(5, "dynamic", "ce", "final val/acc", 0, True),
           Test(5, "dynamic", "spread", "final val/acc", 0),
           Test(0, "fc", "dynamic", "final val/acc", 0)]  # the headline: FC against the capsule head
    return [t for t in out if t.a in runs and t.b in runs]


def mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def num(x: float, sign: bool = False) -> str:
    return "n/a" if not math.isfinite(x) else (f"{x:+.3f}" if sign else f"{x:.3f}")


def interval(d: Difference) -> str:
    return f"[{num(d.low, True)}, {num(d.high, True)}]"


@dataclass
class Result:
    test: Test
    a: float
    b: float
    diff: Difference
    verdict: str
    floor: float = 0.0


def evaluate(test: Test, runs: dict[str, list[Run]]) -> Result:
    spec = MEASURES[test.measure]
    pairs = [(spec.of(ra), spec.of(rb)) for ra, rb in zip(runs[test.a], runs[test.b])]
    pairs = [(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
    if not pairs:
        return Result(test, math.nan, math.nan, Difference(math.nan, math.nan, math.nan, 0), NO_DIFFERENCE)
    a, b = mean([x for x, _ in pairs]), mean([y for _, y in pairs])
    # an accuracy: one binomial standard error on the images it is scored on (the seeds share them)
    floor = binomial_se((a + b) / 2, spec.scored_on(runs[test.a][0])) if spec.scored_on else 0.0
    diff = paired_bootstrap([x for x, _ in pairs], [y for _, y in pairs])
    return Result(test, a, b, diff, verdict(diff, test.predicts, floor) if diff.pairs > 1 else NO_DIFFERENCE, floor)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:  # a | inside a cell (|dL/dF|) would end the cell
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|", *(line(row) for row in rows)])


def results_table(results: Sequence[Result]) -> str:
    return table(["claim", "b − a", "measure", "a", "b", "b − a", "95% CI", "noise floor", "seeds", "verdict"],
                 [[str(r.test.claim or "-"), f"{r.test.b} − {r.test.a}", r.test.measure, num(r.a), num(r.b),
                   num(r.diff.mean, True), interval(r.diff), f"±{num(r.floor)}" if r.floor else "-",
                   str(r.diff.pairs), r.verdict] for r in results])


def wall(run: Run) -> float:
    """A run's seconds from its first to its last TensorBoard event (a run the study did not time)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    times = [e.wall_time for f in sorted(run.path.glob("events.out.tfevents.*")) for e in EventFileLoader(str(f)).Load()]
    return max(times) - min(times) if times else math.nan


def arms_table(runs: dict[str, list[Run]], labels: dict[str, str], timings: dict[str, float]) -> str:
    rows = []
    for arm, seeds in runs.items():
        accs = [last(r, "val/acc") for r in seeds]
        secs = [timings.get(f"{arm}/{r.path.name}", math.nan) for r in seeds]
        rows.append([arm, labels[arm], num(mean(accs)), f"{num(min(accs))}–{num(max(accs))}",
                     num(mean([max((v for _, v in series(r, "val/acc")), default=math.nan) for r in seeds])),
                     str(min(len(series(r, "val/acc")) for r in seeds)),
                     f"{mean(secs):.0f}" if math.isfinite(mean(secs)) else "n/a"])
    return table(["arm", "what", "final val/acc (mean)", "range over seeds", "best val/acc (mean)", "validations",
                  "wall s per run"], rows)


def curve_rows(runs: dict[str, list[Run]], arms: Sequence[str], tag: str) -> tuple[list[int], dict[str, list[float]]]:
    """Mean over seeds of ``tag`` at each step every seed of every arm logged."""
    steps = sorted({s for a in arms for r in runs[a] for s, _ in series(r, tag)})
    return steps, {a: [mean([dict(series(r, tag)).get(s, math.nan) for r in runs[a]]) for s in steps] for a in arms}


def curves_table(runs: dict[str, list[Run]], arms: Sequence[str], tag: str) -> str:
    arms = [a for a in arms if a in runs]
    steps, values = curve_rows(runs, arms, tag)
    return table(["arm", *(f"step {s}" for s in steps)], [[a, *(num(v) for v in values[a])] for a in arms])


def ladder_table(runs: dict[str, list[Run]], arms: Sequence[str]) -> str:
    rows = []
    for arm in (a for a in arms if a in runs):
        hops = sorted({t.split("/", 1)[1] for r in runs[arm] for t in r.scalars if t.startswith("grad_ladder_ratio/")},
                      key=lambda h: min(s for r in runs[arm] for s, _ in series(r, f"grad_ladder/{h}") or [(0, 0)]))
        order = [t.split("/", 1)[1] for t in runs[arm][0].scalars if t.startswith("grad_ladder/")]
        for hop in [h for h in order if h in hops] or hops:
            tag = f"grad_ladder_ratio/{hop}"
            rows.append([arm, hop, num(mean([first(r, tag) for r in runs[arm]])),
                         num(mean([last(r, tag) for r in runs[arm]]))])
    return table(["arm", "hop (from the scores back to the features)", "ratio at the first step logged",
                  "ratio at the last step logged"], rows)


def routing_table(runs: dict[str, list[Run]], arms: Sequence[str]) -> str:
    tags = ("routing/entropy_deficit", "routing/max_coupling", "routing/change", "routing/gain")
    rows = [[a, *(f"{num(mean([first(r, t) for r in runs[a]]))} → {num(mean([last(r, t) for r in runs[a]]))}"
                  for t in tags)] for a in arms if a in runs]
    return table(["arm", "entropy deficit", "max coupling", "change vs uniform", "gain vs uniform"], rows)


def probe_table(runs: dict[str, list[Run]], arms: Sequence[str]) -> str:
    stages = ("stem", "layer1", "layer2")
    rows = [[a, *(f"{num(mean([first(r, f'probe/{s}') for r in runs[a]]))} → "
                  f"{num(mean([last(r, f'probe/{s}') for r in runs[a]]))}" for s in stages),
             num(mean([last(r, "drift/stem") for r in runs[a]])), num(mean([last(r, "drift/layer1") for r in runs[a]]))]
            for a in arms if a in runs]
    return table(["arm", "probe stem (start → end)", "probe layer1", "probe layer2", "drift stem (CKA)",
                  "drift layer1 (CKA)"], rows)


def figure(path: Path, panels: Sequence[tuple[str, Sequence[str], str]], runs: dict[str, list[Run]]) -> None:
    """One panel per ``(title, arms, tag)``: the mean over seeds, and the seeds' range shaded."""
    panels = [(t, [a for a in arms if a in runs], tag) for t, arms, tag in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        return
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, arms, tag) in zip(axes.flat, panels):
        steps, means = curve_rows(runs, arms, tag)
        for arm in arms:
            per_seed = [[dict(series(r, tag)).get(s, math.nan) for s in steps] for r in runs[arm]]
            lows = [min((v for v in col if math.isfinite(v)), default=math.nan) for col in zip(*per_seed)]
            highs = [max((v for v in col if math.isfinite(v)), default=math.nan) for col in zip(*per_seed)]
            (line,) = ax.plot(steps, means[arm], marker=".", label=arm)
            ax.fill_between(steps, lows, highs, color=line.get_color(), alpha=0.15)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(tag)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ladder_figure(path: Path, runs: dict[str, list[Run]], arms: Sequence[str]) -> None:
    arms = [a for a in arms if a in runs]
    if not arms:
        return
    fig, ax = plt.subplots(figsize=(8, 3.4))
    for i, arm in enumerate(arms):
        hops = [t.split("/", 1)[1] for t in runs[arm][0].scalars if t.startswith("grad_ladder/")]
        values = [mean([last(r, f"grad_ladder/{h}") for r in runs[arm]]) for h in hops]
        ax.plot(range(len(hops)), values, marker="o", label=f"{arm}: " + " → ".join(hops))
    ax.set_yscale("log")
    ax.set_xlabel("hop, from the scores back to the features")
    ax.set_ylabel("|dL/d hop| at the last step logged")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CLAIMS = {1: "Early layers cannot learn through a capsule head",
          2: "Gradients vanish on the way back through the head",
          3: "Routing struggles to form stable connections",
          4: "The direct connection is the wrong way; an adapter is needed",
          5: "The loss matters"}
HOW = {1: "Stem and layer1 of the trained backbone are re-initialised (`backbone.reinit=[stem,layer1]`); how far they "
          "recover is measured by linear probes on their outputs, by update/weight and by drift, under FC and under "
          "each routing, with AdamW and with SGD at the better of two learning rates per head. The claim predicts "
          "lower probe accuracy (and smaller updates) under the capsule head.",
       2: "The gradient ladder (`grad_ladder/<hop>`): |dL/d hop| from the scores back to the features, and the stem's "
          "gradient norm, under FC and under each head. The claim predicts a smaller gradient at the stem and at the "
          "features under the capsule head. The margin loss has another scale than FC's cross-entropy, so "
          "`ce − fc` (the capsule head trained with cross-entropy) compares the heads alone.",
       3: "Each routing against itself with one iteration (uniform coupling), and dynamic routing at "
          "`head.routing.logit_scale=100` against the paper's 1. The claim predicts that routing does not beat "
          "uniform coupling; the telemetry shows whether the couplings move.",
       4: "`head.primary.pooled=true` (primary capsules averaged over positions: the seed's code) against "
          "adapter none, linear and conv. The claim predicts that an adapter beats the seed's code.",
       5: "margin (the dynamic routing default) against cross-entropy on the lengths and spread loss, all with "
          "dynamic routing and the conv adapter. The claim predicts a difference."}
CURVE_PANELS = [("the heads (AdamW)", ("fc", "dynamic", "attention", "self", "em"), "val/acc"),
                ("routing against uniform coupling", ("dynamic", "dynamic-r1", "attention", "attention-r1", "em",
                                                      "em-r1", "dynamic-scale100"), "val/acc"),
                ("the seed's code against the adapters", ("pooled", "none", "linear", "dynamic"), "val/acc"),
                ("the losses (dynamic, conv)", ("dynamic", "ce", "spread"), "val/acc"),
                ("stem and layer1 re-initialised", ("reinit-fc", "reinit-dynamic", "reinit-attention", "reinit-self",
                                                    "reinit-em"), "val/acc")]
REINIT = ("reinit-fc", "reinit-dynamic", "reinit-attention", "reinit-self", "reinit-em", "reinit-fc-sgd0.01",
          "reinit-fc-sgd0.05", "reinit-dynamic-sgd0.01", "reinit-dynamic-sgd0.05")
HEADS = ("fc", "dynamic", "attention", "self", "em", "pooled")
ROUTED = ("dynamic", "dynamic-r1", "dynamic-scale100", "attention", "attention-r1", "self", "em", "em-r1")


def sentence(r: Result) -> str:
    return (f"**{r.verdict}**: {r.test.measure}, {r.test.b} − {r.test.a} = {num(r.diff.mean, True)} "
            f"(95% CI {interval(r.diff)}, {r.diff.pairs} paired seeds)")


def plateau(values: Sequence[float], width: float = 0.02, points: int = 3) -> bool:
    """The criterion for "trained to a plateau": the last ``points`` validations lie within ``width``."""
    tail = [v for v in values if math.isfinite(v)][-points:]
    return len(tail) == points and max(tail) - min(tail) <= width


def page(profile: Any, runs: dict[str, list[Run]], pre: Run, labels: dict[str, str], results: list[Result],
         timings: dict[str, float], command: str) -> str:
    pre_acc = series(pre, "val/acc")
    fc_steps, fc_curve = curve_rows(runs, ["fc"], "val/acc") if "fc" in runs else ([], {"fc": []})
    fc_tail = fc_curve["fc"][-2:]
    seeds = ", ".join(r.path.name.removeprefix("seed") for r in next(iter(runs.values()), []))
    total = sum(timings.values())
    out = [
        "# Findings",
        "",
        f"Generated by `{command}` from its own runs; every number below is in a table on this page. "
        f"Hardware: {profile.device}. The study as a whole is the table below; each run's wall time is in "
        "the table of arms. A seed gives every arm the same "
        "backbone, data order and validation images, so each difference below is paired by seed. "
        "Each interval is a 95% percentile bootstrap over the seeds (capsexp.report.stats). Every arm is "
        "scored on the same validation (or probe) images, so the seeds do not see those images' sampling "
        "error: for an accuracy, the noise floor is one binomial standard error on them, sqrt(p(1 − p)/n). "
        "A verdict is \"supported\" or \"not supported\" only where the interval clears the noise floor "
        "on both sides of zero; otherwise \"no difference detected at this scale\".",
        "",
        table(["runs (the pretraining included)", "wall times added up", "runs at a time", "threads per run",
               "seeds"], [[str(len(timings)), f"{total / 60:.0f} min", str(profile.jobs), str(profile.threads), seeds]]),
        "",
        "Fine-tuning overrides: `" + " ".join(profile.finetune) + "`; each arm adds its own (table below).",
        "",
        "## The backbone",
        "",
        "Pretrained with the FC head on the built-in shapes: `" + " ".join(profile.pretrain) + "`.",
        "",
        table(["step", *(str(s) for s, _ in pre_acc)], [["val/acc", *(num(v) for _, v in pre_acc)]]),
        "",
        "Plateau criterion: the last three validations lie within 0.02 of each other. "
        f"It {'holds' if plateau([v for _, v in pre_acc]) else 'does not hold'}; the backbone starts every "
        f"fine-tuning run at val/acc {num(pre_acc[-1][1]) if pre_acc else 'n/a'}.",
        "",
        "The FC baseline's plateau criterion: its mean val/acc changes by at most 0.02 between the last two "
        f"validations. Steps {', '.join(str(s) for s in fc_steps[-2:])}: "
        f"{' → '.join(num(v) for v in fc_tail)}; it "
        f"{'holds' if len(fc_tail) == 2 and abs(fc_tail[1] - fc_tail[0]) <= 0.02 else 'does not hold'}.",
        "",
        "## Every arm",
        "",
        arms_table(runs, labels, timings),
        "",
        "![validation accuracy per arm](findings_curves.png)",
        "",
        "Validation accuracy (mean over seeds) at each validation:",
        "",
        curves_table(runs, list(runs), "val/acc"),
        "",
        "## The verdicts",
        "",
        "`a` and `b` are means over seeds; `b − a` is the mean paired difference. Measures: final val/acc (the last "
        "validation); probe <stage> (a linear probe fitted on that stage's pooled output, last probe); drift "
        "(linear CKA to the start, 1 = unchanged); log10 of the run's median update/weight or gradient norm "
        "(-1 = ten times smaller); max coupling and change vs uniform at the last step logged.",
        "",
        results_table(results),
        "",
    ]
    for claim, title in CLAIMS.items():
        mine = [r for r in results if r.test.claim == claim]
        primary = next((r for r in mine if r.test.primary), None)
        out += [f"## {claim}. {title}", "", HOW[claim], ""]
        out += [f"Verdict {sentence(primary)}.", ""] if primary else ["Not run in this study.", ""]
        if mine:
            out += [results_table(mine), ""]
        if claim == 1:
            out += ["Probe accuracy and drift (mean over seeds):", "", probe_table(runs, REINIT), "",
                    "![probes](findings_probes.png)", ""]
        if claim == 2:
            out += ["The ratio of each hop's gradient to the hop before it (below 1: that hop shrinks it), mean "
                    "over seeds:", "", ladder_table(runs, HEADS), "", "![ladder](findings_ladder.png)", ""]
        if claim == 3:
            out += ["Routing telemetry, first step logged → last (mean over seeds):", "", routing_table(runs, ROUTED),
                    "", "![routing](findings_routing.png)", ""]
    out += ["## What this scale cannot tell", "",
            f"- The map: {'ResNet18 at 64 px gives a 2x2 map (128 input capsules)' if profile.name == 'cpu' else 'see the overrides above'}, "
            "not ResNet50's 7x7 at 224 px (1568 input capsules). The `gpu` profile runs the same claims at the seed's "
            "scale: `python scripts/findings.py --profile gpu` (one GPU; its page goes to outputs/findings/gpu/docs).",
            "- ResNet50 is not in the CPU profile: every verdict here is ResNet18's. The `gpu` profile's page is "
            "its own; run it where a GPU is available and compare the two pages claim by claim.",
            "- Short fine-tuning: each arm trains for `trainer.max_epochs` passes over `data.train_size` images (the "
            "overrides above); the verdicts are about that stretch, from a backbone that already solves the task, "
            "not about training from scratch.",
            "- Three seeds: a percentile interval over three pairs excludes zero only when all three seeds agree in "
            "sign, so a small effect reads as no difference. More seeds: `--seeds 0,1,2,3,4`.",
            "- The backbone was trained on the same shapes, not on ImageNet; the early stages' features are the "
            "shapes', and re-initialising them is a test of recovery, not of transfer.",
            "- SGD's learning rate is chosen per head on the same validation accuracy it is then compared on.",
            "- Probes are fitted on the probe images only (`grads.probe.images`), so their accuracy has a "
            "sampling error of several points.",
            ""]
    return "\n".join(out)


def _sgd(results: list[Result]) -> str:
    r = next((x for x in results if x.test.claim == 1 and "sgd" in x.test.a and x.test.measure == "final val/acc"),
             None)
    others = [x for x in results if x.test.claim == 1 and x.test.a == "reinit-fc" and x.test.b != "reinit-dynamic"
              and x.test.measure == "final val/acc"]
    return "; ".join(
        ([f"under SGD, {r.test.measure} {r.test.b} − {r.test.a}: {num(r.diff.mean, True)} {interval(r.diff)} "
          f"({r.verdict})"] if r else []) +
        (["final val/acc against FC's, AdamW, per routing: " +
          ", ".join(f"{x.test.b.removeprefix('reinit-')} {num(x.diff.mean, True)} ({x.verdict})" for x in others)]
         if others else []))


def _each_routing(results: list[Result]) -> str:
    mine = [x for x in results if x.test.claim == 2 and x.test.measure == "log10 |dL/dF|"]
    return ("log10 |dL/dF| against FC's, per head: " +
            ", ".join(f"{x.test.b} {num(x.diff.mean, True)} ({x.verdict})" for x in mine)) if mine else ""


SUMMARY_MORE: dict[int, Callable[[list[Result]], str]] = {1: _sgd, 2: _each_routing}


def summary(results: list[Result]) -> str:
    """The README's block: each claim's primary test, one table row (its seeds and interval), and the
    comparisons that qualify it; every number there comes from this table."""
    rows = []
    for claim, title in CLAIMS.items():
        r = next((x for x in results if x.test.claim == claim and x.test.primary), None)
        if r:
            rows.append([f"{claim}. *{title}*", f"**{r.verdict}**", f"{r.test.measure}: {r.test.b} − {r.test.a}",
                         num(r.diff.mean, True), interval(r.diff), str(r.diff.pairs),
                         SUMMARY_MORE.get(claim, lambda _: "")(results) or "-"])
    header = ["claim", "verdict", "measure: b − a", "mean difference", "95% CI", "paired seeds", "qualified by"]
    link = "The runs, every comparison and what this scale cannot tell: [docs/findings.md](docs/findings.md)."
    return "\n".join([README_START, table(header, rows), "", link, README_END])


def write_docs(out: Path, docs: Path, readme: Path | None, profile: Any, arms: Sequence[Any],
               all_arms: Sequence[Any]) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    runs = {a.name: [read_run(out / a.name / f"seed{s}", out) for s in profile.seeds] for a in arms}
    runs = {name: seeds for name, seeds in runs.items() if all(r.metrics for r in seeds)}
    labels = {a.name: a.label + ": `" + " ".join(a.overrides) + "`" for a in all_arms}
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    for arm, seeds in runs.items():  # a run the study did not time (it was stopped meanwhile): its events
        for run in seeds:
            timings.setdefault(f"{arm}/{run.path.name}", wall(run))
    timings = {k: v for k, v in timings.items() if k == "pretrain" or k.split("/")[0] in runs}
    results = [evaluate(t, runs) for t in tests(runs)]
    figure(docs / "findings_curves.png", CURVE_PANELS, runs)
    figure(docs / "findings_probes.png", [("probe stem", REINIT, "probe/stem"), ("probe layer1", REINIT, "probe/layer1"),
                                          ("probe layer2", REINIT, "probe/layer2")], runs)
    figure(docs / "findings_routing.png", [("max coupling", ROUTED, "routing/max_coupling"),
                                           ("change vs uniform", ROUTED, "routing/change"),
                                           ("entropy deficit", ROUTED, "routing/entropy_deficit")], runs)
    ladder_figure(docs / "findings_ladder.png", runs, HEADS)
    command = "python scripts/findings.py" + ("" if profile.name == "cpu" else f" --profile {profile.name}")
    text = page(profile, runs, read_run(out / "pretrain", out), labels, results, timings, command)
    write_atomic(docs / "findings.md", text)
    write_atomic(out / "summary.md", summary(results) + "\n")
    if readme is not None:
        old = readme.read_text()
        start, end = old.find(README_START), old.find(README_END)
        if start < 0 or end < start:
            raise SystemExit(f"findings: {readme} has no {README_START} ... {README_END} block to replace.")
        write_atomic(readme, old[:start] + summary(results) + old[end + len(README_END):])
