"""Datasets and loaders: built-in procedural shapes, torchvision datasets and image folders.

Every dataset yields ``(image, label)`` with ``image`` a float tensor ``[3, S, S]``
normalised with the ImageNet statistics the pretrained ResNet50 expects. The shapes live in
``capsexp.data.shapes``, image folders in ``capsexp.data.imagefolder``; the ``data`` group's config
checks are declared here.
"""

from __future__ import annotations

import multiprocessing
import os
import signal

from pathlib import Path
from typing import Any, Sized, cast

import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from capsexp.checks import Check, boolean, choice, integer, nonneg, one_of
from capsexp.errors import UserError
from capsexp.data.imagefolder import bad_image_count, build_imagefolder  # noqa: F401 -- bad_image_count: for callers
from capsexp.data.sampling import EpochSampler, SeededSamples
from capsexp.data.catalog import DATASET_NAMES, DATASETS  # noqa: F401 -- DATASET_NAMES: the option registry
from capsexp.data.shapes import SHAPES_CLASSES, ShapesDataset
from capsexp.data.transforms import build_transform

MIN_IMAGE_SIZE = 32  # below this the 1x1 feature map's BatchNorm statistics degenerate
BAD_IMAGE_POLICIES = ("stop", "skip")
# name -> torchvision's class (the rest of each data set's facts: capsexp.data.catalog)
_TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST", "fashion_mnist": "FashionMNIST"}

CHECKS: list[Check] = [
    ("data.image_size", integer(MIN_IMAGE_SIZE), f"an integer >= {MIN_IMAGE_SIZE} (pixels)"),
    ("data.batch_size", integer(1), "a positive integer"),
    ("data.num_workers", integer(0), "an integer >= 0"),
    ("data.download", boolean, "true or false"),
]
OPTION_CHECKS: dict[str, list[Check]] = {
    "shapes": [("data.train_size", integer(1), "a positive integer"),
               ("data.val_size", integer(1), "a positive integer")],
    "imagefolder": [("data.val_fraction", lambda v: nonneg(v) and 0 < v < 1, "in (0, 1)"),
                    ("data.on_bad_image", choice(*BAD_IMAGE_POLICIES), one_of(BAD_IMAGE_POLICIES))],
}


def cross_check(cfg: DictConfig) -> None:
    """``data.root``: required where the group file says ``???``, and a folder for every dataset but shapes."""
    data = cfg.data
    if OmegaConf.is_missing(data, "root"):  # "???" in the group file: the user must say
        raise UserError(f"data.root is required for data={data.name}; pass data.root=/path/to/images.")
    if data.name != "shapes" and not data.get("root"):
        raise UserError("data.root is not set; point it at the dataset folder, e.g. data.root=/data/x.")


def _build_torchvision(cfg: Any, name: str, image_size: int) -> tuple[Dataset, Dataset, int]:
    cls_name, pretty = _TORCHVISION[name], DATASETS[name].pretty
    root, download = Path(str(cfg.root)).expanduser(), bool(cfg.download)
    cls = getattr(torchvision.datasets, cls_name)
    try:
        train, val = (cls(str(root), train=is_train, download=download,
                          transform=build_transform(name, image_size, is_train))
                      for is_train in (True, False))
    except (RuntimeError, OSError) as exc:
        if download:
            # Some downloaders report every mirror tried; the last line is the actual cause.
            cause = ([line.strip() for line in str(exc).splitlines() if line.strip()] or [repr(exc)])[-1]
            raise UserError(f"data.download: could not download {pretty} into '{root}' ({cause}); check "
                            f"the network or copy the dataset into data.root by hand.") from exc
        raise UserError(f"data.root: no {pretty} found at '{root}'; download it with data.download=true "
                        f"(needs network) or point data.root at a folder that has it.") from exc
    return train, val, len(train.classes)


