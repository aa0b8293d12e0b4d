"""``idtl-ray prepare``: a dataset written once as Parquet shards plus ``manifest.json``.

Every command accepts such a directory as ``--dataset`` (:func:`idtl_ray.data.load_dataset`), and
the Ray Data stages read it with :func:`idtl_ray.data.readers.read_prepared`. ``DIR`` is a local
path or any URI pyarrow's file systems open (``s3://bucket/prefix``, ``gs://...``, ``file:///...``).

Layout of ``DIR``::

    train-00000.parquet ...   the samples that stay in training
    val-00000.parquet ...     the seeded validation samples carved from train (or a shipped val split)
    test-00000.parquet ...    the test split
    manifest.json             written last: a directory without it is incomplete

Schema of every shard (one row per image, rows in ``sample_id`` order):

=============  ========  ===================================================================
``sample_id``  int64     position in the dataset's ORIGINAL split: for ``train`` and carved
                         ``val`` rows the original training split (the id masks use), for
                         ``test`` rows the test split, for shipped ``val`` rows the shipped
                         validation split
``label``      int64     class index into the manifest's ``classes``
``split``      string    ``"train"``, ``"val"`` or ``"test"`` (one value per shard)
``image``      binary    ``raw``: the H*W*C uint8 pixels in HWC order; ``png``: a PNG file
                         (8-bit grey for C=1, RGB for C=3), lossless
=============  ========  ===================================================================

Images whose sides are at most :data:`RAW_MAX_SIDE` (64) pixels are stored ``raw``, larger ones as
``png``. All images of a dataset share one shape, so the shape is not a column: the manifest's
``image_shape`` [H, W, C] and ``image_encoding`` hold it, and every shard repeats both in its Parquet
key-value metadata (``idtl_ray.image_shape`` = "H,W,C", ``idtl_ray.image_encoding``).

The ``split`` column is :func:`idtl_ray.data.make_split` of the source data with the given seed and
fraction (stratified), so every stage that reads the directory agrees on the validation samples.

``manifest.json``: ``format`` ("idtl-ray-prepared"), ``version``, ``dataset`` (the source's name,
e.g. "digits"), ``source`` (what ``--dataset`` said), ``classes``, ``image_shape``,
``image_encoding``, ``mean``/``std`` (per channel, [0, 1] units, of the whole training split),
``counts`` per split, ``split`` (seed, val_fraction, val_source, the split's fingerprint),
``fingerprint``, ``content_sha256`` and ``shards`` (file, split, rows, bytes, sha256 of each).

Fingerprints: ``fingerprint`` is :meth:`TargetData.fingerprint` of the source data, which loading
the directory recomputes and checks, so masks and splits made from a prepared copy match those made
from the registry name. ``content_sha256`` (sha256 over the shards' "file:sha256" lines, in manifest
order) identifies the bytes of this copy; the per-shard checksums are verified whenever a command opens
the directory (once per version of each file: :mod:`idtl_ray.data.verify`).

Shards hold about ``shard_bytes`` of image and label payload each (default 192 MiB, before Parquet's
zstd compression), fewer for small datasets: digits gives one shard per split. Each shard is written
to a temporary name and renamed, the manifest last, so a crash never leaves a directory that looks
complete; a previous manifest in ``DIR`` is deleted before the first shard is written.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..errors import DataError
from ..storage import digest
from .arrays import TargetData
from .splits import Split, make_split

MANIFEST = "manifest.json"
FORMAT = "idtl-ray-prepared"
VERSION = 1
SPLITS = ("train", "val", "test")
RAW_MAX_SIDE = 64
DEFAULT_SHARD_BYTES = 192 * 2**20
MIN_SHARD_BYTES = 2**20
MAX_SHARD_BYTES = 2**30  # Arrow's binary columns hold < 2 GiB: a larger shard could not be read back whole
COLUMNS = ("sample_id", "label", "split", "image")
SHARD_NAME = re.compile(r"^(train|val|test)-\d{5}\.parquet$")
TEMP_NAME = re.compile(r"^\.((train|val|test)-\d{5}\.parquet|manifest\.json)\.tmp-[0-9a-f]+$")
_ROWS_PER_BATCH = 1024


# --------------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class Shard:
    """One Parquet file of a prepared dataset: its name, split, row count, size and sha256."""

    file: str
    split: str
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The contents of ``manifest.json`` (see the module docstring for each field)."""

    dataset: str
    source: str
    classes: list[str]
    image_shape: tuple[int, int, int]
    image_encoding: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    counts: dict[str, int]
    split: dict[str, Any]
    fingerprint: str
    shards: list[Shard] = field(default_factory=list)

    @property
    def content_sha256(self) -> str:
        """sha256 over the shards' ``file:sha256`` lines: identifies the bytes of this copy."""
        return digest("".join(f"{s.file}:{s.sha256}\n" for s in self.shards), length=None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, as written to ``manifest.json``."""
        d = {"format": FORMAT, "version": VERSION, **asdict(self)}
        d["image_shape"], d["mean"], d["std"] = list(self.image_shape), list(self.mean), list(self.std)
        d["content_sha256"] = self.content_sha256
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """Parse a manifest dict; raises ``ValueError``/``KeyError``/``TypeError`` on a malformed one."""
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise ValueError(f"not an {FORMAT} version {VERSION} manifest")
        shards = [Shard(str(s["file"]), str(s["split"]), int(s["rows"]), int(s["bytes"]), str(s["sha256"]))
                  for s in d["shards"]]  # fmt: skip
        if any(s.split not in SPLITS or not SHARD_NAME.match(s.file) for s in shards):
            raise ValueError("a shard has an unknown split or file name")
        shape = tuple(int(v) for v in d["image_shape"])
        if len(shape) != 3 or d["image_encoding"] not in ("raw", "png"):
            raise ValueError("bad image_shape or image_encoding")
        m = cls(dataset=str(d["dataset"]), source=str(d["source"]), classes=[str(c) for c in d["classes"]],
                image_shape=shape, image_encoding=str(d["image_encoding"]),  # type: ignore[arg-type]
                mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]),
                counts={str(k): int(v) for k, v in d["counts"].items()}, split=dict(d["split"]),
                fingerprint=str(d["fingerprint"]), shards=shards)  # fmt: skip
        if d.get("content_sha256") != m.content_sha256:
            raise ValueError("content_sha256 does not match the shard checksums")
        return m


# --------------------------------------------------------------------------------------------------
# File systems


def open_location(location: str) -> tuple[pafs.FileSystem, str]:
    """(file system, path) of a local directory or a URI pyarrow opens (``s3://bucket/prefix``)."""
    if "://" not in location:
        return pafs.LocalFileSystem(), Path(location).expanduser().resolve().as_posix()
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{location}: pyarrow cannot open this location ({_first_line(e)}); give a local "
                        f"directory or a URI such as s3://bucket/prefix") from e  # fmt: skip
    return fs, path.rstrip("/")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__  # AWS errors name the cause late


def write_atomic(fs: pafs.FileSystem, base: str, name: str, data: bytes | pa.Buffer) -> None:
    """Write ``base/name`` through a temporary name and a rename, so readers never see half a file."""
    tmp = f"{base}/.{name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, f"{base}/{name}")
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------------------------------
# Images


def image_encoding(shape: tuple[int, int, int]) -> str:
    """``"raw"`` for images with both sides <= :data:`RAW_MAX_SIDE` pixels, else ``"png"``."""
    return "raw" if max(shape[0], shape[1]) <= RAW_MAX_SIDE else "png"


def encode_images(x: np.ndarray, encoding: str) -> pa.Array:
    """uint8 (N, H, W, C) images -> an Arrow binary array of raw pixels or PNG files."""
    n = int(x.shape[0])
    if encoding == "raw":
        item = int(np.prod(x.shape[1:]))
        offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int32) * item).tobytes())
        return pa.Array.from_buffers(pa.binary(), n, [None, offsets, pa.py_buffer(np.ascontiguousarray(x).tobytes())])
    from PIL import Image

    out = []
    for img in x:
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return pa.array(out, type=pa.binary())


