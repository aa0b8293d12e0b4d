"""In-memory datasets: uint8 image arrays, their statistics, resizing, and the torch adapters.

Every dataset is held as :class:`TargetData`: uint8 images of shape (N, H, W, C) with C in {1, 3}
and int64 labels. The position of a sample in the ORIGINAL training split is its stable
``sample_id``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from ..storage import digest


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
        kind = self.name.split(":", 1)[0] if ":" in self.name else self.name
        chunks: list[str | np.ndarray] = [kind]
        for arr in (self.train.x, self.train.y):
            a = np.ascontiguousarray(arr)
            chunks += [f"|{a.dtype.str}|{a.shape}|", a]
        return digest(*chunks)


# --------------------------------------------------------------------------------------------------
# Statistics and resizing


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


def resize_images(x: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 (N, H, W, C) images to (N, size, size, C) with antialiased bilinear interpolation."""
    if x.shape[1] == size and x.shape[2] == size:
        return x
    out = []
    for i in range(0, len(x), 4096):  # chunks bound the float copy's memory
        t = torch.from_numpy(np.array(x[i:i + 4096])).permute(0, 3, 1, 2).float()  # a copy: x may be read-only
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


def recipe_name(name: str) -> str:
    """The dataset whose augmentation recipe ``name`` takes: ``cifar10@16`` (resized by ``--image-size``)
    is still CIFAR-10; names with ``:`` or ``/`` (npz:, folder:, a prepared directory) stay as they are."""
    m = re.fullmatch(r"([^:/@]+)(?:@\d+)+", name)
    known = ("cifar10", "cifar100", "svhn", "cats-vs-dogs", *_DIGIT_SETS)  # not a directory named data@16
    return m.group(1) if m and m.group(1) in known else name


def augmentation(name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Training augmentation for a dataset name (paper sections 4.2 and 4.5; design.md section 4).

    - cifar10, cifar100: horizontal flip + translation up to 10% (Keras-style shift).
    - svhn: translation only; design.md lists no flip for SVHN, and mirrored digits change meaning.
    - cats-vs-dogs, folder:*: horizontal flip, zoom 0.8-1.2, shear 0.2 rad (Keras 1 used radians).
    - digit datasets and npz:*: None.
    - a directory written by ``idtl-ray prepare``: the recipe of the dataset it holds.
    """
    from torchvision import transforms as T

    name = recipe_name(name)
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
    from .readers import is_prepared_location, read_manifest  # lazy: both build on this module
    from .registry import DATASETS

    if is_prepared_location(name):  # a prepared directory: the recipe of the dataset it holds
        return augmentation(read_manifest(name).dataset)

    raise DataError(f"no augmentation recipe for unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
