"""``capsexp report <folder>``: every run below a folder, side by side.

A run is any folder holding TensorBoard event files or ``metrics.json`` (event files of runs made
before they moved into the run folder itself are read from its ``tb/``). The report reads what each
run was run with (``.hydra/overrides.yaml``, else ``config.yaml``), ``metrics.json`` and the
TensorBoard scalars, prints its tables and writes ``report.md``, ``report.csv`` and ``report.png``
into the folder. A run without ``metrics.json`` is ``running/crashed`` and shows what its event
files hold; a frozen stage logs no gradient tags and shows as blank, never as zero.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from capsexp.report.chance import accuracy_meaningless, short_note
from capsexp.rundir.files import refuse_link, write_atomic
from capsexp.errors import UserError
from capsexp.report.figure import plot, report_figure
from capsexp.report.runs import Run, find_runs, parse_overrides, read_run
from capsexp.report.table import RUNNING, build_rows, format_markdown, format_tables, summarize, write_csv

__all__ = ["RUNNING", "Run", "build_rows", "find_runs", "main", "parse_overrides", "read_run", "report_figure",
           "summarize"]



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
    outputs = [root / name for name in ("report.md", "report.csv", "report.png")]
    for path in outputs:  # before writing any: a refused report leaves the folder as it was
        refuse_link(path)
    try:  # the files first: `capsexp report ... | head` may close the terminal side early
        write_atomic(root / "report.md", format_markdown(rows, root, note))
        write_csv(rows, keys, root / "report.csv")
        plot(runs, rows, root / "report.png")
    except OSError as exc:
        raise UserError(f"could not write the report into '{root}': {exc.strerror or exc}.") from None
    print(format_tables(rows))
    for row in (r for r in rows if r["alarm"]):
        print(f"  ! {row['run']}: {row['alarm']}")
    if note:
        print(note)
    print(f"capsexp: {len(runs)} run{'s' if len(runs) != 1 else ''}; wrote report.md, report.csv and "
          f"report.png to {root}")
