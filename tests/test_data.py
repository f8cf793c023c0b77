"""Tests for capsexp.data.datasets and capsexp.data.shapes: procedural shapes, their checksummed cache, the data
group's config checks, image-folder layouts and loaders (decoding and bad files: test_imagefolder.py)."""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from capsexp.data import datasets as data
from capsexp.data import shapes
from capsexp.config.validation import validate
from capsexp.data.datasets import build_datasets, build_loaders, build_transform, shutdown_workers
from capsexp.errors import UserError
from capsexp.data.shapes import IMAGENET_MEAN, IMAGENET_STD, SHAPES_CLASSES, ShapesDataset, render_shapes
from conftest import make_cfg

CONF = Path(data.__file__).parents[1] / "conf" / "data"
N_CLASSES = len(SHAPES_CLASSES)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep the default cache out of the real home folder.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def data_cfg(dataset: str, **overrides: object) -> DictConfig:
    """The shipped config of ``dataset`` with ``overrides`` applied."""
    cfg = OmegaConf.load(CONF / f"{dataset}.yaml")
    cfg.merge_with(overrides)
    return cfg


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def make_folder(root: Path, classes: dict[str, int], size: int = 8) -> None:
    """``count`` small images per class under ``root/<class>/``, one of them grey-scale."""
    for c, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            mode = "L" if i == 0 else "RGB"
            colour = 40 * c + 20 * i if mode == "L" else (40 * c, 20 * i, 100)
            Image.new(mode, (size, size + 2), colour).save(root / name / f"{i}.png")


# ---------------------------------------------------------------- shapes


def test_shapes_deterministic_per_seed() -> None:
    a = ShapesDataset("train", 16, 32, seed=0, cache=False)
    b = ShapesDataset("train", 16, 32, seed=0, cache=False)
    c = ShapesDataset("train", 16, 32, seed=1, cache=False)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)


def test_shapes_image_depends_only_on_seed_split_index() -> None:
    assert torch.equal(render_shapes("train", 8, 32, 0), render_shapes("train", 16, 32, 0)[:8])


def test_shapes_balanced_and_labels_cycle() -> None:
    ds = ShapesDataset("train", 3 * N_CLASSES, 32, seed=0, cache=False)
    counts = Counter(ds[i][1] for i in range(len(ds)))
    assert counts == {c: 3 for c in range(N_CLASSES)}
    assert [ds[i][1] for i in range(N_CLASSES)] == list(range(N_CLASSES))


def test_shapes_train_and_val_are_disjoint() -> None:
    train = render_shapes("train", 16, 32, 0)
    val = render_shapes("val", 16, 32, 0)
    # No val image equals any train image.
    assert not (train[:, None] == val[None]).flatten(2).all(-1).any()


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_items_normalised_float_3xSxS(size: int) -> None:
    ds = ShapesDataset("val", N_CLASSES, size, seed=0, cache=False)
    image, label = ds[3]
    assert image.shape == (3, size, size) and image.dtype == torch.float32
    assert isinstance(label, int) and label == 3
    pixels = unnormalise(image)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert torch.allclose(pixels * 255, ds.images[3].float(), atol=1e-3)


def radial_profile(images: torch.Tensor, bins: int = 8) -> torch.Tensor:
    """Rotation-, scale- and position-free outline features of uint8 shapes ``[N, 3, S, S]``.

    The foreground is whatever differs strongly from the border's median colour (the clutter
    stays close to it); the features are its fill fraction in rings around its centroid.
    """
    x = images.float()
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 0], x[..., -1]], dim=2).median(dim=2).values
    mask = ((x - border[..., None, None]).norm(dim=1) > 100).float()
    ys, xs = torch.meshgrid(*(torch.arange(x.shape[-1], dtype=torch.float32),) * 2, indexing="ij")
    area = mask.sum((1, 2))
    cy, cx = ((mask * ys).sum((1, 2)) / area), ((mask * xs).sum((1, 2)) / area)
    r = ((ys - cy[:, None, None]) ** 2 + (xs - cx[:, None, None]) ** 2).sqrt()
    rel = r / (r * mask).flatten(1).max(1).values[:, None, None]
    ring = (rel[:, None] * bins).floor().clamp(max=bins - 1) == torch.arange(bins).view(1, bins, 1, 1)
    return (ring * mask[:, None]).sum((2, 3)) / ring.sum((2, 3)).clamp(min=1)


