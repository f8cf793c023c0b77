"""Datasets and loaders: built-in procedural shapes, torchvision datasets and image folders.

Every dataset yields ``(image, label)`` with ``image`` a float tensor ``[3, S, S]``
normalised with the ImageNet statistics the pretrained ResNet50 expects.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from capsexp.sampling import EpochSampler, SeededSamples

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
DATASET_NAMES = ("shapes", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder")
SHAPES_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "arrow")

# Bump whenever the renderer changes, so stale cache files are never reused.
_SHAPES_FORMAT_VERSION = 1
_SPLIT_STREAMS = {"train": 1, "val": 2}  # distinct seed streams keep the splits disjoint
_U64 = (1 << 64) - 1  # SeedSequence takes non-negative entropy; masking keeps negative seeds usable
# name -> (torchvision class, human name, grey-scale, horizontal flips make sense)
_TORCHVISION = {
    "cifar10": ("CIFAR10", "CIFAR-10", False, True),
    "cifar100": ("CIFAR100", "CIFAR-100", False, True),
    "mnist": ("MNIST", "MNIST", True, False),  # a flipped digit is a different glyph
    "fashion_mnist": ("FashionMNIST", "Fashion-MNIST", True, True),
}


class DataError(Exception):
    """A data configuration problem, described in one sentence that names the config key."""


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """Read ``cfg.key``; missing keys and ``???`` values read as ``default``."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.select(cfg, key, default=default)
    return cfg.get(key, default)


def _int_at_least(cfg: Any, key: str, minimum: int, default: Any = None) -> int:
    value = _get(cfg, key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"data.{key} must be an integer >= {minimum}; got {value!r}.")
    return value


def _radial(radii: list[float]) -> np.ndarray:
    """Polygon with vertex ``k`` at radius ``radii[k]``, evenly spaced in angle, first one up."""
    angles = np.arange(len(radii)) * 2 * np.pi / len(radii) - np.pi / 2
    return np.asarray(radii)[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)


# Outlines inside the unit circle, so a pose's radius bounds the whole shape.
_POLYGONS = {
    "square": _radial([0.95] * 4),
    "triangle": _radial([1.0] * 3),
    "star": _radial([1.0, 0.45] * 5),
    "cross": np.array([(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3),
                       (0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)]),
    "arrow": np.array([(-1, -0.2), (0.15, -0.2), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.2),
                       (-1, 0.2)]),
}


def _rgb(values: np.ndarray) -> tuple[int, ...]:
    return tuple(int(v) for v in np.clip(values, 0, 255))


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, bg: np.ndarray, width: int,
                  ss: int) -> None:
    # Clutter stays within +-45 of the background per channel: visible texture,
    # but far less contrast than the shape, which stays the object.
    for _ in range(int(rng.integers(2, 5))):
        x0, y0, x1, y1 = rng.uniform(-0.1, 1.1, 4) * width
        draw.line([(x0, y0), (x1, y1)], fill=_rgb(bg + rng.integers(-45, 46, 3)),
                  width=int(rng.integers(1, 3)) * ss)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0, width, 2)
        rx, ry = rng.uniform(0.08, 0.25, 2) * width
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=_rgb(bg + rng.integers(-45, 46, 3)))


def _draw_shape(mask: ImageDraw.ImageDraw, name: str, cx: float, cy: float, r: float, angle: float) -> None:
    def disc(x: float, y: float, radius: float, fill: int) -> None:
        mask.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill)

    if name == "circle":
        disc(cx, cy, 0.9 * r, 255)
    elif name == "ring":
        disc(cx, cy, r, 255)
        disc(cx, cy, 0.55 * r, 0)
    elif name == "crescent":
        disc(cx, cy, r, 255)
        disc(cx + 0.5 * r * np.cos(angle), cy + 0.5 * r * np.sin(angle), 0.85 * r, 0)
    else:
        c, s = np.cos(angle), np.sin(angle)
        points = _POLYGONS[name] @ np.array([[c, s], [-s, c]]) * r + (cx, cy)
        mask.polygon([(float(x), float(y)) for x, y in points], fill=255)


