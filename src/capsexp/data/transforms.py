"""Normalisation constants and the PIL-to-tensor pipelines.

Every data set yields images normalised with the ImageNet statistics that the pretrained ResNets
expect; the capsule head's decoder undoes exactly this normalisation, so it imports the constants
from here rather than from a data set.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2

from capsexp.data.catalog import DATASETS

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def build_transform(name: str, image_size: int, train: bool) -> v2.Compose:
    """The PIL-to-normalised-tensor pipeline for data set ``name`` (not used by shapes)."""
    steps: list[Any] = [v2.ToImage()]
    if DATASETS[name].grey:
        steps.append(v2.Grayscale(num_output_channels=3))  # the backbone expects RGB
    if name == "imagefolder":
        steps += ([v2.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True),
                   v2.RandomHorizontalFlip()] if train else
                  [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])
    else:
        steps.append(v2.Resize((image_size, image_size), antialias=True))
        if train:
            steps.append(v2.RandomCrop(image_size, padding=max(1, image_size // 8)))
            if DATASETS[name].flips:
                steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
              v2.ToPureTensor()]
    return v2.Compose(steps)
