"""Image folders on real files: every PIL mode decoded to the right RGB, links that cannot loop or
relabel, hidden files ignored, and bad files named (stop) or skipped and counted (skip), also from
inside DataLoader worker processes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf
from PIL import Image, UnidentifiedImageError

from capsexp.data import datasets as data
from capsexp.data.datasets import bad_image_count, build_datasets, build_loaders, shutdown_workers
from capsexp.errors import UserError
from capsexp.data.imagefolder import IMAGE_EXTENSIONS, ImageSplit, decode_rgb
from conftest import TINY, run_cli

CONF = Path(data.__file__).parents[1] / "conf" / "data" / "imagefolder.yaml"
BACKDROP = (124, 116, 104)  # round(255 * ImageNet mean): what transparent pixels become
ENDING = "; remove it, or set data.on_bad_image=skip."


def folder_cfg(root: Path, **overrides: object) -> DictConfig:
    cfg = OmegaConf.load(CONF)
    cfg.merge_with({"root": str(root), "image_size": 32, "num_workers": 0, **overrides})
    return cfg


_OPEN: list = []


@pytest.fixture(autouse=True)
def _workers_ended() -> Iterator[None]:
    # a loader whose iteration raised is held by the exception; left to the garbage collector, its
    # workers take 10 s to end: end them with the test, as train(cfg) does with its own
    yield
    shutdown_workers(*_OPEN)
    _OPEN.clear()


def open_loaders(cfg: DictConfig, train: Any, val: Any, **kwargs: Any) -> tuple:
    loaders = build_loaders(cfg, train, val, **kwargs)
    _OPEN.extend(loaders)
    return loaders


def noise_images(folder: Path, count: int, seed: int = 0, suffix: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [folder / f"{i}{suffix}" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    return paths


def truncated_jpeg(path: Path) -> Path:
    """A real JPEG of noise cut in half: its header reads fine, its pixels do not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path, "JPEG")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


# ---------------------------------------------------------------- decoding


def _palette_with_transparency(path: Path) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255])  # index 0 red (transparent), 1 blue
    image.putpixel((1, 0), 1)
    image.save(path, transparency=0)


def _cmyk(path: Path) -> None:
    image = Image.new("CMYK", (2, 1))
    image.putpixel((0, 0), (0, 255, 255, 0))
    image.putpixel((1, 0), (0, 0, 0, 255))
    image.save(path)


def _array(values: list, dtype: str) -> Callable[[Path], None]:
    """A writer of a one-row image; PIL picks the mode from the dtype and the channel count."""
    return lambda path: Image.fromarray(np.array([values], dtype=dtype)).save(path)


# (file name, how to write it, the mode PIL opens it in, the RGB of its pixels in order)
MODES = [
    # 16-bit by the type's range: 32768 -> 128, not clipped to white as PIL's convert would
    ("i16.png", _array([0, 32768, 65535, 25700], "uint16"), "I;16", [0, 128, 255, 100]),
    ("i32_16bit.tif", _array([0, 32768, 65535, 25700], "int32"), "I", [0, 128, 255, 100]),
    ("i32_wide.tif", _array([0, 100000, 200000, 50000], "int32"), "I", [0, 128, 255, 64]),  # own min..max
    ("f_unit.tif", _array([0.0, 0.5, 1.0, 0.2], "float32"), "F", [0, 128, 255, 51]),
    ("f_wide.tif", _array([-1.0, 1.0, 3.0, 0.0], "float32"), "F", [0, 128, 255, 64]),
    ("bilevel.png", lambda p: Image.fromarray(np.array([[False, True]])).save(p), "1", [0, 255]),
    ("la.png", _array([[200, 0], [200, 255]], "uint8"), "LA", [BACKDROP, (200, 200, 200)]),
    ("rgba.png", _array([[255, 0, 0, 0], [0, 255, 0, 255]], "uint8"), "RGBA", [BACKDROP, (0, 255, 0)]),
    ("palette.png", _palette_with_transparency, "P", [BACKDROP, (0, 0, 255)]),
    ("palette.gif", _palette_with_transparency, "P", [BACKDROP, (0, 0, 255)]),
    ("cmyk.tif", _cmyk, "CMYK", [(255, 0, 0), (0, 0, 0)]),
]