# --------------------------------------------------------------------------------------------------
# Writer


def _groups(data: TargetData, split: Split) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(split name, images, labels, sample ids to write) of each non-empty split."""
    yield "train", data.train.x, data.train.y, np.asarray(split.train_ids, dtype=np.int64)
    if split.val_source == "split":
        yield "val", data.train.x, data.train.y, np.asarray(split.val_ids, dtype=np.int64)
    elif data.val is not None:
        yield "val", data.val.x, data.val.y, np.arange(len(data.val), dtype=np.int64)
    yield "test", data.test.x, data.test.y, np.arange(len(data.test), dtype=np.int64)


def _write_shard(fs: pafs.FileSystem, base: str, name: str, batches: list[pa.RecordBatch],
                 metadata: dict[bytes, bytes]) -> Shard:  # fmt: skip
    """Write one Parquet shard atomically and return its manifest entry."""
    table = pa.Table.from_batches(batches).replace_schema_metadata(metadata)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    buf = sink.getvalue()
    write_atomic(fs, base, name, buf)
    return Shard(name, name.split("-", 1)[0], table.num_rows, buf.size, digest(buf, length=None))


def _write_group(fs: pafs.FileSystem, base: str, split_name: str, x: np.ndarray, y: np.ndarray,
                 ids: np.ndarray, encoding: str, shard_bytes: int) -> list[Shard]:  # fmt: skip
    """Write the rows ``ids`` of (x, y) as shards of about ``shard_bytes`` payload each."""
    h, w, c = x.shape[1:]
    metadata = {b"idtl_ray.image_shape": f"{h},{w},{c}".encode(), b"idtl_ray.image_encoding": encoding.encode()}
    shards: list[Shard] = []
    pending: list[pa.RecordBatch] = []
    size = 0
    for i in range(0, len(ids), _ROWS_PER_BATCH):
        sel = ids[i : i + _ROWS_PER_BATCH]
        batch = pa.record_batch({
            "sample_id": pa.array(sel, type=pa.int64()),
            "label": pa.array(y[sel], type=pa.int64()),
            "split": pa.array([split_name] * len(sel), type=pa.string()),
            "image": encode_images(x[sel], encoding),
        })  # fmt: skip
        pending.append(batch)
        size += batch.nbytes
        if size >= shard_bytes or i + _ROWS_PER_BATCH >= len(ids):
            shards.append(_write_shard(fs, base, f"{split_name}-{len(shards):05d}.parquet", pending, metadata))
            pending, size = [], 0
    return shards


def _start_directory(fs: pafs.FileSystem, base: str, location: str) -> None:
    """Create ``base`` and delete a previous manifest, so the directory reads as incomplete from now on."""
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        raise DataError(f"--out {location} is a file; give a directory (it is created if missing)")
    fs.create_dir(base, recursive=True)
    if fs.get_file_info(f"{base}/{MANIFEST}").type != pafs.FileType.NotFound:
        fs.delete_file(f"{base}/{MANIFEST}")


def _remove_stale(fs: pafs.FileSystem, base: str, keep: set[str]) -> None:
    """Delete shards of an earlier preparation that the new manifest does not list, and temp files."""
    for info in fs.get_file_info(pafs.FileSelector(base)):
        name = info.base_name
        if (SHARD_NAME.match(name) and name not in keep) or TEMP_NAME.match(name):
            fs.delete_file(info.path)


def write_prepared(data: TargetData, split: Split, out: str, *, source: str | None = None,
                   shard_bytes: int = DEFAULT_SHARD_BYTES) -> Manifest:  # fmt: skip
    """Write ``data`` with its validation ``split`` into ``out`` (a directory or URI); return the manifest.

    Shards go first (each through a temporary name), ``manifest.json`` last. Raises
    :class:`DataError` when ``out`` cannot be written.
    """
    if split.dataset_fingerprint != data.fingerprint():
        raise DataError(f"the split belongs to another dataset than {data.name}; make a new split")
    fs, base = open_location(out)
    encoding = image_encoding(data.image_shape)
    try:
        _start_directory(fs, base, out)
        shards: list[Shard] = []
        for name, x, y, ids in _groups(data, split):
            shards += _write_group(fs, base, name, x, y, ids, encoding, shard_bytes)
        counts = {s: sum(sh.rows for sh in shards if sh.split == s) for s in SPLITS}
        manifest = Manifest(
            dataset=data.name, source=source or data.name, classes=list(data.classes), image_shape=data.image_shape,
            image_encoding=encoding, mean=tuple(data.mean), std=tuple(data.std), counts=counts,
            split={"seed": int(split.seed), "val_fraction": float(split.val_fraction), "val_source": split.val_source,
                   "fingerprint": split.fingerprint()},
            fingerprint=data.fingerprint(), shards=shards,
        )  # fmt: skip
        write_atomic(fs, base, MANIFEST, json.dumps(manifest.to_dict(), indent=1).encode())
        _remove_stale(fs, base, {s.file for s in shards})
    except OSError as e:
        raise DataError(f"cannot write the prepared dataset to {out} ({_first_line(e)}); "
                        f"check the location and its permissions, then re-run idtl-ray prepare") from e  # fmt: skip
    return manifest


def prepare_dataset(
    dataset: str,
    out: str,
    *,
    data_dir: str | Path | None = None,
    image_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    download: bool = True,
) -> Manifest:
    """Load ``dataset`` (any name :func:`load_dataset` accepts), split it, and write it into ``out``.

    The split is ``make_split(data, val_fraction, seed)``, as the other commands make it. Arguments
    are checked before the dataset is loaded; any problem raises one-line :class:`DataError`.
    """
    from .registry import load_dataset  # lazy: the registry reads prepared directories through readers

    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}; e.g. 0.1 for the paper's 10%")
    if seed < 0:  # numpy's generators take none
        raise DataError(f"--seed must be >= 0, got {seed}")
    if not MIN_SHARD_BYTES <= shard_bytes <= MAX_SHARD_BYTES:
        raise DataError(f"--shard-mb must be in 1..1024 (MiB per Parquet shard), got {shard_bytes / 2**20:g}; "
                        "use 128-256 for large datasets")
    fs, base = open_location(out)  # a bad URI fails before the (possibly long) load
    try:
        kind = fs.get_file_info(base).type
    except OSError as e:  # S3 access denied or no credentials, a name too long: one line
        raise DataError(f"--out {out}: cannot reach it ({e}); check the path and, for s3://, the credentials") from e
    if kind == pafs.FileType.File:
        raise DataError(f"--out {out} is a file; give a directory (it is created if missing)")
    # a second prepare into the same local directory would delete this one's temporary shards as stale: it
    # refuses in one line while this one holds the directory (an s3:// prefix cannot be locked)
    from ..storage import LOCK_NAME, hold_directory

    data = load_dataset(dataset, data_dir, download=download, image_size=image_size)  # before: a failed load leaves no folder
    local = isinstance(fs, pafs.LocalFileSystem)
    with hold_directory(base) if local else contextlib.nullcontext():
        manifest = write_prepared(data, make_split(data, val_fraction, seed), out, source=dataset, shard_bytes=shard_bytes)
        if local:  # the finished directory holds the shards and the manifest only
            (Path(base) / LOCK_NAME).unlink(missing_ok=True)
        return manifest


def format_summary(manifest: Manifest, out: str) -> str:
    """One line describing a prepared dataset, for the CLI."""
    h, w, c = manifest.image_shape
    counts = ", ".join(f"{manifest.counts.get(s, 0)} {s}" for s in SPLITS)
    return (f"prepared {manifest.dataset}: {counts} images ({h}x{w}x{c}, {manifest.image_encoding}) in "
            f"{len(manifest.shards)} shard(s) under {out}; fingerprint {manifest.fingerprint}")  # fmt: skip
