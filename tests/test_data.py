"""Tests of idtl_ray.data on real bundled data (digits, mnist-5k, Debian fashion-mnist) and tmp files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from idtl_ray.data import (
    DATASETS,
    FASHION_MNIST_SYSTEM_DIR,
    ImageArrays,
    ImageDataset,
    Split,
    TargetData,
    apply_split,
    augmentation,
    load_dataset,
    make_split,
    split_train_val,
    to_tensor,
)
from idtl_ray.errors import DataError, IdtlError


@pytest.fixture(scope="module")
def digits() -> TargetData:
    return load_dataset("digits", download=False)


def test_digits_shapes_and_labels(digits: TargetData) -> None:
    assert digits.train.x.shape == (1438, 8, 8, 1) and digits.test.x.shape == (359, 8, 8, 1)
    assert digits.train.x.dtype == np.uint8 and digits.train.y.dtype == np.int64
    assert digits.train.x.max() == 255 and digits.train.x.min() == 0  # 16 -> 255
    assert set(np.unique(digits.train.y)) == set(range(10)) and digits.num_classes == 10
    assert digits.image_shape == (8, 8, 1) and digits.val is None
    assert len(digits.mean) == 1 and 0 < digits.mean[0] < 1 and 0 < digits.std[0] < 1
    # seeded split: reloading gives the same data
    assert load_dataset("digits").fingerprint() == digits.fingerprint()


def test_fingerprint_changes_with_one_pixel_or_label(digits: TargetData) -> None:
    fp = digits.fingerprint()
    x = digits.train.x.copy()
    x[17, 3, 4, 0] ^= 1
    other = TargetData(digits.name, ImageArrays(x, digits.train.y), digits.test, None, digits.classes,
                       digits.mean, digits.std)  # fmt: skip
    assert other.fingerprint() != fp
    y = digits.train.y.copy()
    y[5] = (y[5] + 1) % 10
    other.train = ImageArrays(digits.train.x, y)
    assert other.fingerprint() != fp


def test_mnist_5k() -> None:
    d = load_dataset("mnist-5k")
    assert d.train.x.shape == (4000, 28, 28, 1) and d.test.x.shape == (1000, 28, 28, 1)
    assert np.bincount(d.train.y).tolist() == [400] * 10
    assert d.train.x.dtype == np.uint8 and d.train.x.max() == 255


@pytest.mark.skipif(
    not (FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Debian package dataset-fashion-mnist not installed ({FASHION_MNIST_SYSTEM_DIR} missing)",
)
def test_fashion_mnist_from_debian_package(tmp_path: Path) -> None:
    d = load_dataset("fashion-mnist", tmp_path, download=False)
    assert d.train.x.shape == (60000, 28, 28, 1) and d.test.x.shape == (10000, 28, 28, 1)
    assert np.bincount(d.train.y).tolist() == [6000] * 10 and d.classes[9] == "Ankle boot"


@pytest.mark.parametrize(
    "name, expected",
    [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("mnist", "MNIST/raw"),
     ("svhn", "train_32x32.mat"), ("emnist-letters", "emnist-letters-")],  # fmt: skip
)
def test_missing_torchvision_files_name_path_and_fix(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(DataError) as e:
        load_dataset(name, tmp_path, download=False)
    msg = str(e.value)
    assert str(tmp_path) in msg and expected in msg and "download" in msg and "\n" not in msg
    assert isinstance(e.value, IdtlError) and isinstance(e.value, ValueError)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(DataError) as e:
        load_dataset("imagenet-21k")
    for n in DATASETS:
        assert n in str(e.value)
    assert "npz:PATH" in str(e.value) and "folder:PATH" in str(e.value)


def test_image_size_resizes_fixed_size_datasets() -> None:
    d = load_dataset("mnist-5k")
    r = load_dataset("mnist-5k", image_size=8)
    assert r.image_shape == (8, 8, 1) and len(r.train) == len(d.train) and r.name == "mnist-5k@8"
    assert (r.train.y == d.train.y).all() and r.fingerprint() != d.fingerprint()
    # area-like downsampling keeps the mean brightness of each image roughly
    assert abs(float(r.train.x[:50].mean()) - float(d.train.x[:50].mean())) < 3.0
    with pytest.raises(DataError, match="too small"):
        load_dataset("digits", image_size=2)


# --- npz ---------------------------------------------------------------------------------------


def _npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_round_trip_grey_and_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    xtr = rng.integers(0, 256, (20, 6, 6), dtype=np.uint8)
    ytr = np.arange(20) % 3
    xte = rng.integers(0, 256, (5, 6, 6), dtype=np.uint8)
    d = load_dataset(_npz(tmp_path / "g.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=np.arange(5) % 3))
    assert d.train.x.shape == (20, 6, 6, 1) and np.array_equal(d.train.x[..., 0], xtr)
    assert d.train.y.dtype == np.int64 and d.classes == ["0", "1", "2"] and d.val is None
    xrgb = rng.integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
    d = load_dataset(_npz(tmp_path / "c.npz", x_train=xrgb, y_train=np.arange(8) % 2, x_test=xrgb[:2],
                          y_test=np.array([0, 1]), x_val=xrgb[:3], y_val=np.array([1, 0, 1]),
                          classes=np.array(["cat", "dog"])))  # fmt: skip
    assert d.image_shape == (4, 4, 3) and d.classes == ["cat", "dog"] and len(d.val) == 3
    assert np.array_equal(d.train.x, xrgb) and len(d.mean) == 3
    # a shipped validation set is used as is
    s = make_split(d)
    assert s.val_source == "shipped" and s.val_ids.size == 0 and s.train_ids.tolist() == list(range(8))
    tr, va, ids = apply_split(d, s)
    assert len(tr) == 8 and va is d.val and ids.tolist() == list(range(8))


@pytest.mark.parametrize(
    "change, key, fix",
    [
        ({"x_train": np.zeros((4, 5, 5), np.float32)}, "x_train", "uint8"),
        ({"x_train": np.zeros((4, 5, 5, 2), np.uint8)}, "x_train", "C in {1,3}"),
        ({"y_train": np.array([0, 1, 2])}, "y_train", "make them equal"),
        ({"y_train": np.array([0, -1, 1, 0])}, "y_train", "0..K-1"),
        ({"y_train": np.array([0.0, 1.0, 0.0, 1.0])}, "y_train", "integer"),
        ({"x_test": np.zeros((2, 6, 6), np.uint8)}, "x_test", "resize"),
    ],
)
def test_npz_validation_errors(tmp_path: Path, change: dict, key: str, fix: str) -> None:
    arrays = {"x_train": np.zeros((4, 5, 5), np.uint8), "y_train": np.array([0, 1, 0, 1]),
              "x_test": np.zeros((2, 5, 5), np.uint8), "y_test": np.array([0, 1])}  # fmt: skip
    arrays.update(change)
    with pytest.raises(DataError) as e:
        load_dataset(_npz(tmp_path / "bad.npz", **arrays))
    assert key in str(e.value) and fix in str(e.value)


def test_npz_missing_key_and_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="y_test"):
        load_dataset(_npz(tmp_path / "m.npz", x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.array([0, 1]),
                          x_test=np.zeros((2, 4, 4), np.uint8)))  # fmt: skip
    with pytest.raises(DataError, match="not found"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="np.savez"):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")


# --- splits ------------------------------------------------------------------------------------


def test_split_deterministic_disjoint_complete() -> None:
    labels = np.arange(1000) % 7
    a = split_train_val(1000, 0.1, seed=3, labels=labels)
    b = split_train_val(1000, 0.1, seed=3, labels=labels)
    c = split_train_val(1000, 0.1, seed=4, labels=labels)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    tr, va = a
    assert tr.dtype == np.int64 and va.dtype == np.int64 and len(va) == 100
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(va) > 0)  # sorted, unique
    assert np.intersect1d(tr, va).size == 0 and np.array_equal(np.union1d(tr, va), np.arange(1000))
    counts = np.bincount(labels[va], minlength=7)
    assert counts.max() - counts.min() <= 1  # stratified
    tr2, va2 = split_train_val(50, 0.2, seed=0)  # unstratified
    assert len(va2) == 10 and np.array_equal(np.union1d(tr2, va2), np.arange(50))


@pytest.mark.parametrize("n, frac", [(100, 0.0), (100, 1.0), (100, -0.1), (3, 0.01), (2, 0.99)])
def test_split_rejects_bad_fraction(n: int, frac: float) -> None:
    with pytest.raises(DataError):
        split_train_val(n, frac, seed=0)


def test_apply_split_and_refusal_for_other_dataset(digits: TargetData) -> None:
    s = make_split(digits, 0.1, seed=0)
    assert s.val_source == "split" and len(s.val_ids) == 144
    tr, va, ids = apply_split(digits, s)
    assert np.array_equal(ids, s.train_ids) and len(tr) + len(va) == len(digits.train)
    assert np.array_equal(va.x, digits.train.x[s.val_ids]) and np.array_equal(tr.y, digits.train.y[ids])
    x = digits.train.x.copy()
    x[0, 0, 0, 0] = 200 if x[0, 0, 0, 0] != 200 else 201
    other = TargetData("digits", ImageArrays(x, digits.train.y), digits.test, None, digits.classes,
                       digits.mean, digits.std)  # fmt: skip
    with pytest.raises(DataError, match="belongs to another dataset"):
        apply_split(other, s)


def test_split_save_load_round_trip(digits: TargetData, tmp_path: Path) -> None:
    s = make_split(digits, 0.2, seed=7)
    path = tmp_path / "sub" / "split.json"
    s.save(path)
    assert not (tmp_path / "sub" / "split.json.tmp").exists()
    t = Split.load(path)
    assert t.fingerprint() == s.fingerprint() and t.seed == 7 and t.val_fraction == 0.2
    assert np.array_equal(t.train_ids, s.train_ids) and np.array_equal(t.val_ids, s.val_ids)
    s.save(path)  # overwriting goes through the same atomic replace
    d = json.loads(path.read_text())
    d["val_ids"][0] += 1
    path.write_text(json.dumps(d))
    with pytest.raises(DataError, match="altered"):
        Split.load(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        Split.load(path)
    with pytest.raises(DataError, match="not found"):
        Split.load(tmp_path / "missing.json")


# --- folders -----------------------------------------------------------------------------------


def _write_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    for split, n in (("train", 3), ("test", 2), ("val", 1)):
        for cls in ("dog", "cat"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                size = (10 + i, 7 + 2 * i)
                if i == 1:  # greyscale files must come back as RGB
                    Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8), "L").save(d / f"{i}.png")
                else:
                    Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(d / f"{i}.png")
    (root / "train" / "cat" / "notes.txt").write_text("ignored")


def test_folder_dataset(tmp_path: Path) -> None:
    _write_folder(tmp_path / "pets")
    d = load_dataset(f"folder:{tmp_path / 'pets'}", image_size=16)
    assert d.classes == ["cat", "dog"] and d.image_shape == (16, 16, 3)
    assert len(d.train) == 6 and len(d.test) == 4 and len(d.val) == 2
    assert d.train.y.tolist() == [0, 0, 0, 1, 1, 1]
    # cats-vs-dogs is the folder <data_dir>/cats-vs-dogs; default size 64
    (tmp_path / "pets").rename(tmp_path / "cats-vs-dogs")
    c = load_dataset("cats-vs-dogs", tmp_path)
    assert c.name == "cats-vs-dogs" and c.image_shape == (64, 64, 3)


def test_folder_hidden_dirs_empty_classes_and_16_bit_images(tmp_path: Path) -> None:
    """Review, eleventh session: .ipynb_checkpoints became a class (labels shifted), an empty class folder
    counted toward the two classes needed, and 16-bit greyscale PNGs came back almost all white."""
    from PIL import Image

    root = tmp_path / "pets"
    _write_folder(root)
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "test" / ".ipynb_checkpoints").mkdir()
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(root / "train" / "dog" / "deep.png")
    d = load_dataset(f"folder:{root}", image_size=16)
    assert d.classes == ["cat", "dog"] and d.train.y.tolist() == [0, 0, 0, 1, 1, 1, 1]
    deep = d.train.x[6]  # dog/deep.png sorts after dog/0.png .. dog/2.png
    assert deep.shape == (16, 16, 3) and np.all(deep[..., 0] == deep[..., 1])
    assert np.abs(deep[..., 0].astype(int) - np.round(ramp / 257.0)).max() <= 1  # scaled, not clipped
    (root / "train" / "bird").mkdir()
    with pytest.raises(DataError, match=r"class folder\(s\) \['bird'\] in train/ hold no images"):
        load_dataset(f"folder:{root}", image_size=16)


def test_the_cache_key_sees_files_in_linked_folders_and_survives_a_link_loop(tmp_path: Path) -> None:
    """os.walk did not follow links, so a folder dataset with linked train/ and test/ had an empty stamp and
    a changed image kept the stale prepared copy; a link back up the tree is walked once."""
    import os

    from idtl_ray.data.cache import _files_stamp

    _write_folder(tmp_path / "real")
    (tmp_path / "pets").mkdir()
    for split in ("train", "test"):
        os.symlink(tmp_path / "real" / split, tmp_path / "pets" / split)
    os.symlink(tmp_path / "pets", tmp_path / "pets" / "latest")  # a loop
    stamp = _files_stamp(tmp_path / "pets")
    assert [p for p, *_ in stamp if p.startswith("train/dog/")] == ["train/dog/0.png", "train/dog/1.png", "train/dog/2.png"]
    (tmp_path / "real" / "train" / "dog" / "3.png").write_bytes((tmp_path / "real" / "train" / "dog" / "0.png").read_bytes())
    assert _files_stamp(tmp_path / "pets") != stamp


def test_missing_folder_describes_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{tmp_path / 'none'}")
    assert "train/<class>" in str(e.value) and "test/<class>" in str(e.value)
    with pytest.raises(DataError) as e:
        load_dataset("cats-vs-dogs", tmp_path)
    assert str(tmp_path / "cats-vs-dogs") in str(e.value) and "train/<class>" in str(e.value)


# --- torch side --------------------------------------------------------------------------------


def test_to_tensor_matches_image_dataset(digits: TargetData) -> None:
    batch = to_tensor(digits.train.x[:5], digits.mean, digits.std)
    assert batch.shape == (5, 1, 8, 8) and batch.dtype == torch.float32
    ds = ImageDataset(digits.train, digits.mean, digits.std)
    x, y = ds[3]
    assert torch.allclose(x, batch[3], atol=1e-6) and y == int(digits.train.y[3])
    full = to_tensor(digits.train.x, digits.mean, digits.std)
    assert abs(full.mean().item()) < 1e-3 and abs(full.std().item() - 1) < 1e-2


def test_augmentation_recipes() -> None:
    for name in ("mnist", "mnist-5k", "emnist-letters", "fashion-mnist", "digits"):
        assert augmentation(name) is None
    img = torch.rand(3, 32, 32)
    for name in ("cifar10", "cifar100", "svhn", "cats-vs-dogs", "folder:/x"):
        aug = augmentation(name)
        assert aug is not None and aug(img).shape == img.shape
    ds = ImageDataset(ImageArrays(np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 1])), (0.5,) * 3, (0.25,) * 3,
                      augmentation("cifar10"))  # fmt: skip
    assert ds[1][0].shape == (3, 32, 32)
    with pytest.raises(DataError):
        augmentation("unknown")