def _render_one(index: int, image_size: int, seed: int, stream: int) -> np.ndarray:
    """Render image ``index`` of a split as uint8 ``[S, S, 3]``; a pure function of its arguments."""
    rng = np.random.default_rng([seed & _U64, stream, index])
    # Draw at ss x the size and box-downsample: cheap anti-aliasing; 2x suffices for large images.
    ss = 4 if image_size <= 96 else 2
    width = image_size * ss
    bg = rng.integers(0, 256, 3)
    fg = rng.integers(0, 256, 3)
    for _ in range(20):  # resample until the shape stands out clearly from the background
        if np.linalg.norm(fg - bg) >= 150:
            break
        fg = rng.integers(0, 256, 3)
    else:
        fg = np.where(bg < 128, 255, 0)
    canvas = Image.new("RGB", (width, width), _rgb(bg))
    _draw_clutter(ImageDraw.Draw(canvas), rng, bg, width, ss)
    radius = rng.uniform(0.22, 0.42) * image_size
    cx, cy = rng.uniform(radius + 1, image_size - radius - 1, 2)
    angle = rng.uniform(0, 2 * np.pi)
    # Drawing into a mask lets rings and crescents have real holes that show the clutter.
    mask = Image.new("L", (width, width), 0)
    name = SHAPES_CLASSES[index % len(SHAPES_CLASSES)]
    _draw_shape(ImageDraw.Draw(mask), name, cx * ss, cy * ss, radius * ss, angle)
    canvas.paste(_rgb(fg), (0, 0, width, width), mask)
    pixels = np.asarray(canvas.reduce(ss), dtype=np.int16)
    pixels = pixels + rng.integers(-6, 7, pixels.shape, dtype=np.int16)  # mild sensor-like noise
    return np.clip(pixels, 0, 255).astype(np.uint8)


