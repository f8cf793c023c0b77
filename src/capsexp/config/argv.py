"""The arguments of ``capsexp train|bench`` as Hydra must receive them.

Hydra parses ``sys.argv`` itself, and its parser is stricter than the command line capsexp
documents: flags must come before overrides, shell completion sees the ``train``/``bench`` word,
and under torchrun every process would otherwise pick its own run folder.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence

from capsexp.errors import UserError

# Hydra's command-line flags: those that take a value, and those after which nothing is checked
# (help, shell completion, another config tree)
FLAGS_WITH_VALUE = frozenset({"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name",
                              "-cd", "--config-dir", "--experimental-rerun"})
NO_CHECK_FLAGS = frozenset({"-h", "--help", "--hydra-help", "--version", "-sc", "--shell-completion", "-i",
                            "--info", "-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir",
                            "--experimental-rerun"})
KNOWN_FLAGS = FLAGS_WITH_VALUE | NO_CHECK_FLAGS | {"-m", "--multirun", "-r", "--run", "--resolve"}
INFO_VALUES = frozenset({"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"})


def is_hydra_key(key: str) -> bool:
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def split_arguments(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Hydra's flags (with their values, in order) and the overrides among the arguments.

    A bare ``--info`` gets its default value ``all`` spelled out, so that it may move in front of
    the overrides without taking one of them as its value.
    """
    flags: list[str] = []
    overrides: list[str] = []
    index = 0
    while index < len(args):
        item = args[index]
        index += 1
        if not item.startswith("-"):
            overrides.append(item)
            continue
        flags.append(item)
        if item in ("-i", "--info"):
            if index < len(args) and args[index] in INFO_VALUES:
                flags.append(args[index])
                index += 1
            else:
                flags.append("all")
        elif item in FLAGS_WITH_VALUE and index < len(args):
            flags.append(args[index])
            index += 1
    return flags, overrides


def hydra_argv(args: Sequence[str]) -> list[str]:
    """Flags first, then overrides: Hydra's parser rejects a flag between overrides
    (``capsexp train head=capsule -m head.routing.iterations=1,3`` would otherwise fail)."""
    flags, overrides = split_arguments(args)
    return [*flags, *overrides]


def strip_command_from_completion_line(commands: Collection[str]) -> None:
    """Hydra's shell completion re-runs ``capsexp -sc query=...`` with the typed line in
    ``COMP_LINE``; drop the command word so Hydra sees only overrides there."""
    line = os.environ.get("COMP_LINE")
    words = line.split(" ") if line else []
    if line and len(words) > 1 and words[1] in commands:
        cut = len(words[1]) + 1
        os.environ["COMP_LINE"] = " ".join([words[0], *words[2:]])
        point = int(os.environ.get("COMP_POINT", len(line)))
        os.environ["COMP_POINT"] = str(max(point - cut, len(words[0])))


def distributed_overrides(args: Sequence[str]) -> list[str]:
    """Under torchrun every process runs Hydra: they must share one run folder, and only rank 0
    writes Hydra's own files (``.hydra/``, the log) into it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return []
    if not any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in args):
        raise UserError("under torchrun pass hydra.run.dir=<folder> so that all processes share one run folder.")
    if int(os.environ.get("RANK", "0")) == 0:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


RECORDS_BY_CAPSEXP = ["hydra.output_subdir=null", "hydra/job_logging=capsexp"]


def records_by_capsexp(args: Sequence[str], extra: Sequence[str]) -> list[str]:
    """Hydra writes ``.hydra/`` and opens ``cli.log`` in the run folder before the job starts, so a run
    that capsexp then refuses would still change the folder. capsexp writes both itself, once the run
    is accepted (``capsexp.rundir.folder.start_run_record``); a command line that sets either itself
    keeps Hydra's way."""
    given = [*args, *extra]
    if any(a.startswith(("hydra.output_subdir=", "hydra/job_logging=")) for a in given):
        return []
    return RECORDS_BY_CAPSEXP
