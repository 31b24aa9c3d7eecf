"""Data sources: image folders, cached archives, MNIST IDX, synthetic, digits, loaders."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import tarfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from chanprune_cli import data
from chanprune_cli.cli import app
from chanprune_cli.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataWarning,
    check_labels,
    make_loader,
    open_dataset,
    parse_floats,
    parse_shape,
)
from chanprune_cli.data import archive as data_archive
from chanprune_cli.data import digits as data_digits
from chanprune_cli.errors import UserError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache: never touch ~/.cache."""
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


def _write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (8, 8), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fill: int | tuple[int, int, int] = color[0] if mode == "L" else color
    img = Image.new(mode, size, fill)
    img.putpixel((0, 0), 0 if mode == "L" else (0, 0, 0))  # not uniform: flips/crops are visible
    img.save(path, quality=95) if path.suffix == ".jpg" else img.save(path)


def _make_folder(root: Path, *, mode: str = "RGB", size: tuple[int, int] = (8, 8)) -> Path:
    """cat: 2 PNGs, dog: 1 PNG + 1 JPEG."""
    _write_image(root / "cat" / "a.png", (200, 10, 10), size, mode)
    _write_image(root / "cat" / "b.png", (190, 20, 20), size, mode)
    _write_image(root / "dog" / "c.png", (10, 10, 200), size, mode)
    _write_image(root / "dog" / "d.jpg", (20, 20, 190), size, mode)
    return root


def _tar(src: Path, archive: Path, arcname: str = "test") -> Path:
    mode = "w:gz" if archive.name.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(archive, mode) as tf:
        tf.add(src, arcname=arcname)
    return archive


# --------------------------------------------------------------------------- helpers


def test_parse_helpers() -> None:
    assert parse_floats("0.5, 0.25,1") == (0.5, 0.25, 1.0)
    assert parse_shape("3,32,32") == (3, 32, 32)
    assert parse_shape("1x8x8") == (1, 8, 8)
    assert parse_shape("1,1024") == (1, 1024) and parse_shape("1024") == (1024,)  # 1-D signals: C,L and L
    for bad in ("", "a,b", "0.5,,1", "nan"):
        with pytest.raises(UserError):
            parse_floats(bad, name="mean")
    for bad in ("", "3,0,32", "a,b,c", "3,32,32,1", "0"):
        with pytest.raises(UserError):
            parse_shape(bad)


# --------------------------------------------------------------------------- image folders


def test_image_folder_basic(tmp_path: Path) -> None:
    ds = open_dataset(_make_folder(tmp_path / "imgs"))
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    assert ds.targets == [0, 0, 1, 1]
    assert len(ds) == 4 and ds.skipped == 0
    assert ds.input_shape == (3, 8, 8)
    x, y = ds[2]
    assert x.dtype == torch.float32 and x.shape == (3, 8, 8) and y == 1
    # Default normalisation is ImageNet's: blue pixel (10,10,200) of a dog image.
    expected = (torch.tensor([10, 10, 200]) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[:, 4, 4], expected, atol=1e-5)


def test_image_folder_explicit_stats_and_single_value_broadcast(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "imgs")
    x, _ = open_dataset(root, mean=(0.0,), std=(1.0,))[0]
    assert torch.allclose(x[:, 4, 4], torch.tensor([200, 10, 10]) / 255.0, atol=1e-6)
    x2, _ = open_dataset(root, mean="0,0,0", std="1,1,1")[0]
    assert torch.equal(x, x2)


def test_split_subfolder_is_used(tmp_path: Path) -> None:
    _make_folder(tmp_path / "wrap" / "test")
    ds = open_dataset(tmp_path / "wrap")
    assert ds.classes == ["cat", "dog"] and len(ds) == 4


def test_grayscale_images_become_rgb_and_back(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "gray", mode="L")
    x, _ = open_dataset(root, mean=(0.0,), std=(1.0,))[0]
    assert x.shape == (3, 8, 8)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    rgb = _make_folder(tmp_path / "rgb")
    x1, _ = open_dataset(rgb, input_shape=(1, 8, 8))[0]
    assert x1.shape == (1, 8, 8)


