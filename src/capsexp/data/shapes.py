"""The built-in procedural shapes: a deterministic renderer and its checksummed disk cache.

Image ``i`` of a split shows shape ``SHAPES_CLASSES[i % 8]`` on a cluttered background and
depends only on ``(seed, split, i)``. A rendered split is cached in ``default_cache_dir()`` (or
``data.root`` when set) together with the SHA-256 of its pixels; a cache file that does not
match its checksum is rendered again, with a warning naming the file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from capsexp.data.catalog import SHAPES_CLASSES
from capsexp.data.transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)


# Bump whenever the renderer or the file layout changes, so stale cache files are never reused.
# 2: the file holds the SHA-256 of its pixels.
_SHAPES_FORMAT_VERSION = 2
_SPLIT_STREAMS = {"train": 1, "val": 2}  # distinct seed streams keep the splits disjoint
_U64 = (1 << 64) - 1  # SeedSequence takes non-negative entropy; masking keeps negative seeds usable


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


def checksum(images: torch.Tensor) -> str:
    """SHA-256 of the tensor's bytes, in memory order."""
    return hashlib.sha256(images.contiguous().numpy().data).hexdigest()


def _warn(message: str) -> None:
    print(f"capsexp: WARNING {message}", file=sys.stderr, flush=True)


def load_cache(path: Path, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The cached split at ``path``; None (with a warning naming the file) when it cannot be trusted."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        images, digest = stored["images"], stored["sha256"]
    except Exception as exc:  # noqa: BLE001 -- any unreadable file is only a cache miss
        _warn(f"the shapes cache '{path}' is unreadable ({type(exc).__name__}: {exc}); rendering it again.")
        return None
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and tuple(images.shape) == shape):
        _warn(f"the shapes cache '{path}' holds unexpected contents; rendering it again.")
        return None
    # torch.load checks no checksum of its own: a flipped bit in the pixels would load silently
    if digest != checksum(images):
        _warn(f"the shapes cache '{path}' does not match its checksum (the file is damaged); "
              f"rendering it again.")
        return None
    return images


def save_cache(path: Path, images: torch.Tensor) -> None:
    """Write ``images`` and their checksum to ``path`` atomically; a failure costs speed only."""
    # Temp file + os.replace: concurrent runs never see a half-written cache.
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save({"images": images, "sha256": checksum(images)}, f)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache folder costs speed, not correctness
        _warn(f"could not cache shapes at '{path}' ({exc}).")
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
        images = load_cache(self.cache_path, (size, 3, image_size, image_size)) if cache else None
        if images is None:
            start = time.perf_counter()
            images = render_shapes(split, size, image_size, seed)
            log.info("rendered %d %s shapes in %.1f s", size, split, time.perf_counter() - start)
            if cache:
                save_cache(self.cache_path, images)
        self.images = images
        self.labels = torch.arange(size) % len(SHAPES_CLASSES)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) / std

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float() * self._scale - self._shift, int(self.labels[index])
