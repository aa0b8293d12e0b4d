"""Reading a directory written by ``idtl-ray prepare`` (format: :mod:`idtl_ray.data.prepare`).

- :func:`load_prepared`: the whole dataset as :class:`TargetData`, identical to the source's (same
  arrays, classes, statistics and fingerprint), every shard checked against its sha256. This is what
  :func:`idtl_ray.data.load_dataset` returns for a prepared directory.
- :func:`read_prepared`: a lazy ``ray.data.Dataset`` over the shards (``read_parquet``), decoded on CPU
  workers into a uint8 NHWC ``x`` column plus ``label``, ``sample_id`` and ``split``; the driver never
  holds the images.

A damaged or incomplete directory raises one :class:`DataError` naming the file and the fix: re-run
``idtl-ray prepare``.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..errors import DataError
from .arrays import ImageArrays, TargetData, _make, resize_dataset
from .prepare import COLUMNS, MANIFEST, SPLITS, Manifest, Shard, _first_line, open_location
from .splits import Split

if TYPE_CHECKING:  # pragma: no cover
    import ray.data


def is_prepared_location(name: str) -> bool:
    """Whether ``name`` should be read as a prepared directory: a URI or an existing local directory.

    Whether it is complete is checked when it is read (:func:`read_manifest`).
    """
    return "://" in name or Path(name).expanduser().is_dir()


def _fix(location: str, source: str = "NAME") -> str:
    return f"re-run idtl-ray prepare --dataset {source} --out {location}"


def read_manifest(location: str) -> Manifest:
    """Read and validate ``manifest.json`` of a prepared directory; one-line :class:`DataError` if not."""
    fs, base = open_location(location)
    path = f"{base}/{MANIFEST}"
    try:
        with fs.open_input_stream(path) as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{location}: no {MANIFEST}, so this is not a prepared dataset or its preparation did "
                        f"not finish; {_fix(location)} (an image folder is given as folder:PATH)") from None  # fmt: skip
    except OSError as e:
        raise DataError(f"{location}: cannot read {MANIFEST} ({_first_line(e)}); check the location") from e
    try:
        return Manifest.from_dict(json.loads(raw))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{location}/{MANIFEST} is damaged ({_first_line(e)}); {_fix(location)}") from e


# --------------------------------------------------------------------------------------------------
# Decoding


def decode_images(col: pa.Array | pa.ChunkedArray, shape: tuple[int, int, int], encoding: str) -> np.ndarray:
    """An Arrow binary column of raw pixels or PNG files -> writable uint8 (N, H, W, C) images.

    Raises ``ValueError`` when an image does not have ``shape``.
    """
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    n = len(col)
    if n == 0:
        return np.zeros((0, *shape), dtype=np.uint8)
    if col.null_count:
        raise ValueError("the image column has nulls")
    if encoding == "raw":
        item = int(np.prod(shape))
        off_type = np.int64 if pa.types.is_large_binary(col.type) else np.int32
        offsets = np.frombuffer(col.buffers()[1], dtype=off_type)[col.offset : col.offset + n + 1]
        if not np.all(np.diff(offsets) == item):
            raise ValueError(f"an image does not have {item} bytes ({shape})")
        data = np.frombuffer(col.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[0] + n * item]
        return data.reshape(n, *shape).copy()
    from PIL import Image

    out = np.empty((n, *shape), dtype=np.uint8)
    for i, blob in enumerate(col.to_pylist()):
        with Image.open(io.BytesIO(blob)) as im:
            a = np.asarray(im, dtype=np.uint8)
        a = a[..., None] if a.ndim == 2 else a
        if a.shape != tuple(shape):
            raise ValueError(f"a PNG image has shape {a.shape}, expected {tuple(shape)}")
        out[i] = a
    return out


def _decode_batch(batch: pa.Table, shape: tuple[int, int, int], encoding: str) -> dict[str, np.ndarray]:
    """``map_batches`` function of :func:`read_prepared`: the image column -> ``x``."""
    return {
        "x": decode_images(batch.column("image"), shape, encoding),
        "label": batch.column("label").to_numpy().astype(np.int64, copy=False),
        "sample_id": batch.column("sample_id").to_numpy().astype(np.int64, copy=False),
        "split": np.asarray(batch.column("split").to_pylist(), dtype=object),
    }


# --------------------------------------------------------------------------------------------------
# Whole dataset in memory


def _read_shard(fs: pafs.FileSystem, base: str, shard: Shard, location: str, m: Manifest) -> pa.Table:
    """One shard's table, after checking its sha256, row count and split column."""
    fix = _fix(location, m.source)
    try:
        with fs.open_input_file(f"{base}/{shard.file}") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{location}: shard {shard.file} is missing; {fix}") from None
    except OSError as e:
        raise DataError(f"{location}: cannot read shard {shard.file} ({_first_line(e)}); {fix}") from e
    if len(raw) != shard.bytes or hashlib.sha256(raw).hexdigest() != shard.sha256:
        raise DataError(f"{location}: shard {shard.file} is damaged (size or sha256 differs from {MANIFEST}); {fix}")
    try:
        table = pq.read_table(pa.BufferReader(raw), columns=list(COLUMNS))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{location}: shard {shard.file} is unreadable ({_first_line(e)}); {fix}") from e
    if table.num_rows != shard.rows or set(table.column("split").unique().to_pylist()) - {shard.split}:
        raise DataError(f"{location}: shard {shard.file} does not hold the rows {MANIFEST} lists; {fix}")
    return table