def test_shapes_learnable_from_outline() -> None:
    # Nearest class centroid on outline features, ignoring colour: far above chance.
    train, val = render_shapes("train", 30 * N_CLASSES, 32, 0), render_shapes("val", 20 * N_CLASSES, 32, 0)
    f_train, f_val = radial_profile(train), radial_profile(val)
    labels = torch.arange(len(f_train)) % N_CLASSES
    centroids = torch.stack([f_train[labels == c].mean(0) for c in range(N_CLASSES)])
    predicted = torch.cdist(f_val, centroids).argmin(1)
    assert (predicted == torch.arange(len(f_val)) % N_CLASSES).float().mean() > 0.8


def test_shapes_cache_written_then_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ShapesDataset("train", 10, 32, seed=3, cache_dir=tmp_path)
    assert first.cache_path.parent == tmp_path and first.cache_path.is_file()
    assert "seed3" in first.cache_path.name and "train" in first.cache_path.name
    assert not list(tmp_path.glob("*.tmp"))  # the temp file was renamed into place

    def no_render(*args: object) -> torch.Tensor:
        raise AssertionError("rendered although a valid cache exists")

    monkeypatch.setattr(shapes, "render_shapes", no_render)
    second = ShapesDataset("train", 10, 32, seed=3, cache_dir=tmp_path)
    assert torch.equal(first.images, second.images)


def test_shapes_corrupt_cache_is_rendered_again(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    first = ShapesDataset("val", 10, 32, seed=0, cache_dir=tmp_path)
    first.cache_path.write_bytes(b"not a tensor file")
    again = ShapesDataset("val", 10, 32, seed=0, cache_dir=tmp_path)
    assert torch.equal(first.images, again.images)
    assert torch.equal(torch.load(again.cache_path, weights_only=True)["images"], first.images)
    assert f"the shapes cache '{first.cache_path}' is unreadable" in capsys.readouterr().err


def test_shapes_cache_with_a_flipped_byte_is_rendered_again(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = data_cfg("shapes", train_size=10, val_size=8, image_size=32, root=str(tmp_path))
    path = build_datasets(cfg, seed=0)[0].cache_path
    clean = render_shapes("train", 10, 32, 0)
    raw = bytearray(path.read_bytes())
    offset = bytes(raw).find(clean.numpy().tobytes()[:256])  # where the pixels sit in the file
    assert offset > 0
    raw[offset + 1000] ^= 0x01
    path.write_bytes(bytes(raw))
    # torch.load itself notices nothing: the damaged pixels would be trained on
    assert not torch.equal(torch.load(path, weights_only=True)["images"], clean)
    capsys.readouterr()
    again = build_datasets(cfg, seed=0)[0]
    assert torch.equal(again.images, clean)
    assert f"capsexp: WARNING the shapes cache '{path}' does not match its checksum" in capsys.readouterr().err
    # rewritten: the next build reads it silently and gets the clean render
    assert torch.equal(build_datasets(cfg, seed=0)[0].images, clean)
    assert capsys.readouterr().err == ""


def test_shapes_default_cache_under_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-home"))
    ds = ShapesDataset("val", 4, 32, seed=0)
    assert ds.cache_path.parent == tmp_path / "cache-home" / "capsexp" and ds.cache_path.is_file()


def test_build_datasets_shapes(tmp_path: Path) -> None:
    cfg = data_cfg("shapes", train_size=16, val_size=8, image_size=32, root=str(tmp_path))
    train, val, num_classes = build_datasets(cfg, seed=0)
    assert (len(train), len(val), num_classes) == (16, 8, N_CLASSES) and N_CLASSES >= 6
    assert train[0][0].shape == (3, 32, 32)


# ---------------------------------------------------------------- config checks


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.image_size=31"], "data.image_size=31 is not allowed; it must be an integer >= 32 (pixels)."),
    (["data.image_size=big"], "data.image_size='big' is not allowed; it must be an integer >= 32 (pixels)."),
    (["data.batch_size=-1"], "data.batch_size=-1 is not allowed; it must be a positive integer."),
    (["data.num_workers=-1"], "data.num_workers=-1 is not allowed; it must be an integer >= 0."),
    (["data.train_size=0"], "data.train_size=0 is not allowed; it must be a positive integer."),
    (["data.download=maybe"], "data.download='maybe' is not allowed; it must be true or false."),
    (["data=imagefolder", "data.root=/x", "data.val_fraction=1.5"],
     "data.val_fraction=1.5 is not allowed; it must be in (0, 1)."),
    (["data=imagefolder", "data.root=/x", "data.on_bad_image=ignore"],
     "data.on_bad_image='ignore' is not allowed; it must be stop or skip."),
    (["data=imagefolder"], "data.root is required for data=imagefolder; pass data.root=/path/to/images."),
    (["data=cifar10", "data.root=null"],
     "data.root is not set; point it at the dataset folder, e.g. data.root=/data/x."),
])
def test_bad_data_config_is_one_sentence_naming_the_key(overrides: list[str], message: str) -> None:
    cfg = make_cfg(*overrides, tiny=not overrides[0].startswith("data="))  # tiny sets shapes-only keys
    with pytest.raises(UserError) as err:
        validate(cfg)
    assert str(err.value) == message