def render_shapes(split: str, size: int, image_size: int, seed: int) -> torch.Tensor:
    """Render a shapes split as a uint8 tensor ``[size, 3, image_size, image_size]``.

    Image ``i`` has label ``i % len(SHAPES_CLASSES)`` and depends only on
    ``(seed, split, i)``, so a larger split extends a smaller one.
    """
    stream = _SPLIT_STREAMS[split]
    out = np.empty((size, image_size, image_size, 3), dtype=np.uint8)
    for i in range(size):
        out[i] = _render_one(i, image_size, seed, stream)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def default_cache_dir() -> Path:
    """Folder for cached renders: ``$XDG_CACHE_HOME/capsexp``, else ``~/.cache/capsexp``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "capsexp"


def _load_cache(path: Path, shape: tuple[int, ...]) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        images = torch.load(path, map_location="cpu", weights_only=True)["images"]
        if isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.shape == shape:
            return images
        reason = "unexpected contents"
    except Exception as exc:  # any unreadable file is only a cache miss
        reason = f"{type(exc).__name__}: {exc}"
    log.warning("ignoring unreadable shapes cache %s (%s); rendering again", path, reason)
    return None


def _save_cache(path: Path, images: torch.Tensor) -> None:
    # Temp file + os.replace: concurrent runs never see a half-written cache.
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save({"images": images}, f)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache folder costs speed, not correctness
        log.warning("could not cache shapes at %s (%s)", path, exc)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


class ShapesDataset(Dataset):
    """Procedural geometric shapes on cluttered backgrounds, rendered once and cached on disk."""

    classes = SHAPES_CLASSES

    def __init__(self, split: str, size: int, image_size: int, seed: int,
                 *, cache_dir: str | Path | None = None, cache: bool = True) -> None:
        """Load split ``split`` ('train' or 'val') from the cache, rendering it on a miss."""
        if split not in _SPLIT_STREAMS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_STREAMS)}; got {split!r}")
        folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        name = f"shapes-v{_SHAPES_FORMAT_VERSION}-seed{seed}-{split}-n{size}-{image_size}px.pt"
        self.cache_path = folder / name
        images = _load_cache(self.cache_path, (size, 3, image_size, image_size)) if cache else None
        if images is None:
            start = time.perf_counter()
            images = render_shapes(split, size, image_size, seed)
            log.info("rendered %d %s shapes in %.1f s", size, split, time.perf_counter() - start)
            if cache:
                _save_cache(self.cache_path, images)
        self.images = images
        self.labels = torch.arange(size) % len(SHAPES_CLASSES)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) / std

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float() * self._scale - self._shift, int(self.labels[index])


def build_transform(name: str, image_size: int, train: bool) -> v2.Compose:
    """The PIL-to-normalised-tensor pipeline for dataset ``name`` (not used by shapes)."""
    steps: list[Any] = [v2.ToImage()]
    if name in _TORCHVISION and _TORCHVISION[name][2]:
        steps.append(v2.Grayscale(num_output_channels=3))  # the backbone expects RGB
    if name == "imagefolder":
        steps += ([v2.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True),
                   v2.RandomHorizontalFlip()] if train else
                  [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])
    else:
        steps.append(v2.Resize((image_size, image_size), antialias=True))
        if train:
            steps.append(v2.RandomCrop(image_size, padding=max(1, image_size // 8)))
            if _TORCHVISION.get(name, (None, None, False, False))[3]:
                steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
              v2.ToPureTensor()]
    return v2.Compose(steps)


def _root(cfg: Any) -> Path:
    root = _get(cfg, "root")
    if not root:
        raise DataError("data.root is not set; point it at the dataset folder, e.g. data.root=/data/x.")
    return Path(str(root)).expanduser()


def _build_torchvision(cfg: Any, name: str, image_size: int) -> tuple[Dataset, Dataset, int]:
    cls_name, pretty, _, _ = _TORCHVISION[name]
    root, download = _root(cfg), bool(_get(cfg, "download", False))
    cls = getattr(torchvision.datasets, cls_name)
    try:
        train, val = (cls(str(root), train=is_train, download=download,
                          transform=build_transform(name, image_size, is_train))
                      for is_train in (True, False))
    except (RuntimeError, OSError) as exc:
        if download:
            # Some downloaders report every mirror tried; the last line is the actual cause.
            cause = ([line.strip() for line in str(exc).splitlines() if line.strip()] or [repr(exc)])[-1]
            raise DataError(f"data.download: could not download {pretty} into '{root}' ({cause}); check "
                            f"the network or copy the dataset into data.root by hand.") from exc
        raise DataError(f"data.root: no {pretty} found at '{root}'; download it with data.download=true "
                        f"(needs network) or point data.root at a folder that has it.") from exc
    return train, val, len(train.classes)


def _has_images(folder: Path) -> bool:
    # Same rule as ImageFolder (extension match, links followed), so its scan cannot fail later.
    return any(f.lower().endswith(IMG_EXTENSIONS)
               for _, _, files in os.walk(folder, followlinks=True) for f in files)


def _check_class_root(folder: Path) -> list[str]:
    """Class names under ``folder``, or a DataError saying what is wrong with it."""
    if not folder.is_dir():
        raise DataError(f"data.root: no folder at '{folder}'; point data.root at a folder with one "
                        f"subfolder of images per class (or train/ and val/ folders laid out that way).")
    # ImageFolder treats every subfolder (hidden ones too) as a class; check exactly those.
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise DataError(f"data.root '{folder}' has no class subfolders; put the images in one subfolder "
                        f"per class, e.g. '{folder / 'cats' / '001.jpg'}'.")
    empty = [c for c in classes if not _has_images(folder / c)]
    if empty:
        raise DataError(f"data.root: class folder(s) {', '.join(map(repr, empty))} in '{folder}' hold no "
                        f"images; add images (.jpg, .png, ...) or remove the folder(s).")
    if len(classes) == 1:
        raise DataError(f"data.root '{folder}' has only one class folder ('{classes[0]}'); an "
                        f"image-classification run needs at least two.")
    return classes


def _stratified_split(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    # Per-class split: every class reaches validation, and the split is fixed by the seed.
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    train, val = [], []
    for _, members in sorted(by_class.items()):
        order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
        n_val = min(len(members) - 1, max(1, round(len(members) * fraction)))
        val += order[:n_val]
        train += order[n_val:]
    return train, val


def _build_imagefolder(cfg: Any, image_size: int, seed: int) -> tuple[Dataset, Dataset, int]:
    root = _root(cfg)
    train_dir = root / "train" if (root / "train").is_dir() else root
    classes = _check_class_root(train_dir)
    train_tf, val_tf = (build_transform("imagefolder", image_size, is_train) for is_train in (True, False))
    if (root / "val").is_dir() and train_dir != root:
        # Labels are indices into the sorted class names, so both splits must share them.
        if _check_class_root(root / "val") != classes:
            raise DataError(f"data.root: '{root / 'val'}' and '{train_dir}' hold different class folders; "
                            f"use the same class names in both.")
        return (torchvision.datasets.ImageFolder(str(train_dir), transform=train_tf),
                torchvision.datasets.ImageFolder(str(root / "val"), transform=val_tf), len(classes))
    fraction = _get(cfg, "val_fraction", 0.1)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise DataError(f"data.val_fraction must be a number between 0 and 1 (e.g. 0.1); got {fraction!r}.")
    train_base = torchvision.datasets.ImageFolder(str(train_dir), transform=train_tf)
    # A shallow copy shares the scanned file list, so a large folder is walked only once.
    val_base = copy.copy(train_base)
    val_base.transform = val_tf
    train_idx, val_idx = _stratified_split(train_base.targets, float(fraction), seed)
    if not val_idx:
        raise DataError(f"data.val_fraction: every class in '{train_dir}' has a single image, so none is "
                        f"left for validation; add images or a '{root / 'val'}' folder.")
    return Subset(train_base, train_idx), Subset(val_base, val_idx), len(classes)


def build_datasets(cfg: Any, seed: int) -> tuple[Dataset, Dataset, int]:
    """Build ``(train, val, num_classes)`` for the ``data`` config group, validating it first."""
    name = _get(cfg, "name")
    if name not in DATASET_NAMES:
        raise DataError(f"data.name must be one of {', '.join(DATASET_NAMES)}; got {name!r}.")
    image_size = _int_at_least(cfg, "image_size", 16 if name == "shapes" else 1)
    _int_at_least(cfg, "batch_size", 1)
    _int_at_least(cfg, "num_workers", 0, default=0)
    if name == "shapes":
        train_size, val_size = _int_at_least(cfg, "train_size", 1), _int_at_least(cfg, "val_size", 1)
        cache_dir = _get(cfg, "root")
        train = ShapesDataset("train", train_size, image_size, seed, cache_dir=cache_dir)
        val = ShapesDataset("val", val_size, image_size, seed, cache_dir=cache_dir)
        return train, val, len(SHAPES_CLASSES)
    if name == "imagefolder":
        return _build_imagefolder(cfg, image_size, seed)
    return _build_torchvision(cfg, name, image_size)


def build_loaders(cfg: Any, train_ds: Dataset, val_ds: Dataset, *, seed: int, pin_memory: bool = False,
                  rank: int = 0, world_size: int = 1) -> tuple[DataLoader, DataLoader]:
    """Train and val loaders over ``train_ds`` and ``val_ds``, sharded for DDP rank ``rank``.

    Both use an ``EpochSampler`` (``loader.sampler.set_epoch(epoch, skip)``): the train order is
    a permutation seeded by ``seed`` and the epoch, and each training sample's augmentation is
    seeded by ``seed``, the epoch and its index (``SeededSamples``), so two runs, and a run
    resumed mid-epoch, see the same batches with any number of workers. The train loader drops
    its last partial batch; the validation shards are not padded.
    """
    batch_size = _int_at_least(cfg, "batch_size", 1)
    num_workers = _int_at_least(cfg, "num_workers", 0, default=0)
    train_sampler = EpochSampler(len(train_ds), True, seed, rank, world_size, keyed=True)
    val_sampler = EpochSampler(len(val_ds), False, seed, rank, world_size, pad=False)
    if len(train_sampler) < batch_size:
        where = " per process" if world_size > 1 else ""
        raise DataError(f"data.batch_size ({batch_size}) exceeds the training set ({len(train_sampler)} "
                        f"images{where}), so no full batch exists; lower data.batch_size or add data.")
    common: dict[str, Any] = {"batch_size": batch_size, "num_workers": num_workers,
                              "pin_memory": pin_memory, "persistent_workers": num_workers > 0}
    # own generators: a loader would otherwise draw its workers' base seed from the global
    # stream each time it starts an epoch, shifting it on resume
    train = DataLoader(SeededSamples(train_ds, seed), sampler=train_sampler, drop_last=True,
                       generator=torch.Generator().manual_seed(seed), **common)
    val = DataLoader(val_ds, sampler=val_sampler, drop_last=False,
                     generator=torch.Generator().manual_seed(seed + 1), **common)
    return train, val
