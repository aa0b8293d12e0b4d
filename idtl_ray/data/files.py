"""Datasets read from the user's own files: IDX files, ``npz:PATH`` arrays and ``folder:PATH`` images."""

from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .arrays import ImageArrays, TargetData, _make

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_FOLDER_IMAGE_SIZE = 64


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
    for d in _class_dirs(split_dir):
        if d.name not in classes:
            raise DataError(
                f"folder:{root}: class {d.name!r} in {split}/ is not in train/ ({classes}); "
                f"{_folder_layout_hint(root)}"
            )
        label = classes.index(d.name)
        for f in sorted(q for q in d.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS):
            try:
                with Image.open(f) as im:
                    im = _rgb8(im, f, root).resize((size, size), Image.Resampling.BILINEAR)
                    xs.append(np.asarray(im, dtype=np.uint8))
            except (OSError, UnidentifiedImageError) as e:
                raise DataError(f"folder:{root}: cannot read image {f} ({e}); delete or replace it") from e
            ys.append(label)
    if not xs:
        raise DataError(f"folder:{root}: no images in {split_dir}; {_folder_layout_hint(root)}")
    y = np.asarray(ys, dtype=np.int64)
    empty = [c for i, c in enumerate(classes) if not (y == i).any()]
    if split == "train" and empty:  # a class with no example cannot be learned, and counts toward the 2 needed
        raise DataError(f"folder:{root}: class folder(s) {empty} in train/ hold no images; add images or remove them")
    return ImageArrays(np.stack(xs), y)


def _class_dirs(split_dir: Path) -> list[Path]:
    """The class sub-folders of a split, sorted; hidden ones (.ipynb_checkpoints, .DS_Store dirs) are not classes."""
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _rgb8(im: Any, f: Path, root: Path) -> Any:
    """``im`` as 8-bit RGB; 16-bit greyscale is scaled down (``convert`` clipped it: nearly all white)."""
    from PIL import Image

    if im.mode.startswith("I"):  # I;16, I;16B, I: 16-bit (or int32) greyscale
        a = np.asarray(im, dtype=np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise DataError(f"folder:{root}: image {f} has values outside 0..65535 ({im.mode}); convert it to 8 or 16 bits")
        return Image.fromarray(np.round(a / 257.0).astype(np.uint8), mode="L").convert("RGB")
    if im.mode == "F":
        raise DataError(f"folder:{root}: image {f} holds floating-point pixels; convert it to an 8-bit PNG or JPEG")
    return im.convert("RGB")


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
    classes = [p.name for p in _class_dirs(root / "train")]
    if len(classes) < 2:
        raise DataError(f"{label}: found {len(classes)} class folder(s) in {root}/train; need at least 2; "
                        f"{_folder_layout_hint(root)}")  # fmt: skip
    train = _read_folder_split(root, "train", classes, size)
    test = _read_folder_split(root, "test", classes, size)
    val = _read_folder_split(root, "val", classes, size) if (root / "val").is_dir() else None
    return _make(label, train, test, classes, val)

