"""Image folders (``data=imagefolder``): one subfolder of images per class, listed and decoded here.

The listing is capsexp's own rather than torchvision's ImageFolder: hidden files and macOS
``._*`` forks are ignored, and a folder link is followed only into the folder it labels and only
once, so ``loop -> .`` cannot multiply samples nor ``up -> ..`` relabel them. Every other file
is decoded to 8-bit RGB or named: files that are not images by their name in one warning, and an
image that cannot be used in an error (``data.on_bad_image=stop``) or in a warning, the next image
of its split taking its place (``skip``). Empty files and dangling links are found at start-up,
from the directory listing alone; damaged contents (a truncated JPEG) when the file is first loaded.
"""

from __future__ import annotations

import multiprocessing
import os
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from capsexp.errors import UserError
from capsexp.data.transforms import IMAGENET_MEAN

IMAGE_EXTENSIONS = (*IMG_EXTENSIONS, ".gif")
# The only decoders Pillow may try, whatever a file's name or first bytes say. Pillow picks a decoder by
# content, and some (EPS) run an outside program (Ghostscript) on the file: a data folder is untrusted input.
READ_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP", "GIF")
# transparent pixels are laid over the ImageNet mean colour: they normalise to zero, no signal
_BACKDROP = tuple(round(255 * m) for m in IMAGENET_MEAN)


def _warn(message: str) -> None:
    print(f"capsexp: WARNING {message}", file=sys.stderr, flush=True)


class BadImage(UserError):
    """A file below data.root that cannot be used as an image; the sentence names it."""

    def __init__(self, message: str) -> None:
        # A DataLoader worker's exception reaches the parent as type(exc)("Caught ... Original
        # Traceback ... capsexp.data.imagefolder.BadImage: <sentence>"): keep the sentence, drop the traceback.
        marker = f"{type(self).__qualname__}: "
        cut = message.rfind(marker)
        super().__init__(message[cut + len(marker):].strip() if cut >= 0 else message)


def _bad_sentence(path: str, reason: str) -> str:
    return f"data: cannot decode image '{path}' ({reason}); remove it, or set data.on_bad_image=skip."


