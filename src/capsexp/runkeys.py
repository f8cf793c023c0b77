"""What each config key means to a run, in one table (no torch import: ``capsexp report`` reads it).

For every key with a role beyond "it defines the run": whether a resume may change it (the run
stays the same run), whether HParams compares it first (ticked as differing), whether a swept
value names the sweep's job folders, and whether ``capsexp report`` tells runs apart by it. A
prefix covers its subtree (``grads.alarm`` covers ``grads.alarm.ratio``). Keys not listed define
the run: a resume may not change them, a sweep names its folders by them, the report groups by them.
"""

from __future__ import annotations

from typing import NamedTuple


class KeyRole(NamedTuple):
    continuable: bool = False    # trainer.resume may change it
    compared_first: bool = False  # HParams: among the keys runs are compared by, ticked
    in_hparams: bool = True      # HParams lists it at all
    names_folder: bool = True    # a swept value names the job's folder
    tells_runs_apart: bool = True  # capsexp report labels and groups runs by it


_HOW = KeyRole(continuable=True)  # where and how the same arithmetic runs, or what is shown: not what the run is
_SHOWN = KeyRole(continuable=True, in_hparams=False)
RUN_KEYS: dict[str, KeyRole] = {
    "head.name": KeyRole(compared_first=True),
    "head.routing.name": KeyRole(compared_first=True),
    "head.routing.iterations": KeyRole(compared_first=True),
    "head.pool": KeyRole(compared_first=True),
    "adapter.name": KeyRole(compared_first=True),
    "trainer.max_epochs": _HOW, "trainer.max_steps": _HOW,  # the length: raise either to extend a run
    # continuing a run does not make it a different run, nor does it name anything
    "trainer.resume": KeyRole(continuable=True, in_hparams=False, names_folder=False, tells_runs_apart=False),
    "trainer.device": _SHOWN, "trainer.precision": _HOW, "trainer.channels_last": _HOW, "trainer.compile": _HOW,
    "trainer.on_nonfinite": _HOW,  # what a fault does: e.g. resume a stopped run with skip
    "trainer.checkpoints": _HOW,
    "trainer.progress": _SHOWN, "trainer.progress_every_n_steps": _HOW, "trainer.log_every_n_steps": _HOW,
    "trainer.warmup_steps_excluded": _HOW,
    "grads.log_every_n_steps": _HOW, "grads.histogram_every_n_steps": _HOW, "grads.figure_every_n_steps": _HOW,
    "grads.alarm": _HOW, "grads.probe": _HOW,
    "data.num_workers": _SHOWN, "data.download": _SHOWN,  # how the same images are loaded
    "data.root": KeyRole(in_hparams=False),  # a path: the data set's name says what it is
    "name": _HOW,  # the label of a folder Hydra names
    "hydra": KeyRole(in_hparams=False), "bench": KeyRole(in_hparams=False),
}


def role(key: str) -> KeyRole:
    """The role of ``key``: its own entry, else its nearest listed prefix's, else a defining key's."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        found = RUN_KEYS.get(".".join(parts[:end]))
        if found is not None:
            return found
    return KeyRole()


def keys_where(field: str, value: bool = True) -> tuple[str, ...]:
    """The listed keys (prefixes) whose ``field`` is ``value``, in the table's order."""
    return tuple(k for k, r in RUN_KEYS.items() if getattr(r, field) is value)