def test_mean_std_length_mismatch(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "imgs")
    with pytest.raises(UserError, match="--mean has 3 value"):
        open_dataset(root, input_shape=(1, 8, 8), mean=IMAGENET_MEAN, std=(0.5,))
    with pytest.raises(UserError, match="--std has 2 value"):
        open_dataset(root, mean=(0.5,), std=(0.5, 0.5))
    with pytest.raises(UserError, match="positive"):
        open_dataset(root, std=(0.0,))


def test_mixed_sizes_need_input_shape(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    _write_image(root / "a" / "1.png", (1, 2, 3), (8, 8))
    _write_image(root / "a" / "2.png", (1, 2, 3), (12, 10))
    with pytest.raises(UserError, match="--input-shape"):
        open_dataset(root)
    ds = open_dataset(root, input_shape=(3, 6, 6))
    assert [tuple(ds[i][0].shape) for i in range(2)] == [(3, 6, 6), (3, 6, 6)]


def test_corrupt_image_skipped_with_count(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "imgs")
    (root / "dog" / "broken.png").write_bytes(b"this is not a png")
    (root / "dog" / "notes.txt").write_text("ignored: not an image extension")
    with pytest.warns(DataWarning, match="skipped 1 unreadable"):
        ds = open_dataset(root)
    assert ds.skipped == 1 and len(ds) == 4
    assert ds.skipped_files[0].endswith("broken.png")


def test_all_corrupt_is_user_error(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    (root / "a").mkdir(parents=True)
    (root / "a" / "1.jpg").write_bytes(b"junk")
    (root / "a" / "2.png").write_bytes(b"")
    with pytest.raises(UserError, match=r"no readable images in .*\(2 files could not be decoded\)"):
        open_dataset(root)


def test_empty_and_malformed_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "noimgs" / "cls").mkdir(parents=True)
    (tmp_path / "noimgs" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no images found"):
        open_dataset(tmp_path / "noimgs")
    _write_image(tmp_path / "flat" / "a.png", (1, 2, 3))
    with pytest.raises(UserError, match="no class folders"):
        open_dataset(tmp_path / "flat")


def test_missing_path_and_unknown_scheme(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    with pytest.raises(UserError, match="synthetic:CxHxW"):
        open_dataset("imagenet:val")
    with pytest.raises(UserError, match="unknown data source 'https'"):
        open_dataset("https://example.com/data.tar")
    stray = tmp_path / "model.pt"
    stray.write_bytes(b"x")
    with pytest.raises(UserError, match="not a .tar"):
        open_dataset(stray)


def test_train_augmentation_is_seeded(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "imgs")

    def batches(seed: int) -> torch.Tensor:
        loader = make_loader(root, batch_size=4, seed=seed, train=True)
        return torch.cat([x for _ in range(3) for x, _ in loader])

    a, b, c = batches(1), batches(1), batches(2)
    assert a.shape == (12, 3, 8, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    plain = torch.stack([open_dataset(root)[i][0] for i in range(4)])
    assert not torch.equal(a[:4], plain)  # augmentation changed something


def test_large_image_train_uses_random_resized_crop(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "big", size=(96, 80))
    ds = open_dataset(root, train=True, input_shape=(3, 72, 72))
    ds.reseed(0)
    x, _ = ds[0]
    assert x.shape == (3, 72, 72)


# --------------------------------------------------------------------------- the tensor input path


def _items(ds: Any, indices: list[int], seeds: list[int]) -> torch.Tensor:
    out = []
    for i, seed in zip(indices, seeds):
        ds.reseed(seed)
        out.append(ds[i][0])
    return torch.stack(out)


def _draws(ds: Any, seeds: list[int]) -> torch.Tensor:
    form = ds.tensor_form()
    rows = []
    for seed in seeds:
        ds.reseed(seed)
        rows.append([int(v) for v in ds.crop_flip_draws(form.pad, form.flip)])
    return torch.tensor(rows, dtype=torch.long)


@pytest.mark.parametrize("source,shape", [("folder", (3, 8, 8)), ("folder", (1, 10, 10)), ("digits:train", (1, 8, 8)),
                                          ("digits:train", (3, 12, 12))])
def test_tensor_batches_equal_the_items_bit_for_bit(tmp_path: Path, source: str, shape: tuple[int, int, int]) -> None:
    from chanprune_cli.data.tensorcache import tensor_images

    src = str(_make_folder(tmp_path / "imgs")) if source == "folder" else source
    stats = {"input_shape": shape, "mean": (0.4,) * shape[0], "std": (0.2,) * shape[0]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # color images read as grayscale
        train, evaluation = open_dataset(src, train=True, **stats), open_dataset(src, **stats)
    images = tensor_images(train)
    indices, seeds = [3, 0, 1, 3], [11, 12, 13, 14]
    x, y = images.batch(torch.tensor(indices), _draws(train, seeds))
    assert torch.equal(x, _items(train, indices, seeds))  # the same crop, flip and normalisation
    assert y.tolist() == [train.targets[i] for i in indices]
    plain, _ = tensor_images(evaluation).batch(torch.tensor(indices))  # no draws: as stored, normalised
    assert torch.equal(plain, torch.stack([evaluation[i][0] for i in indices]))


def test_tensor_cache_is_keyed_by_content(tmp_path: Path, _private_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from chanprune_cli.data import imagefolder
    from chanprune_cli.data.tensorcache import tensor_images

    root = _make_folder(tmp_path / "imgs")
    first = tensor_images(open_dataset(root, train=True))
    cached = sorted((_private_cache / "chanprune" / "tensors").glob("*.npy"))
    assert len(cached) == 1

    def no_decoding(self: Any, index: int) -> torch.Tensor:
        raise AssertionError("decoded again")

    with monkeypatch.context() as m:  # unchanged files: read from the cache, not decoded
        m.setattr(imagefolder.ImageFolderDataset, "raw_item", no_decoding)
        again = tensor_images(open_dataset(root, train=True))
        assert torch.equal(again.images, first.images)
        # the same content under a new modification time: re-hashed, same key, still no decoding
        os.utime(root / "cat" / "a.png", (1_000_000, 1_000_000))
        assert torch.equal(tensor_images(open_dataset(root, train=True)).images, first.images)
    _write_image(root / "cat" / "a.png", (0, 200, 0))  # new content: a new key, decoded again
    changed = tensor_images(open_dataset(root, train=True))
    assert len(sorted((_private_cache / "chanprune" / "tensors").glob("*.npy"))) == 2
    assert not torch.equal(changed.images, first.images)


def test_tensor_path_takes_small_stored_images_only(tmp_path: Path) -> None:
    from chanprune_cli.data.tensorcache import tensor_path_problem

    assert tensor_path_problem(open_dataset(_make_folder(tmp_path / "small"))) is None
    big = open_dataset(_make_folder(tmp_path / "big", size=(96, 80)), input_shape=(3, 72, 72))
    assert "up to 64 px" in (tensor_path_problem(big) or "")
    assert "up to 64 px" in (tensor_path_problem(open_dataset("synthetic:3x8x8:4:16")) or "")


# --------------------------------------------------------------------------- archives


def test_tar_gz_is_extracted_once(tmp_path: Path, _private_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _tar(_make_folder(tmp_path / "src"), tmp_path / "set.tar.gz")
    ds = open_dataset(archive)
    assert ds.classes == ["cat", "dog"] and len(ds) == 4
    datasets_dir = _private_cache / "chanprune" / "datasets"
    extracted = [p for p in datasets_dir.iterdir() if p.is_dir() and p.name != "by-stat"]
    assert len(extracted) == 1 and Path(ds.paths[0]).is_relative_to(extracted[0])
    marker = extracted[0] / data_archive._CACHE_MARKER
    stamp = marker.stat().st_mtime_ns

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("cache not used")

    # Second open of the same file: neither re-hashed nor re-extracted.
    monkeypatch.setattr(data_archive, "_sha256_file", forbidden)
    monkeypatch.setattr(data_archive, "_extract", forbidden)
    again = open_dataset(archive)
    assert again.paths == ds.paths
    # A byte-identical copy elsewhere is hashed (new path) but still not re-extracted.
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(_private_cache))
    monkeypatch.setattr(data_archive, "_extract", forbidden)
    copy = tmp_path / "copy.tgz"
    copy.write_bytes(archive.read_bytes())
    assert open_dataset(copy).paths == ds.paths
    assert marker.stat().st_mtime_ns == stamp
    assert not [p for p in datasets_dir.iterdir() if ".tmp-" in p.name]


def test_plain_tar_with_mnist_inside(tmp_path: Path) -> None:
    src = tmp_path / "mn"
    _write_idx_pair(src, "t10k", n=3, gz=False)
    ds = open_dataset(_tar(src, tmp_path / "mnist.tar", arcname="mnist"))
    assert ds.kind == "mnist" and len(ds) == 3


def test_xdg_cache_home_relative_is_ignored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "abs"))
    assert data.cache_root() == tmp_path / "abs" / "chanprune"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_root() == tmp_path / "home" / ".cache" / "chanprune"


def _evil_tar(path: Path, kind: str) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        good = tarfile.TarInfo("test/cat/ok.txt")
        good.size = 2
        tf.addfile(good, io.BytesIO(b"ok"))
        if kind == "dotdot":
            bad = tarfile.TarInfo("../evil")
            bad.size = 4
            tf.addfile(bad, io.BytesIO(b"evil"))
        elif kind == "absolute":
            bad = tarfile.TarInfo(str(path.parent / "abs-evil"))
            bad.size = 4
            tf.addfile(bad, io.BytesIO(b"evil"))
        elif kind == "symlink":
            bad = tarfile.TarInfo("test/cat/link")
            bad.type = tarfile.SYMTYPE
            bad.linkname = "../../../outside"
            tf.addfile(bad)
        elif kind == "device":
            bad = tarfile.TarInfo("test/cat/dev")
            bad.type = tarfile.CHRTYPE
            tf.addfile(bad)
    return path


@pytest.mark.parametrize(
    ("kind", "needle"),
    [("dotdot", "'../evil'"), ("absolute", "abs-evil"), ("symlink", "test/cat/link"), ("device", "test/cat/dev")],
)
def test_unsafe_archive_members_are_refused(tmp_path: Path, _private_cache: Path, kind: str, needle: str) -> None:
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    archive = _evil_tar(work / "evil.tar.gz", kind)
    with pytest.raises(UserError, match="refusing to extract") as info:
        open_dataset(archive)
    assert needle in str(info.value)
    assert not (work.parent / "evil").exists() and not (work / "abs-evil").exists()
    datasets_dir = _private_cache / "chanprune" / "datasets"
    assert not (datasets_dir.parent / "evil").exists()
    assert [p.name for p in datasets_dir.iterdir()] == ["by-stat"]  # no partial cache, no temp folder


def test_interrupted_extraction_leaves_no_cache(tmp_path: Path, _private_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _tar(_make_folder(tmp_path / "src"), tmp_path / "set.tgz")
    real = data_archive._checked_members

    def interrupted(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        for i, member in enumerate(real(*args, **kwargs)):  # type: ignore[arg-type]
            if i == 3:
                raise KeyboardInterrupt
            yield member

    monkeypatch.setattr(data_archive, "_checked_members", interrupted)
    with pytest.raises(KeyboardInterrupt):
        open_dataset(archive)
    datasets_dir = _private_cache / "chanprune" / "datasets"
    assert [p.name for p in datasets_dir.iterdir()] == ["by-stat"]
    monkeypatch.setattr(data_archive, "_checked_members", real)
    assert len(open_dataset(archive)) == 4


def test_corrupt_archive_is_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
    with pytest.raises(UserError, match="cannot read archive"):
        open_dataset(bad)


# --------------------------------------------------------------------------- MNIST IDX


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_pair(folder: Path, split: str, *, n: int, gz: bool) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 4, 5), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    for name, array in ((f"{split}-images-idx3-ubyte", images), (f"{split}-labels-idx1-ubyte", labels)):
        raw = _idx_bytes(array)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path: Path, gz: bool) -> None:
    images, labels = _write_idx_pair(tmp_path / "mnist", "t10k", n=6, gz=gz)
    ds = open_dataset(tmp_path / "mnist", mean=(0.0,), std=(1.0,))
    assert len(ds) == 6 and ds.num_classes == 10 and ds.input_shape == (1, 4, 5)
    x, y = ds[5]
    assert y == 5
    assert torch.allclose(x[0], torch.from_numpy(images[5]).float() / 255.0)
    # Default normalisation: MNIST statistics; three channels on request.
    x3, _ = open_dataset(tmp_path / "mnist", input_shape=(3, 4, 5))[5]
    expected = (torch.from_numpy(images[5]).float() / 255.0 - 0.1307) / 0.3081
    assert x3.shape == (3, 4, 5) and torch.allclose(x3[2], expected, atol=1e-6)


def test_mnist_split_choice_and_direct_file(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    _write_idx_pair(folder, "t10k", n=3, gz=True)
    _write_idx_pair(folder, "train", n=7, gz=False)
    assert len(open_dataset(folder)) == 3
    assert len(open_dataset(folder, train=True)) == 7
    assert len(open_dataset(folder / "train-images-idx3-ubyte")) == 7


def test_mnist_idx_validation(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    _write_idx_pair(folder, "t10k", n=4, gz=False)
    labels = folder / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1])  # one label short of the header's count
    with pytest.raises(UserError, match="IDX header says"):
        open_dataset(folder)
    labels.write_bytes(_idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(UserError, match="4 images but .* 3 labels"):
        open_dataset(folder)
    labels.write_bytes(b"\x01\x02\x03\x04junk")
    with pytest.raises(UserError, match="bad magic"):
        open_dataset(folder)
    labels.unlink()
    with pytest.raises(UserError, match="labels file"):
        open_dataset(folder)


# --------------------------------------------------------------------------- synthetic / digits


def test_synthetic_is_deterministic() -> None:
    a = open_dataset("synthetic:3x16x16")
    b = open_dataset("synthetic:3x16x16")
    assert len(a) == data.SYNTHETIC_DEFAULT_LENGTH and a.num_classes == 10
    assert a.targets == b.targets
    assert torch.equal(a[7][0], b[7][0]) and a[7][0].shape == (3, 16, 16)
    _ = b[100]  # access order does not matter
    assert torch.equal(a[8][0], b[8][0])
    c = open_dataset("synthetic:1,8,8:3:20")
    assert len(c) == 20 and c.num_classes == 3 and max(c.targets) < 3
    assert open_dataset("synthetic", input_shape=(2, 4, 4)).input_shape == (2, 4, 4)
    assert open_dataset("synthetic:2x64")[0][0].shape == (2, 64)  # 1-D signals: CxL
    for bad in ("synthetic", "synthetic:3x16x16x2", "synthetic:3x8x8:x", "synthetic:3x8x8:0", "synthetic:3x8x8:2:3:4"):
        with pytest.raises(UserError):
            open_dataset(bad)
    with pytest.raises(UserError, match="input shape"):
        open_dataset("synthetic:3x8x8", input_shape=(3, 16, 16))


def test_digits_split_is_disjoint_and_deterministic() -> None:
    pytest.importorskip("sklearn")
    _, labels, train_idx, test_idx = data_digits._digits_arrays()
    assert not set(train_idx.tolist()) & set(test_idx.tolist())
    assert len(train_idx) + len(test_idx) == len(labels) == 1797
    assert abs(len(test_idx) / len(labels) - 0.2) < 0.01
    data_digits._digits_arrays.cache_clear()
    _, _, train2, test2 = data_digits._digits_arrays()
    assert np.array_equal(train_idx, train2) and np.array_equal(test_idx, test2)
    test = open_dataset("digits:test")
    train = open_dataset("digits:train")
    assert (len(train), len(test)) == (len(train_idx), len(test_idx))
    assert test.num_classes == 10 and test.input_shape == (1, 8, 8)
    assert open_dataset("digits").targets == test.targets  # plain `digits` evaluates on test
    assert open_dataset("digits", train=True).targets == train.targets
    # Normalised with the training split's statistics.
    xs = torch.stack([train[i][0] for i in range(len(train))])
    assert abs(xs.mean().item()) < 1e-4 and abs(xs.std().item() - 1.0) < 1e-2
    with pytest.raises(UserError):
        open_dataset("digits:val")


# --------------------------------------------------------------------------- loaders and labels


def test_make_loader_shuffle_seed_and_max_batches() -> None:
    ds = open_dataset("synthetic:1x2x2:4:50")

    def order(seed: int, **kw: object) -> list[int]:
        return [y for _, ys in make_loader(ds, batch_size=8, seed=seed, shuffle=True, **kw) for y in ys.tolist()]

    assert order(3) == order(3) and order(3) != order(4)
    limited = make_loader("synthetic:1x2x2:4:50", batch_size=8, max_batches=2)
    assert sum(len(y) for _, y in limited) == 16
    first = next(iter(limited))[1].tolist()
    assert first == ds.targets[:8]
    assert sum(len(y) for _, y in make_loader(ds, batch_size=8, shuffle=True, max_batches=3)) == 24
    with pytest.raises(UserError):
        make_loader(ds, batch_size=0)


def test_make_loader_workers_are_deterministic(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "imgs")

    def run() -> torch.Tensor:
        loader = make_loader(root, batch_size=2, workers=2, seed=5, shuffle=True, train=True)
        return torch.cat([x for x, _ in loader])

    assert torch.equal(run(), run())


def test_check_labels() -> None:
    ds = open_dataset("synthetic:1x2x2:10:30")
    check_labels(ds, 10)
    check_labels(make_loader(ds), 12)
    with pytest.raises(UserError, match="data has 10 classes but the model outputs 5"):
        check_labels(ds, 5)


# --------------------------------------------------------------------------- shared CIFAR-10 copy


def test_shared_cifar10_test_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = SHARED / "data" / "cifar10-jpeg-test.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} not available")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ds = open_dataset(archive)
    assert len(ds) == 10000 and ds.skipped == 0
    assert ds.classes == [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
    ]
    assert ds.input_shape == (3, 32, 32)
    assert np.bincount(ds.targets).tolist() == [1000] * 10
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == 0


# --------------------------------------------------------------------------- through the command line

runner = CliRunner()


def cli(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args], env={"CHANPRUNE_DEBUG": None})


def _digit_images(digits: range) -> tuple[np.ndarray, np.ndarray]:
    """The digits:test images of `digits` as uint8 8×8 arrays, and their labels."""
    ds = open_dataset("digits:test")
    keep = [i for i, t in enumerate(ds.targets) if t in digits]
    images = (ds.images[keep].numpy() * 255).round().astype(np.uint8)
    return images, np.asarray(ds.targets)[keep]


def _digit_folder(root: Path, digits: range) -> Path:
    images, labels = _digit_images(digits)
    for i, (image, label) in enumerate(zip(images, labels)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(root / str(label) / f"{i}.png")
    return root


def _digits_args(ckpt: Path, *extra: object) -> list[object]:
    mean, std = data_digits.digits_stats()  # the normalisation digits_cnn was trained with
    return ["analyze", ckpt, "--arch", "digits_cnn", "--mean", mean[0], "--std", std[0], "--json", "-", *extra]


def _top1(result: Any) -> float:
    assert result.exit_code == 0, result.stderr
    return float(json.loads(result.stdout)["accuracy"]["top1"])


def _warnings(result: Any) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning: ")]


def test_classes_label_a_subset_of_class_folders_by_name(tmp_path: Path, digits_model: Path) -> None:
    """8 of 10 class folders: sorted-order labels would be shifted; --classes (or the class names a
    fine-tuned checkpoint records) labels each folder as the model's output of that name."""
    full = _digit_folder(tmp_path / "all", range(10))
    part = _digit_folder(tmp_path / "part", range(2, 10))
    reference = cli(*_digits_args(digits_model, "--data", full))
    assert _top1(reference) > 90 and _warnings(reference) == []

    shifted = cli(*_digits_args(digits_model, "--data", part))
    assert _top1(shifted) < 30  # what an unmapped subset scores: labels 0-7 stand for digits 2-9
    (line,) = [w for w in _warnings(shifted) if "has 8 classes" in w]  # (top-1 may also be at chance: said too)
    assert "outputs 10" in line and "--classes" in line

    names = ",".join(str(d) for d in range(10))
    mapped = cli(*_digits_args(digits_model, "--data", part, "--classes", names))
    assert _top1(mapped) > 90 and _warnings(mapped) == []
    (tmp_path / "names.txt").write_text("\n".join(names.split(",")) + "\n")
    assert _top1(cli(*_digits_args(digits_model, "--data", part, "--classes", f"@{tmp_path / 'names.txt'}"))) == _top1(mapped)

    # finetune records the class names of its data; later commands match folders to them unasked
    tuned = tmp_path / "tuned.safetensors"
    mean, std = data_digits.digits_stats()
    ft = cli("finetune", digits_model, "--arch", "digits_cnn", "--data", full, "--mean", mean[0], "--std", std[0],
             "--max-steps", "1", "--lr", "1e-6", "--batch-size", "8", "--no-augment", "--out", tuned)
    assert ft.exit_code == 0, ft.stderr
    recorded = cli("analyze", tuned, "--data", part, "--mean", mean[0], "--std", std[0], "--json", "-")
    assert _top1(recorded) > 90 and _warnings(recorded) == []


def test_numpy_arrays_as_data(tmp_path: Path, digits_model: Path) -> None:
    images, labels = _digit_images(range(10))
    np.savez(tmp_path / "digits.npz", images=images, labels=labels)
    folder = cli(*_digits_args(digits_model, "--data", _digit_folder(tmp_path / "folder", range(10))))
    arrays = cli(*_digits_args(digits_model, "--data", tmp_path / "digits.npz"))
    assert _top1(arrays) == _top1(folder) and _warnings(arrays) == []  # the same pixels, the same answer

    rng = np.random.default_rng(0)
    rgb = (rng.random((6, 16, 16, 3)) * 255).astype(np.uint8)
    np.savez_compressed(tmp_path / "nhwc.npz", x=rgb, y=np.arange(6) % 3, classes=np.array(["cat", "dog", "emu"]))
    np.savez(tmp_path / "nchw.npz", images=rgb.transpose(0, 3, 1, 2).astype(np.float32) / 255, labels=np.arange(6) % 3)
    np.save(tmp_path / "calib.npy", rgb[..., 0])
    channels_last, channels_first = open_dataset(tmp_path / "nhwc.npz"), open_dataset(tmp_path / "nchw.npz")
    assert channels_last.classes == ["cat", "dog", "emu"] and channels_last.targets == [0, 1, 2, 0, 1, 2]
    assert channels_last.input_shape == channels_first.input_shape == (3, 16, 16)
    torch.testing.assert_close(channels_last[4][0], channels_first[4][0])
    with pytest.warns(DataWarning, match="are 16x16 but the model takes 8x8; resizing them"), \
            pytest.warns(DataWarning, match="are grayscale but the model takes 3 channels"):
        calib = open_dataset(tmp_path / "calib.npy", input_shape=(3, 8, 8), train=True)
    assert len(calib) == 6 and calib.num_classes == 1 and calib[0][0].shape == (3, 8, 8)
    with pytest.warns(DataWarning, match="converting them to grayscale"):
        assert open_dataset(tmp_path / "nhwc.npz", input_shape=(1, 16, 16))[0][0].shape == (1, 16, 16)


def test_data_unlike_the_models_is_said(tmp_path: Path) -> None:
    """MNIST-like data (grey, 10x10) for a CIFAR ResNet (3x32x32): the channel and size conversions
    and an accuracy at chance are warning lines and JSON warnings; BN recalibration in prune on such
    data says the same."""
    from chanprune_cli.models import build_model, parse_arch

    torch.manual_seed(0)
    torch.save(build_model(parse_arch("cifar_resnet20")).state_dict(), tmp_path / "r20.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mnist.npz", images=(rng.random((100, 10, 10)) * 255).astype(np.uint8),
             labels=np.arange(100) % 10)
    model = [tmp_path / "r20.pt", "--arch", "cifar_resnet20", "--data", tmp_path / "mnist.npz", "--json", "-"]
    said = ("are grayscale but the model takes 3 channels; repeating the grey channel",
            "are 10x10 but the model takes 32x32; resizing them")

    analyzed = cli("analyze", *model)
    assert analyzed.exit_code == 0, analyzed.stderr
    warned = json.loads(analyzed.stdout)["warnings"]  # each also a warning line
    assert all(any(s in w for w in warned) for s in said) and set(warned) <= set(_said(analyzed)), analyzed.stderr
    (chance,) = [w for w in warned if "chance level" in w]
    assert re.search(r"top-1 \d+\.\d\d % on 100 images of .*mnist\.npz is chance level \(10 % for 10 classes\)", chance)
    assert "the model does not recognise this data" in chance

    pruned = cli("prune", *model, "--ratio", "0.5", "--recalibrate-bn", "1", "--out", tmp_path / "p.safetensors")
    assert pruned.exit_code == 0, pruned.stderr
    warned = json.loads(pruned.stdout)["warnings"]
    assert all(any(s in w for w in warned) for s in said) and set(warned) <= set(_said(pruned)), pruned.stderr


def _said(result: Any) -> list[str]:
    """The warning lines' texts."""
    return [line.removeprefix("warning: ") for line in result.stderr.splitlines() if line.startswith("warning: ")]


@pytest.mark.parametrize(("arrays", "fragment"), [
    ({"images": np.zeros((4, 8, 8), np.uint8)}, "no labels"),
    ({"pixels": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(4, np.int64)}, "has no images"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(3, np.int64)}, "labels must be 4 integers"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.array([0, 1, -1, 0])}, "0 or more"),
    ({"images": np.zeros((4, 8, 8, 5), np.uint8), "labels": np.zeros(4, np.int64)}, "expected N×H×W"),
    ({"images": np.zeros((4, 8, 8), np.int32), "labels": np.zeros(4, np.int64)}, "use uint8 (0-255) or floats"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(4, np.int64), "classes": np.array([1])}, "'classes'"),
    ({"images": np.array([None] * 4, dtype=object), "labels": np.zeros(4, np.int64)}, "without unpickling"),
])
def test_bad_numpy_arrays(tmp_path: Path, arrays: dict[str, np.ndarray], fragment: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError, match=re.escape(fragment)):
        open_dataset(tmp_path / "bad.npz")


def test_first_extraction_shows_progress_on_a_terminal_only(tmp_path: Path, digits_model: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Extracting an archive the first time can take a while: a bar says what is happening, on a
    terminal; logs and pipes stay clean."""
    from chanprune_cli.support import progress

    args = ["analyze", digits_model, "--arch", "digits_cnn", "--json", tmp_path / "r.json", "--force", "--classes",
            "cat,dog,2,3,4,5,6,7,8,9", "--data"]
    plain = cli(*args, _tar(_make_folder(tmp_path / "a", mode="L"), tmp_path / "piped.tar.gz"))
    assert plain.exit_code == 0, plain.stderr
    assert plain.stderr == ""
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)
    archive = _tar(_make_folder(tmp_path / "b", mode="L"), tmp_path / "first.tar")
    archive.write_bytes(archive.read_bytes() + bytes(10240))  # other bytes than piped.tar.gz: a new cache entry
    shown = runner.invoke(app, [str(a) for a in [*args, archive]], env={"CHANPRUNE_DEBUG": None, "FORCE_COLOR": "1", "COLUMNS": "400"})
    assert shown.exit_code == 0, shown.stderr
    assert f"extracting {archive} into the cache" in shown.stderr and f"hashing {archive}" in shown.stderr
    again = runner.invoke(app, [str(a) for a in [*args, archive]], env={"CHANPRUNE_DEBUG": None, "FORCE_COLOR": "1", "COLUMNS": "400"})
    assert again.exit_code == 0 and "extracting" not in again.stderr  # cached: nothing to show
