"""scripts/findings.py, the Findings study, end to end at toy size: the runs, the page, the resumption."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "findings.py"


def study(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_study_writes_its_page_and_a_rerun_only_rewrites_it(tmp_path: Path) -> None:
    out, readme = tmp_path / "study", tmp_path / "README.md"
    readme.write_text("# x\n<!-- findings:start -->\nold\n<!-- findings:end -->\ntail\n")
    args = ("--tiny", "--out", str(out), "--arms", "fc,dynamic,pooled", "--seeds", "0,1", "--readme", str(readme))
    first = study(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert [line for line in first.stdout.splitlines() if line.endswith("/seed1")] == [
        "findings: fc/seed1", "findings: dynamic/seed1", "findings: pooled/seed1"]
    page = (out / "docs" / "findings.md").read_text()
    assert "| 4 | dynamic − pooled | final val/acc |" in page  # claim 4's test, from the runs just made
    for figure in ("findings_curves.png", "findings_ladder.png"):
        assert (out / "docs" / figure).stat().st_size > 1000
    text = readme.read_text()
    # a table: claims 2 and 4 have their arms here (fc, dynamic, pooled), each with its interval and seeds
    header, _, *rows = text.splitlines()[2:-1]
    assert header.startswith("| claim | verdict | measure: b − a | mean difference | 95% CI | paired seeds |")
    assert rows[0].startswith("| 2. *Gradients vanish") and rows[1].startswith("| 4. *The direct connection")
    assert rows[0].split(" | ")[5] == "2"  # two paired seeds
    assert "log10 \\|dL/dF\\| against FC's, per head: dynamic " in rows[0]  # a | inside a cell is escaped
    assert text.startswith("# x\n<!-- findings:start -->\n") and text.endswith("<!-- findings:end -->\ntail\n")
    assert "old" not in text and len(text.splitlines()) <= 10

    # a run that stopped before its first checkpoint starts again; finished ones are skipped
    shutil.rmtree(out / "pooled" / "seed1" / "checkpoints")
    (out / "pooled" / "seed1" / "metrics.json").unlink()
    again = study(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [line for line in again.stdout.splitlines() if "/seed" in line] == ["findings: pooled/seed1"]
    assert (out / "pooled" / "seed1" / "metrics.json").exists()


@pytest.mark.slow
def test_the_gpu_profile_runs_at_toy_size_on_a_cpu(tmp_path: Path) -> None:
    result = study("--profile", "gpu", "--tiny", "--out", str(tmp_path), "--arms", "fc,dynamic", "--seeds", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    config = (tmp_path / "dynamic" / "seed0" / "config.yaml").read_text()
    assert "resnet50" in config
    assert "backbone=resnet50" in (tmp_path / "docs" / "findings.md").read_text()


@pytest.mark.parametrize("args, said", [
    (("--readme", "/nonexistent/README.md"), "findings: --readme: no file at '/nonexistent/README.md';"),
    (("--seeds", "0,one"), "findings: --seeds: '0,one' is not a comma-separated list of integers"),
])
def test_a_bad_option_is_one_sentence_before_any_run(tmp_path: Path, args: tuple[str, ...], said: str) -> None:
    result = study("--tiny", "--out", str(tmp_path / "study"), *args)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(said)
    assert not (tmp_path / "study").exists()  # nothing ran


def test_an_unknown_arm_is_named_with_the_list() -> None:
    result = study("--arms", "fc,dynamc")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("findings: --arms: unknown dynamc; the arms are fc, ")
    assert "Traceback" not in result.stderr