def test_smallest_image_size_is_accepted() -> None:
    validate(make_cfg(f"data.image_size={data.MIN_IMAGE_SIZE}"))
    validate(make_cfg("data=imagefolder", "data.root=/x", f"data.image_size={data.MIN_IMAGE_SIZE}", tiny=False))
    assert data.MIN_IMAGE_SIZE == 32


def test_missing_cifar10_without_download(tmp_path: Path) -> None:
    cfg = data_cfg("cifar10", root=str(tmp_path / "cifar10"), download=False)
    with pytest.raises(UserError, match="data.download=true") as err:
        build_datasets(cfg, seed=0)
    assert str(err.value).startswith("data.root: no CIFAR-10 found at")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_grey_scale_becomes_three_channels(name: str) -> None:
    digit = Image.new("L", (28, 28), 0)
    digit.paste(255, (10, 4, 18, 24))
    for train in (False, True):
        out = build_transform(name, 32, train=train)(digit)
        assert out.shape == (3, 32, 32) and type(out) is torch.Tensor
        pixels = unnormalise(out)
        assert torch.allclose(pixels, pixels[:1].expand(3, -1, -1), atol=1e-5)  # R == G == B
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


# ---------------------------------------------------------------- image folders


def test_imagefolder_flat_root_is_split_by_seed(tmp_path: Path) -> None:
    make_folder(tmp_path, {"cats": 4, "dogs": 4})
    cfg = data_cfg("imagefolder", root=str(tmp_path), image_size=32, val_fraction=0.25)
    train, val, num_classes = build_datasets(cfg, seed=0)
    assert (num_classes, len(train), len(val)) == (2, 6, 2)
    assert sorted(val[i][1] for i in range(len(val))) == [0, 1]  # every class reaches validation
    for ds in (train, val):
        image, label = ds[0]
        assert image.shape == (3, 32, 32) and label in (0, 1)
        assert unnormalise(image).min() >= -1e-5 and unnormalise(image).max() <= 1 + 1e-5
    again, _, _ = build_datasets(cfg, seed=0)
    assert train.indices == again.indices