@pytest.mark.parametrize(("name", "write", "mode", "expected"), MODES, ids=[m[0] for m in MODES])
def test_every_mode_decodes_to_the_right_rgb(tmp_path: Path, name: str, write: Callable[[Path], None],
                                             mode: str, expected: list) -> None:
    path = tmp_path / name
    write(path)
    assert Image.open(path).mode == mode  # the file really is in the mode under test
    image = decode_rgb(str(path))
    assert image.mode == "RGB"
    pixels = [image.getpixel((x, 0)) for x in range(image.width)]
    assert pixels == [p if isinstance(p, tuple) else (p, p, p) for p in expected]


def test_cmyk_jpeg_and_exif_orientation(tmp_path: Path) -> None:
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    assert np.abs(np.asarray(decode_rgb(str(tmp_path / "cmyk.jpg"))).astype(int) - (255, 0, 0)).max() <= 3
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; viewers rotate by 90 degrees
    Image.new("RGB", (6, 2), (10, 20, 30)).save(tmp_path / "turned.jpg", exif=exif)
    assert decode_rgb(str(tmp_path / "turned.jpg")).size == (2, 6)


def test_deep_and_transparent_images_go_through_the_dataset(tmp_path: Path) -> None:
    for name, write, _, _ in MODES:
        (tmp_path / "deep").mkdir(exist_ok=True)
        write(tmp_path / "deep" / name)
    noise_images(tmp_path / "plain", 3)
    train, val, classes = build_datasets(folder_cfg(tmp_path, val_fraction=0.2), seed=0)
    assert classes == 2 and len(train) + len(val) == len(MODES) + 3
    for ds in (train, val):
        for i in range(len(ds)):
            image, _ = ds[i]
            assert image.shape == (3, 32, 32) and bool(image.isfinite().all())


# ---------------------------------------------------------------- listing


def _labels_by_folder(root: Path, ds: ImageSplit) -> list[tuple[str, str]]:
    """(class of the sample, top folder its file really lies in) for every sample."""
    files = ds.files
    return [(files.classes[files.targets[i]],
             Path(os.path.realpath(files.paths[i])).relative_to(root.resolve()).parts[0]) for i in ds.indices]


