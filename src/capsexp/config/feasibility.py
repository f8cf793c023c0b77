"""Can one training step run at all? Checked with the config, before Hydra writes anything.

Two things a run would otherwise crash on after its folder, data and weights are set up:

* memory: the tensors one training step saves for its backward pass grow as
  ``data.batch_size x data.image_size**2``; a step needing more than the whole memory of the
  device it runs on (the GPU's, or this machine's RAM) cannot run. The estimate is a lower
  bound (saved activations only; the backward pass and the optimizer need more), so a run that
  fits is never refused; the built-in shapes, rendered into memory, are bounded the same way.
* BatchNorm on a single value: at ``data.image_size`` 32 the trunk ends in a 1x1 map, so with
  ``data.batch_size=1`` a BatchNorm layer in training mode (layer4's, or a conv adapter's with
  ``adapter.norm=batch``) sees one value per channel and cannot normalise. ``data.batch_size``
  is per process under DDP. The train loader drops its last partial batch, so no smaller batch
  reaches training; validation runs BatchNorm in eval mode, where one image is fine.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from capsexp.errors import UserError
from capsexp.models.backbone import feature_size

# bytes one image saves for the backward pass per input pixel, fp32 and nothing frozen: measured
# with torch.autograd.graph.saved_tensors_hooks (parameters excluded) at 64, 128 and 224 px,
# rounded down. ResNet50 at 224 px and batch 32: 1710 x 224**2 x 32 = 2.7 GB.
ACTIVATION_BYTES_PER_PIXEL = {"resnet18": 440, "resnet34": 640, "resnet50": 1710, "resnet101": 2530,
                              "resnet152": 3540, "resnext50_32x4d": 2240, "wide_resnet50_2": 2240}
# with frozen stages, at least the stem's output (64 channels at half the side, fp32) exists at once
FROZEN_BYTES_PER_PIXEL = 64


def _gib(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _ram() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def _device_memory(cfg: Any) -> tuple[int, str, bool] | None:
    """(bytes, what they are, on CUDA) for the device ``trainer.device`` picks; None if unknown."""
    name = str(cfg.trainer.device)
    if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            return None  # setup_runtime reports that
        try:
            index = torch.device(name).index if ":" in name else int(os.environ.get("LOCAL_RANK", "0"))
            return torch.cuda.get_device_properties(index).total_memory, f"the memory of GPU {index}", True
        except (RuntimeError, AssertionError, ValueError):
            return None
    ram = _ram()
    return None if ram is None else (ram, "this machine's RAM", False)


def _check_memory(cfg: Any) -> None:
    size, batch = int(cfg.data.image_size), int(cfg.data.batch_size)
    memory = _device_memory(cfg)
    per_pixel = ACTIVATION_BYTES_PER_PIXEL.get(str(cfg.backbone.name))
    if memory is None or per_pixel is None:
        return
    total, where, cuda = memory
    if int(cfg.backbone.freeze_depth) > 0:
        per_pixel = FROZEN_BYTES_PER_PIXEL
    precision = str(cfg.trainer.precision)
    if precision in ("bf16", "fp16") or (precision == "auto" and cuda):
        per_pixel //= 2  # autocast keeps most activations in 16 bits
    need = per_pixel * size * size * batch
    if need > total:
        raise UserError(f"data.image_size={size} with data.batch_size={batch} needs at least {_gib(need)} for the "
                        f"activations of one training step ({cfg.backbone.name}), more than {where} "
                        f"({_gib(total)}); lower data.image_size or data.batch_size.")
    ram = _ram()
    if cfg.data.name == "shapes" and ram is not None:
        images = int(cfg.data.train_size) + int(cfg.data.val_size)
        held = images * 3 * size * size  # rendered once, kept as uint8
        if held > ram:
            raise UserError(f"data.image_size={size} with data.train_size+data.val_size={images} images holds "
                            f"{_gib(held)} of rendered shapes in memory, more than this machine's RAM "
                            f"({_gib(ram)}); lower data.image_size or data.train_size.")


def _check_batchnorm(cfg: Any) -> None:
    size, batch = int(cfg.data.image_size), int(cfg.data.batch_size)
    if batch != 1 or feature_size(size) != 1:
        return
    adapter_bn = cfg.adapter.name == "conv" and cfg.adapter.get("norm") == "batch"
    trunk_bn = int(cfg.backbone.freeze_depth) < 5  # layer4 (the 1x1 stage) trains
    if trunk_bn or adapter_bn:
        where = "layer4" if trunk_bn else "the conv adapter"
        raise UserError(f"data.batch_size=1 with data.image_size={size} (a 1x1 feature map) gives BatchNorm in "
                        f"{where} one value per channel, which it cannot train on; use data.batch_size >= 2 "
                        f"(per process) or data.image_size >= 33.")


def cross_check(cfg: Any) -> None:
    _check_batchnorm(cfg)
    _check_memory(cfg)