def _to_8bit(image: Image.Image) -> np.ndarray:
    """A one-channel 16-bit, 32-bit or float image as uint8.

    16-bit data is scaled by the type's range, 0..65535 -> 0..255, not by the image's own
    min..max: brightness keeps its meaning across images (a dark scan stays dark, as an 8-bit
    one would), and 8-bit data stored as v * 257 maps back to v exactly. Mode I holding values
    in 0..65535 is how some decoders return 16-bit data, so it is read the same way; float data
    in [0, 1] is the usual float image convention. Anything else (depth maps, HDR, raw sensor
    counts) has no conventional range, and only then is the image's own finite min..max stretched.
    """
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and lo >= 0 and hi <= 65535):
        scaled = values / 257.0
    elif image.mode == "F" and lo >= 0 and hi <= 1:
        scaled = values * 255.0
    else:
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return np.clip(np.nan_to_num(np.rint(scaled), nan=0.0), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: deep modes scaled (see ``_to_8bit``), transparency laid over
    ``_BACKDROP`` (PIL's own conversion would keep whatever colour hides under alpha 0)."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return Image.fromarray(_to_8bit(image)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*_BACKDROP, 255)), rgba).convert("RGB")
    return image.convert("RGB")  # 1, L, P, RGB, RGBX, CMYK, YCbCr, LAB, HSV


def decode_rgb(path: str) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, upright per its EXIF orientation; raises what the decoder raises."""
    with Image.open(path, formats=READ_FORMATS) as image:
        image.load()  # decode now: a truncated file fails here, not later inside a transform
        return to_rgb(ImageOps.exif_transpose(image))


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return f"not an image in a format capsexp reads ({', '.join(READ_FORMATS)})"
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return text or type(exc).__name__


# ---------------------------------------------------------------- listing an image folder


@dataclass
class _Listing:
    classes: list[str] = field(default_factory=list)
    samples: list[tuple[str, int]] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): unusable at a glance
    others: list[str] = field(default_factory=list)  # files that are not images by their name


def _entries(folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:  # hidden files and macOS "._*" forks start with a dot
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise UserError(f"data.root: cannot read the folder '{folder}' ({exc.strerror or exc}); make it "
                        f"readable or remove it.") from exc


def _is_dir(entry: os.DirEntry) -> bool:
    """A folder, following links; a link loop (ELOOP) or a vanished entry is not one."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_link(entry: os.DirEntry) -> bool:
    try:
        return entry.is_symlink()
    except OSError:
        return True


def _enter(entry: os.DirEntry, labelled: str, seen: set[str]) -> bool:
    """Whether to list folder ``entry``: a link only into ``labelled``, and no folder twice."""
    real = os.path.realpath(entry.path)
    if real in seen:
        if entry.is_symlink():
            _warn(f"data: not following the folder link '{entry.path}': it leads to a folder already read.")
        return False
    if entry.is_symlink() and os.path.commonpath([real, labelled]) != labelled:
        _warn(f"data: not following the folder link '{entry.path}': it leads outside '{labelled}'.")
        return False
    seen.add(real)
    return True


def _glance(entry: os.DirEntry) -> str | None:
    """Why an image file is unusable, from its directory entry alone (no read); None when it may be fine."""
    try:
        info = entry.stat()  # follows links
    except OSError as exc:
        return "a link to a missing file" if entry.is_symlink() and isinstance(exc, FileNotFoundError) \
            else exc.strerror or str(exc)
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    return "empty file" if info.st_size == 0 else None


def _list_class(folder: str, label: int, seen: set[str], out: _Listing) -> None:
    labelled, stack = os.path.realpath(folder), [folder]
    while stack:
        for entry in _entries(stack.pop()):
            if _is_dir(entry):
                if _enter(entry, labelled, seen):
                    stack.append(entry.path)
            elif not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                out.others.append(entry.path)
            elif (reason := _glance(entry)) is not None:
                out.bad.append((entry.path, reason))
            else:
                out.samples.append((entry.path, label))


def _list_folder(folder: Path) -> _Listing:
    """Class subfolders of ``folder`` and their files, sorted, each real folder listed once."""
    out, top = _Listing(), os.path.realpath(folder)
    seen = {top}
    # real folders first: a class folder that is a link to another class folder is then the one skipped
    for entry in sorted(_entries(str(folder)), key=_is_link):
        if _is_dir(entry) and _enter(entry, top, seen):
            out.classes.append(entry.name)
            _list_class(entry.path, len(out.classes) - 1, seen, out)
    out.samples.sort(key=lambda s: (s[1], s[0]))
    return out


def _check_listing(folder: Path, listing: _Listing, policy: str) -> None:
    """Raise UserError for an unusable layout or (policy stop) the first bad file; warn about the rest."""
    if not listing.classes:
        raise UserError(f"data.root '{folder}' has no class subfolders; put the images in one subfolder "
                        f"per class, e.g. '{folder / 'cats' / '001.jpg'}'.")
    if listing.bad and policy == "stop":
        (path, reason), more = listing.bad[0], len(listing.bad) - 1
        raise BadImage(_bad_sentence(path, reason + (f"; {more} more unusable file(s) below '{folder}'"
                                                     if more else "")))
    for path, reason in listing.bad:
        _warn(f"data: skipping image '{path}' ({reason}); data.on_bad_image=skip leaves it out.")
    if listing.others:
        named = ", ".join(f"'{p}'" for p in listing.others[:3]) + (" ..." if len(listing.others) > 3 else "")
        _warn(f"data: ignoring {len(listing.others)} file(s) below '{folder}' that are not images by their "
              f"name ({', '.join(IMAGE_EXTENSIONS)}): {named}")
    used = {label for _, label in listing.samples}
    empty = [c for i, c in enumerate(listing.classes) if i not in used]
    if empty:
        raise UserError(f"data.root: class folder(s) {', '.join(map(repr, empty))} in '{folder}' hold no "
                        f"images; add images (.jpg, .png, ...) or remove the folder(s).")
    if len(listing.classes) == 1:
        raise UserError(f"data.root '{folder}' has only one class folder ('{listing.classes[0]}'); an "
                        f"image-classification run needs at least two.")


class ImageFiles:
    """The image files of one folder, shared by its splits and by their loaders' worker processes."""

    def __init__(self, folder: Path, policy: str) -> None:
        if not folder.is_dir():
            raise UserError(f"data.root: no folder at '{folder}'; point data.root at a folder with one "
                            f"subfolder of images per class (or train/ and val/ folders laid out that way).")
        listing = _list_folder(folder)
        _check_listing(folder, listing, policy)
        self.folder, self.policy, self.classes = folder, policy, listing.classes
        self.paths = [path for path, _ in listing.samples]
        self.targets = [label for _, label in listing.samples]
        self.skipped_at_start = len(listing.bad)  # nonzero only with policy skip
        # 1 once a file failed to decode. In shared memory, so a loader worker's finding reaches
        # the parent, and the other workers skip the file without decoding it again; the lock
        # keeps two workers from both reporting it. A spawn-context lock reaches workers started
        # any way (a fork-context one cannot be handed to spawned or forkserver workers).
        self.bad = torch.zeros(max(1, len(self.paths)), dtype=torch.uint8).share_memory_()
        self._report_lock = multiprocessing.get_context("spawn").Lock()

    def load(self, index: int) -> Image.Image | None:
        """File ``index`` as RGB; None when it cannot be decoded and the policy is skip."""
        if self.bad[index]:
            return None
        path = self.paths[index]
        try:
            return decode_rgb(path)
        except Exception as exc:  # noqa: BLE001 -- decoders of untrusted files raise many types
            if self.policy == "stop":
                raise BadImage(_bad_sentence(path, _reason(exc))) from exc
            with self._report_lock:
                first = not self.bad[index]
                self.bad[index] = 1
            if first:
                _warn(f"data: skipping image '{path}' ({_reason(exc)}); data.on_bad_image=skip uses the next "
                      f"image of its split in its place.")
            return None


class ImageSplit(Dataset):
    """The files ``indices`` of an ``ImageFiles``; a file that cannot be decoded (policy skip) is
    replaced by the split's next good one, so batches keep their size and the splits stay disjoint."""

    def __init__(self, files: ImageFiles, indices: Sequence[int], transform: Callable[[Any], Any]) -> None:
        self.files, self.indices, self.transform = files, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[Any, int]:
        for step in range(len(self.indices)):
            index = self.indices[(position + step) % len(self.indices)]
            image = self.files.load(index)
            if image is not None:
                return self.transform(image), self.files.targets[index]
        raise BadImage(f"data: none of the {len(self.indices)} images of this split below '{self.files.folder}' "
                       f"could be decoded (data.on_bad_image=skip skipped them all); check the files.")


def bad_image_count(*datasets: Any) -> int:
    """Image files skipped so far (``data.on_bad_image=skip``) over these datasets or loaders, each once.

    Includes what their loader workers found (the flags are in shared memory). Each DDP process
    counts the files it loaded itself, plus those left out at start-up.
    """
    found: dict[int, ImageFiles] = {}
    for ds in datasets:
        while not isinstance(ds, ImageSplit) and hasattr(ds, "dataset"):  # loaders, SeededSamples
            ds = ds.dataset
        if isinstance(ds, ImageSplit):
            found[id(ds.files)] = ds.files
    return sum(f.skipped_at_start + int(f.bad.sum()) for f in found.values())


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


def build_imagefolder(root: Path, policy: str, val_fraction: float, seed: int, train_tf: Callable[[Any], Any],
                      val_tf: Callable[[Any], Any]) -> tuple[Dataset, Dataset, int]:
    """``(train, val, num_classes)`` from ``root/train`` and ``root/val``, or from ``root`` split per class."""
    train_dir = root / "train" if (root / "train").is_dir() else root
    files = ImageFiles(train_dir, policy)
    if (root / "val").is_dir() and train_dir != root:
        val_files = ImageFiles(root / "val", policy)
        # Labels are indices into the sorted class names, so both splits must share them.
        if val_files.classes != files.classes:
            raise UserError(f"data.root: '{root / 'val'}' and '{train_dir}' hold different class folders; "
                            f"use the same class names in both.")
        return (ImageSplit(files, range(len(files.paths)), train_tf),
                ImageSplit(val_files, range(len(val_files.paths)), val_tf), len(files.classes))
    train_idx, val_idx = _stratified_split(files.targets, val_fraction, seed)
    if not val_idx:
        raise UserError(f"data.val_fraction: every class in '{train_dir}' has a single image, so none is "
                        f"left for validation; add images or a '{root / 'val'}' folder.")
    return ImageSplit(files, train_idx, train_tf), ImageSplit(files, val_idx, val_tf), len(files.classes)