def test_folder_links_neither_loop_nor_relabel_nor_leave_the_root(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "images"
    noise_images(root / "cats", 3)
    noise_images(root / "cats" / "sub", 1, seed=1)
    noise_images(root / "dogs", 3, seed=2)
    noise_images(tmp_path / "elsewhere", 2, seed=3)
    (root / "cats" / "loop").symlink_to(".")
    (root / "cats" / "up").symlink_to("..")
    (root / "cats" / "again").symlink_to("sub")  # the same folder twice
    (root / "dogs" / "cats").symlink_to("../cats")  # would relabel every cat as a dog
    (root / "dogs" / "out").symlink_to(tmp_path / "elsewhere")
    (root / "lynx").symlink_to(tmp_path / "elsewhere")  # a class folder outside the root
    train, val, classes = build_datasets(folder_cfg(root, val_fraction=0.3), seed=0)
    assert classes == 2 and len(train) + len(val) == 7  # 3 + 1 cats, 3 dogs: each file once
    pairs = _labels_by_folder(root, train) + _labels_by_folder(root, val)
    assert all(label == top for label, top in pairs)
    err = capsys.readouterr().err
    assert f"not following the folder link '{root / 'dogs' / 'out'}': it leads outside" in err
    assert f"not following the folder link '{root / 'lynx'}': it leads outside" in err
    assert f"not following the folder link '{root / 'cats' / 'loop'}': it leads to a folder already read" in err


def test_hidden_files_and_forks_are_ignored_and_other_files_named(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    noise_images(tmp_path / "a", 2)
    noise_images(tmp_path / "b", 2, seed=1)
    (tmp_path / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # a macOS resource fork
    (tmp_path / "a" / ".hidden.jpg").write_bytes(b"")
    noise_images(tmp_path / "a" / ".ipynb_checkpoints", 2, seed=2)
    noise_images(tmp_path / ".trash", 2, seed=3)  # a hidden folder is no class
    (tmp_path / "b" / "labels.csv").write_text("0,1\n")
    train, val, classes = build_datasets(folder_cfg(tmp_path, val_fraction=0.5), seed=0)
    assert classes == 2 and len(train) + len(val) == 4
    err = capsys.readouterr().err
    assert f"ignoring 1 file(s) below '{tmp_path}' that are not images by their name" in err
    assert f"'{tmp_path / 'b' / 'labels.csv'}'" in err and "._0.png" not in err
    assert ".gif" in IMAGE_EXTENSIONS


# ---------------------------------------------------------------- bad files, stop


def _make_bad(kind: str, path: Path) -> str:
    """Write a bad file of ``kind`` at ``path``; the reason the error gives."""
    if kind == "empty":
        path.write_bytes(b"")
        return "empty file"
    if kind == "dangling":
        path.symlink_to(path.parent / "gone.jpg")
        return "a link to a missing file"
    if kind == "fifo":
        os.mkfifo(path)
        return "not a regular file"
    if kind == "text":
        path.write_text("this is not a JPEG\n")
        return "not an image in a format capsexp reads (JPEG, PNG, PPM, BMP, TIFF, WEBP, GIF)"
    truncated_jpeg(path)
    return "image file is truncated"


@pytest.mark.parametrize("kind", ["empty", "dangling", "fifo"])
def test_bad_file_found_at_start_up_is_named(tmp_path: Path, kind: str) -> None:
    noise_images(tmp_path / "a", 2)
    noise_images(tmp_path / "b", 2, seed=1)
    bad = tmp_path / "b" / "bad.jpg"
    reason = _make_bad(kind, bad)
    with pytest.raises(UserError) as err:
        build_datasets(folder_cfg(tmp_path), seed=0)
    assert str(err.value) == f"data: cannot decode image '{bad}' ({reason}){ENDING}"


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_bad_file_found_in_a_loader_worker_is_named_in_one_sentence(tmp_path: Path, kind: str) -> None:
    noise_images(tmp_path / "a", 3)
    noise_images(tmp_path / "b", 3, seed=1)
    bad = tmp_path / "a" / "bad.jpg"
    reason = _make_bad(kind, bad)
    cfg = folder_cfg(tmp_path, num_workers=1, batch_size=2, val_fraction=0.3)
    train, val, _ = build_datasets(cfg, seed=0)  # the contents are not read at start-up
    loaders = open_loaders(cfg, train, val, seed=0)
    with pytest.raises(UserError) as err:  # re-raised by torch in this process, still a UserError
        for loader in loaders:
            list(loader)
    message = str(err.value)
    assert message.startswith(f"data: cannot decode image '{bad}' ({reason}") and message.endswith(ENDING)
    assert "\n" not in message and "Traceback" not in message and "worker" not in message


@pytest.mark.slow
def test_cli_stops_with_one_line_naming_the_file(tmp_path: Path) -> None:
    for c in ("a", "b"):
        for i in range(2):
            truncated_jpeg(tmp_path / "images" / c / f"{i}.jpg")
    tiny = [a for a in TINY if not a.startswith(("data.train_size", "data.val_size", "data.batch_size"))]
    proc = run_cli("train", *tiny, "data=imagefolder", f"data.root={tmp_path / 'images'}", "data.batch_size=2",
                   "data.num_workers=1", "data.val_fraction=0.5", f"hydra.run.dir={tmp_path / 'run'}",
                   cwd=tmp_path, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1].startswith(f"capsexp: error: data: cannot decode image '{tmp_path / 'images'}")
    assert lines[-1].endswith(ENDING) and "image file is truncated" in lines[-1]


# ---------------------------------------------------------------- bad files, skip


def test_skip_replaces_bad_images_and_counts_them_in_the_parent(tmp_path: Path,
                                                                capfd: pytest.CaptureFixture) -> None:
    noise_images(tmp_path / "a", 5)
    noise_images(tmp_path / "b", 5, seed=1)
    bad = [tmp_path / "a" / "truncated.jpg", tmp_path / "a" / "text.png", tmp_path / "b" / "empty.png"]
    for kind, path in zip(("truncated", "text", "empty"), bad):
        _make_bad(kind, path)
    # a: 7 files (2 val, 5 train), b: 5 once the empty one is left out (1 val, 4 train)
    cfg = folder_cfg(tmp_path, on_bad_image="skip", num_workers=2, batch_size=3, val_fraction=0.25)
    train, val, _ = build_datasets(cfg, seed=0)
    assert bad_image_count(train, val) == 1  # the empty file, left out at start-up
    train_loader, val_loader = open_loaders(cfg, train, val, seed=0)
    for epoch in range(2):
        train_loader.sampler.set_epoch(epoch)
        sizes = [len(y) for _, y in train_loader]
        assert sizes == [3, 3, 3]  # every batch full: the bad files' places were filled
        assert sum(len(y) for _, y in val_loader) == len(val) == 3
    # decoded (and found bad) in worker processes, counted here, each file once
    assert bad_image_count(train_loader, val_loader) == bad_image_count(train, val, train) == 3
    err = capfd.readouterr().err
    for path in bad:
        assert err.count(f"skipping image '{path}'") == 1, err


def test_skip_replacement_is_the_same_in_every_run(tmp_path: Path) -> None:
    noise_images(tmp_path / "a", 4)
    noise_images(tmp_path / "b", 4, seed=1)
    _make_bad("text", tmp_path / "a" / "2b.png")
    cfg = folder_cfg(tmp_path, on_bad_image="skip", batch_size=3, val_fraction=0.25)

    def epoch() -> list:
        train, val, _ = build_datasets(cfg, seed=0)
        return [x for x, _ in open_loaders(cfg, train, val, seed=0)[0]]

    first, second = epoch(), epoch()
    assert all(bool((a == b).all()) for a, b in zip(first, second))


def test_skip_with_no_decodable_image_says_so(tmp_path: Path) -> None:
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            _make_bad("text", tmp_path / c / f"{i}.png")
    cfg = folder_cfg(tmp_path, on_bad_image="skip", val_fraction=0.5, batch_size=2, num_workers=1)
    train, val, _ = build_datasets(cfg, seed=0)
    with pytest.raises(UserError) as err:  # found in a worker process, told in one sentence
        list(open_loaders(cfg, train, val, seed=0)[0])
    assert str(err.value) == (f"data: none of the 2 images of this split below '{tmp_path}' could be decoded "
                              f"(data.on_bad_image=skip skipped them all); check the files.")


# ---------------------------------------------------------------- untrusted content


POSTSCRIPT = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 40 40\nnewpath 0 0 moveto 40 40 lineto stroke\nshowpage\n"


def test_postscript_named_jpg_never_starts_ghostscript(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a stand-in gs first on PATH: Pillow's EPS decoder would run it on the file; it must never run
    bin_dir, marker = tmp_path / "bin", tmp_path / "gs-ran"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    noise_images(tmp_path / "images" / "a", 2)
    noise_images(tmp_path / "images" / "b", 2, seed=1)
    planted = tmp_path / "images" / "a" / "page.jpg"
    planted.write_bytes(POSTSCRIPT)
    with pytest.raises(UnidentifiedImageError):
        decode_rgb(str(planted))
    cfg = folder_cfg(tmp_path / "images", num_workers=1, batch_size=2, val_fraction=0.5)
    train, val, _ = build_datasets(cfg, seed=0)
    with pytest.raises(UserError) as err:
        for loader in open_loaders(cfg, train, val, seed=0):
            list(loader)
    assert str(err.value) == (f"data: cannot decode image '{planted}' (not an image in a format capsexp reads "
                              f"(JPEG, PNG, PPM, BMP, TIFF, WEBP, GIF)){ENDING}")
    assert not marker.exists()


def test_a_link_loop_is_a_bad_file_and_a_class_link_is_named(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    noise_images(tmp_path / "c", 2)
    noise_images(tmp_path / "d", 2, seed=1)
    (tmp_path / "c" / "x.jpg").symlink_to(tmp_path / "c" / "y.jpg")
    (tmp_path / "c" / "y.jpg").symlink_to(tmp_path / "c" / "x.jpg")
    (tmp_path / "a").symlink_to(tmp_path / "c")  # a class folder that is another class folder
    with pytest.raises(UserError) as err:
        build_datasets(folder_cfg(tmp_path), seed=0)
    message = str(err.value)  # the loop is a bad file in one sentence, not a crash of the listing
    assert message.startswith(f"data: cannot decode image '{tmp_path / 'c' / 'x.jpg'}' (Too many levels of "
                              f"symbolic links; 1 more unusable file(s) below") and message.endswith(ENDING)
    (tmp_path / "c" / "x.jpg").unlink()
    (tmp_path / "c" / "y.jpg").unlink()
    train, val, classes = build_datasets(folder_cfg(tmp_path, val_fraction=0.5), seed=0)
    assert classes == 2 and len(train) + len(val) == 4  # c read once, as itself; the link a skipped
    assert f"not following the folder link '{tmp_path / 'a'}': it leads to a folder already read" in \
        capsys.readouterr().err