def build_datasets(cfg: Any, seed: int) -> tuple[Dataset, Dataset, int]:
    """Build ``(train, val, num_classes)`` for the ``data`` config group (checked by ``validate`` first)."""
    name, image_size = str(cfg.name), int(cfg.image_size)
    if name == "shapes":
        train = ShapesDataset("train", int(cfg.train_size), image_size, seed, cache_dir=cfg.root)
        val = ShapesDataset("val", int(cfg.val_size), image_size, seed, cache_dir=cfg.root)
        return train, val, len(SHAPES_CLASSES)
    if name == "imagefolder":
        train_tf, val_tf = (build_transform(name, image_size, is_train) for is_train in (True, False))
        return build_imagefolder(Path(str(cfg.root)).expanduser(), str(cfg.on_bad_image), float(cfg.val_fraction),
                                 seed, train_tf, val_tf)
    return _build_torchvision(cfg, name, image_size)


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ignore_stop_signals(worker_id: int) -> None:
    """In a loader worker. A scheduler's SIGTERM (and Ctrl-C, SIGHUP) reaches the whole process group;
    the main process handles it: it finishes the step, saves, and ends the workers (``shutdown_workers``).
    A worker that died of the signal first would end the run with a traceback instead. A second
    SIGTERM ends the worker as usual."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _first_sigterm)


def _first_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _worker_start_method() -> str | None:
    """How loader workers start: as children of the training process. Under a forkserver (the default
    from Python 3.14 on Linux) they would be children of the forkserver, which a SIGTERM to the process
    group kills, and torch's worker watchdog ends a worker whose parent died: the run would stop with
    "DataLoader worker exited unexpectedly" instead of saving. So fork there; elsewhere the default."""
    return "fork" if multiprocessing.get_start_method() == "forkserver" else None


def shutdown_workers(*loaders: DataLoader) -> None:
    """End the loaders' persistent workers now. Left to the interpreter's exit, multiprocessing would
    end them with one SIGTERM, which a worker ignores once (``ignore_stop_signals``), and wait for them."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)  # torch keeps a persistent-worker iterator here
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader._iterator = None


def build_loaders(cfg: Any, train_ds: Dataset, val_ds: Dataset, *, seed: int, pin_memory: bool = False,
                  rank: int = 0, world_size: int = 1) -> tuple[DataLoader, DataLoader]:
    """Train and val loaders over ``train_ds`` and ``val_ds``, sharded for DDP rank ``rank``.

    Both use an ``EpochSampler`` (``loader.sampler.set_epoch(epoch, skip)``): the train order is
    a permutation seeded by ``seed`` and the epoch, and each training sample's augmentation is
    seeded by ``seed``, the epoch and its index (``SeededSamples``), so two runs, and a run
    resumed mid-epoch, see the same batches with any number of workers. The train loader drops
    its last partial batch; the validation shards are not padded.
    """
    # more worker processes than usable cores only adds contention (and torch's warning); the
    # batches are the same with any number of workers, so capping them changes no result
    batch_size, num_workers = int(cfg.batch_size), min(int(cfg.num_workers), _usable_cores())
    # map-style datasets have a length, which torch's Dataset base class does not declare
    train_sampler = EpochSampler(len(cast(Sized, train_ds)), True, seed, rank, world_size, keyed=True)
    val_sampler = EpochSampler(len(cast(Sized, val_ds)), False, seed, rank, world_size, pad=False)
    if len(train_sampler) < batch_size:
        where = " per process" if world_size > 1 else ""
        raise UserError(f"data.batch_size ({batch_size}) exceeds the training set ({len(train_sampler)} "
                        f"images{where}), so no full batch exists; lower data.batch_size or add data.")
    common: dict[str, Any] = {"batch_size": batch_size, "num_workers": num_workers,
                              "pin_memory": pin_memory, "persistent_workers": num_workers > 0,
                              "worker_init_fn": ignore_stop_signals if num_workers > 0 else None,
                              "multiprocessing_context": _worker_start_method() if num_workers > 0 else None}
    # own generators: a loader would otherwise draw its workers' base seed from the global
    # stream each time it starts an epoch, shifting it on resume
    train = DataLoader(SeededSamples(train_ds, seed), sampler=train_sampler, drop_last=True,
                       generator=torch.Generator().manual_seed(seed), **common)
    val = DataLoader(val_ds, sampler=val_sampler, drop_last=False,
                     generator=torch.Generator().manual_seed(seed + 1), **common)
    return train, val