def _assemble(tables: list[pa.Table], n: int, m: Manifest, what: str, location: str) -> ImageArrays:
    """Place the rows of ``tables`` at their sample ids, which must be 0..n-1 once each."""
    x = np.empty((n, *m.image_shape), dtype=np.uint8)
    y = np.empty(n, dtype=np.int64)
    seen = np.zeros(n, dtype=bool)
    for t in tables:
        ids = t.column("sample_id").to_numpy()
        if ids.size and (ids.min() < 0 or ids.max() >= n or seen[ids].any() or np.unique(ids).size != ids.size):
            raise DataError(f"{location}: the {what} sample ids are not 0..{n - 1} once each; {_fix(location, m.source)}")
        try:
            x[ids] = decode_images(t.column("image"), m.image_shape, m.image_encoding)
        except (ValueError, OSError) as e:
            raise DataError(f"{location}: a {what} image is damaged ({_first_line(e)}); {_fix(location, m.source)}") from e
        y[ids] = t.column("label").to_numpy()
        seen[ids] = True
    if not seen.all():
        raise DataError(f"{location}: {int((~seen).sum())} {what} samples are missing; {_fix(location, m.source)}")
    return ImageArrays(x, y)


def load_prepared(location: str, *, image_size: int | None = None) -> TargetData:
    """The dataset in a prepared directory, identical to the source's :class:`TargetData`.

    Every shard is checked against the manifest's size and sha256, the pixels' fingerprint against the
    manifest's, and the ``split`` column against the recorded split. ``image_size`` resizes as
    :func:`load_dataset` does for registry datasets.
    """
    m = read_manifest(location)
    fs, base = open_location(location)
    tables: dict[str, list[pa.Table]] = {s: [] for s in SPLITS}
    for shard in m.shards:
        tables[shard.split].append(_read_shard(fs, base, shard, location, m))
    carved = m.split.get("val_source") == "split"
    n_train = m.counts.get("train", 0) + (m.counts.get("val", 0) if carved else 0)
    train = _assemble(tables["train"] + (tables["val"] if carved else []), n_train, m, "training", location)
    test = _assemble(tables["test"], m.counts.get("test", 0), m, "test", location)
    val = None
    if not carved and tables["val"]:
        val = _assemble(tables["val"], m.counts.get("val", 0), m, "validation", location)
    data = _make(m.dataset, train, test, list(m.classes), val)
    if data.fingerprint() != m.fingerprint:
        raise DataError(f"{location}: the images do not match the fingerprint in {MANIFEST}; {_fix(location, m.source)}")
    _check_split(m, tables, data, location)
    if image_size is not None and data.image_shape[0] != image_size:
        data = resize_dataset(data, image_size)
    return data