def test_imagefolder_train_val_layout(tmp_path: Path) -> None:
    make_folder(tmp_path / "train", {"a": 2, "b": 2, "c": 2})
    make_folder(tmp_path / "val", {"a": 1, "b": 1, "c": 1})
    train, val, num_classes = build_datasets(data_cfg("imagefolder", root=str(tmp_path), image_size=32), 0)
    assert (num_classes, len(train), len(val)) == (3, 6, 3)
    assert val[2][0].shape == (3, 32, 32) and val[2][1] == 2


@pytest.mark.parametrize(("layout", "words"), [
    ("missing", "no folder at"),
    ("empty", "no class subfolders"),
    ("one_class", "only one class folder ('cats')"),
    ("empty_class", "hold no images"),
    ("hidden_only", "hold no images"),
])
def test_imagefolder_errors_name_data_root(tmp_path: Path, layout: str, words: str) -> None:
    root = tmp_path / "images"
    if layout == "empty":
        root.mkdir()
    elif layout == "one_class":
        make_folder(root, {"cats": 2})
    elif layout == "empty_class":
        make_folder(root, {"cats": 2})
        (root / "dogs").mkdir()
    elif layout == "hidden_only":  # a macOS fork and a hidden file are not images of the class
        make_folder(root, {"cats": 2, "dogs": 1})
        (root / "dogs" / "0.png").rename(root / "dogs" / "._0.png")
        (root / "dogs" / ".thumb.png").write_bytes((root / "dogs" / "._0.png").read_bytes())
    cfg = data_cfg("imagefolder", root=str(root))
    with pytest.raises(UserError, match="data.root") as err:
        build_datasets(cfg, seed=0)
    assert words in str(err.value)


# ---------------------------------------------------------------- loaders


def small_shapes(tmp_path: Path, batch_size: int = 4, num_workers: int = 0) -> tuple:
    cfg = data_cfg("shapes", train_size=18, val_size=6, image_size=32, root=str(tmp_path),
                   batch_size=batch_size, num_workers=num_workers)
    train, val, _ = build_datasets(cfg, seed=0)
    return cfg, train, val


def test_loader_order_reproducible_and_drop_last(tmp_path: Path) -> None:
    cfg, train, val = small_shapes(tmp_path)

    def first_epoch(seed: int) -> list[list[int]]:
        return [y.tolist() for _, y in build_loaders(cfg, train, val, seed=seed)[0]]

    assert first_epoch(0) == first_epoch(0) != first_epoch(1)
    assert [len(b) for b in first_epoch(0)] == [4, 4, 4, 4]  # 18 images: the partial batch is dropped
    train_loader, val_loader = build_loaders(cfg, train, val, seed=0)
    assert [y.tolist() for _, y in val_loader] == [[0, 1, 2, 3], [4, 5]]
    epochs = []
    for epoch in range(2):
        train_loader.sampler.set_epoch(epoch)
        epochs.append([y.tolist() for _, y in train_loader])
    assert epochs[0] != epochs[1]  # a new order every epoch
    train_loader.sampler.set_epoch(0, skip=8)  # resuming after two batches of 4
    assert [y.tolist() for _, y in train_loader] == epochs[0][2:]


def test_loader_options_passed_through(tmp_path: Path) -> None:
    cfg, train, val = small_shapes(tmp_path, num_workers=2)
    train_loader, val_loader = build_loaders(cfg, train, val, seed=0, pin_memory=True)
    for loader in (train_loader, val_loader):
        assert loader.persistent_workers and loader.pin_memory and loader.num_workers == 2
    cfg.num_workers = 0
    assert not build_loaders(cfg, train, val, seed=0)[0].persistent_workers


def test_batch_larger_than_train_set(tmp_path: Path) -> None:
    cfg, train, val = small_shapes(tmp_path, batch_size=32)
    with pytest.raises(UserError, match="data.batch_size"):
        build_loaders(cfg, train, val, seed=0)


