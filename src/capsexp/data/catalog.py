"""The data sets capsexp reads, as plain data (no torch import: ``capsexp report`` reads it too).

One entry per ``data`` option: its human name, its class count (None where the folder decides),
whether its images are grey-scale (made RGB for the backbone) and whether a horizontal flip keeps
an image in its class.
"""

from __future__ import annotations

from typing import NamedTuple


class DataSet(NamedTuple):
    pretty: str
    classes: int | None     # None: an image folder, whose class folders decide
    grey: bool
    flips: bool


SHAPES_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "arrow")
DATASETS: dict[str, DataSet] = {
    "shapes": DataSet("the built-in shapes", len(SHAPES_CLASSES), False, True),
    "cifar10": DataSet("CIFAR-10", 10, False, True),
    "cifar100": DataSet("CIFAR-100", 100, False, True),
    "mnist": DataSet("MNIST", 10, True, False),  # a flipped digit is a different glyph
    "fashion_mnist": DataSet("Fashion-MNIST", 10, True, True),
    "imagefolder": DataSet("an image folder", None, False, True),
}
DATASET_NAMES = tuple(DATASETS)
# the built-in data sets' class counts (an image folder's depends on the folder)
CLASS_COUNTS: dict[str, int] = {name: d.classes for name, d in DATASETS.items() if d.classes is not None}