def _check_split(m: Manifest, tables: dict[str, list[pa.Table]], data: TargetData, location: str) -> None:
    """The ``split`` column must give the split recorded in the manifest (same fingerprint)."""
    def ids(s: str) -> np.ndarray:
        parts = [t.column("sample_id").to_numpy() for t in tables[s]]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    carved = m.split.get("val_source") == "split"
    split = Split(ids("train"), ids("val") if carved else np.zeros(0, dtype=np.int64), int(m.split["seed"]),
                  float(m.split["val_fraction"]), data.fingerprint(), str(m.split["val_source"]))  # fmt: skip
    if split.fingerprint() != m.split.get("fingerprint"):
        raise DataError(f"{location}: the split column does not match the split in {MANIFEST}; "
                        f"{_fix(location, m.source)}")  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Ray Data


def _check_files(fs: pafs.FileSystem, base: str, shards: list[Shard], location: str, m: Manifest,
                 verify: bool) -> None:  # fmt: skip
    """Every shard exists with its recorded size (and, with ``verify``, its sha256: :mod:`.verify`)."""
    try:
        infos = fs.get_file_info([f"{base}/{s.file}" for s in shards])
    except OSError as e:  # S3 access denied or throttled, a mount gone stale: one line, not pyarrow's traceback
        raise DataError(f"{location}: cannot list the shards ({_first_line(e)}); check that the location is "
                        "mounted and readable (for s3://, the credentials)") from e  # fmt: skip
    for s, info in zip(shards, infos):
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{location}: shard {s.file} is missing; {_fix(location, m.source)}")
        if info.size != s.bytes:
            raise DataError(f"{location}: shard {s.file} is damaged (size differs from {MANIFEST}); "
                            f"{_fix(location, m.source)}")  # fmt: skip
    if verify:
        from .verify import check_sha256

        check_sha256(fs, base, m, shards, infos, location, lambda s: DataError(
            f"{location}: shard {s.file} is damaged (sha256 differs from {MANIFEST}); {_fix(location, m.source)}"))


def read_prepared(location: str, split: str | None = None, *, verify: bool = False,
                  batch_size: int = 1024) -> ray.data.Dataset:  # fmt: skip
    """A Ray Dataset over a prepared directory's shards, images decoded on CPU workers.

    Columns: ``x`` uint8 (H, W, C) per row, ``label`` int64, ``sample_id`` int64 and ``split``.
    ``split`` ("train", "val" or "test") reads only that split's shards; ``None`` reads all. The
    shards' presence and sizes are checked here; ``verify`` also checks their sha256 (streamed
    through the driver). Row order is not guaranteed: use ``sample_id``.
    """
    import ray.data

    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)} or None for all")
    m = read_manifest(location)
    shards = [s for s in m.shards if split is None or s.split == split]
    if not shards:
        raise DataError(f"{location}: the prepared dataset has no {split} rows")
    fs, base = open_location(location)
    _check_files(fs, base, shards, location, m, verify)
    ds = ray.data.read_parquet([f"{base}/{s.file}" for s in shards], filesystem=fs)  # the shards hold COLUMNS
    kwargs: dict[str, Any] = {"shape": tuple(m.image_shape), "encoding": m.image_encoding}
    return ds.map_batches(_decode_batch, batch_format="pyarrow", batch_size=batch_size, fn_kwargs=kwargs,
                          num_cpus=1)  # fmt: skip