def test_ddp_shards_make_up_the_single_process_batches(tmp_path: Path) -> None:
    cfg, train, val = small_shapes(tmp_path, batch_size=2)
    shards = [build_loaders(cfg, train, val, seed=5, rank=r, world_size=2)[0] for r in range(2)]
    cfg.batch_size = 4
    single = build_loaders(cfg, train, val, seed=5)[0]
    per_rank = [[sorted(y.tolist()) for _, y in loader] for loader in shards]
    for k, (_, y) in enumerate(single):  # global batch k = the union of the ranks' batch k
        assert sorted(per_rank[0][k] + per_rank[1][k]) == sorted(y.tolist())


class _ParentPid(torch.utils.data.Dataset):
    """Each item is the pid of the parent of the process that loads it."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.tensor(os.getppid()), index


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_loader_workers_are_children_of_the_training_process(start_method: str) -> None:
    # a SIGTERM to the process group kills a forkserver, and torch ends a worker whose parent died: the
    # run would stop with a traceback instead of saving (forkserver is Python 3.14's default on Linux)
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method(start_method, force=True)
    try:
        cfg = data_cfg("shapes", batch_size=2, num_workers=2)
        train_loader, val_loader = build_loaders(cfg, _ParentPid(), _ParentPid(), seed=0)
        parents = {int(pid) for loader in (train_loader, val_loader) for batch, _ in loader for pid in batch}
        shutdown_workers(train_loader, val_loader)
    finally:
        multiprocessing.set_start_method(before, force=True)
    assert parents == {os.getpid()}


class _RandomAugmented(torch.utils.data.Dataset):
    """Every item draws from torch's generator, as a random crop or flip does."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.rand(3), index


def _augmented_epochs(loader: Any, epochs: int = 2) -> list[list[torch.Tensor]]:
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        out.append([x for x, _ in loader])
    return out


def test_augmentation_is_a_function_of_seed_epoch_and_sample(tmp_path: Path) -> None:
    cfg = data_cfg("shapes", batch_size=3, num_workers=0)
    augmented = _RandomAugmented()
    loader = build_loaders(cfg, augmented, augmented, seed=3)[0]
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    epochs = _augmented_epochs(loader)
    # iterating the loader left the caller's random stream alone
    assert torch.equal(torch.rand(4), expected_next)
    assert not torch.equal(torch.cat(epochs[0]), torch.cat(epochs[1]))  # fresh draws every epoch
    # the same draws with two worker processes, and after a mid-epoch resume
    cfg.num_workers = 2
    assert all(torch.equal(torch.cat(a), torch.cat(b)) for a, b in
               zip(epochs, _augmented_epochs(build_loaders(cfg, augmented, augmented, seed=3)[0])))
    cfg.num_workers = 0
    resumed = build_loaders(cfg, augmented, augmented, seed=3)[0]
    resumed.sampler.set_epoch(1, skip=6)
    assert torch.equal(torch.cat([x for x, _ in resumed]), torch.cat(epochs[1][2:]))
    other_seed = _augmented_epochs(build_loaders(cfg, augmented, augmented, seed=4)[0])
    assert not torch.equal(torch.cat(other_seed[0]), torch.cat(epochs[0]))


def test_validation_shards_are_not_padded(tmp_path: Path) -> None:
    cfg, train, val = small_shapes(tmp_path, batch_size=2)  # 6 validation images over 4 ranks
    shards = [build_loaders(cfg, train, val, seed=0, rank=r, world_size=4)[1] for r in range(4)]
    seen = [len(loader.sampler) for loader in shards]
    assert seen == [2, 2, 1, 1] and sum(seen) == len(val)
    indices = sorted(i for loader in shards for i in loader.sampler)
    assert indices == list(range(len(val)))  # every image once, none twice
