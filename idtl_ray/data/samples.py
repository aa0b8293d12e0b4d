"""A prepared dataset as the Ray stages see it: metadata and labels in the driver, images in Ray Data.

The driver of ``idtl-ray score`` never holds images. It opens a prepared directory with
:func:`open_target`, which reads the manifest and the ``sample_id`` and ``label`` columns only
(8 bytes per sample each), and asks Ray Data for the images with :func:`read_samples`: the shards
are read with ``read_parquet`` and decoded in ``map_batches`` tasks on the CPUs of any node, and the
decoded blocks stay in Ray's object store. Every stage that needs pixels receives a
:class:`RaySamples` (that dataset plus the ids it wants) and gathers them where it runs, in a Ray
worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..errors import DataError
from .prepare import Manifest, _first_line, open_location
from .readers import _check_files, _fix, decode_images, read_manifest

# CPUs a read-and-decode task asks of Ray: small, so that reading never waits for a pool that holds
# the cluster's whole CPUs (scoring actors, Train workers, Tune trials).
READ_CPUS = 0.25


@dataclass
class Labels:
    """The labels of one split, without images: what the driver keeps of a prepared dataset."""

    y: np.ndarray

    def __len__(self) -> int:
        return int(len(self.y))

    def take(self, ids: np.ndarray) -> Labels:
        """The labels at positions ``ids`` (as :meth:`ImageArrays.take`)."""
        return Labels(self.y[np.asarray(ids, dtype=np.int64)])


@dataclass
class PreparedTarget:
    """A prepared dataset's metadata and labels; stands in for :class:`TargetData` in the driver.

    ``train`` holds the labels of the ORIGINAL training split (carved validation rows included, at
    their sample ids); ``val`` those of a shipped validation split, if any. ``make_split`` and
    ``apply_split`` work on it as on :class:`TargetData`.
    """

    location: str
    manifest: Manifest
    train: Labels
    val: Labels | None
    test: Labels = field(default_factory=lambda: Labels(np.zeros(0, np.int64)))

    @property
    def name(self) -> str:
        """The source dataset's name (e.g. ``digits``)."""
        return self.manifest.dataset

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    @property
    def num_classes(self) -> int:
        return len(self.manifest.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.manifest.image_shape)  # type: ignore[return-value]

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.manifest.mean)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.manifest.std)

    def fingerprint(self) -> str:
        """The source data's fingerprint, as recorded in the manifest."""
        return self.manifest.fingerprint

    @property
    def carved(self) -> bool:
        """Whether the validation rows were carved from the training split (else shipped)."""
        return self.manifest.split.get("val_source") == "split"

    def part_shards(self, part: str) -> list[str]:
        """The shard splits that make up ``part``: "train" (the original training split), "val" or "test"."""
        if part == "train":
            return ["train", "val"] if self.carved else ["train"]
        if part == "val" and self.carved:
            raise DataError(f"{self.location}: the validation rows are part of the training split (use part='train')")
        return [part]


def split_note(data: PreparedTarget, val_fraction: float, seed: int) -> str | None:
    """A note when ``data`` is a directory the user prepared with another split than this command makes.

    Every command makes its seeded split from its own ``--val-fraction``/``--seed``; the ``split``
    column of the shards records the one ``prepare`` was given (the cache's copies: always 0.1 / 0).
    """
    from pathlib import Path

    from .cache import cache_root

    s = data.manifest.split
    if s.get("val_source") != "split" or (float(s["val_fraction"]), int(s["seed"])) == (val_fraction, seed):
        return None
    if "://" not in data.location and (cache_root() / "prepared").resolve() in Path(data.location).resolve().parents:
        return None
    return (f"note: {data.location} was prepared with --val-fraction {s['val_fraction']:g} --seed {s['seed']} (its "
            f"split column); this run splits with --val-fraction {val_fraction:g} --seed {seed}: pass those to use "
            "the stored split")


def _labels(location: str, m: Manifest, splits: list[str], what: str) -> Labels:
    """The ``label`` column of the shards of ``splits``, placed at their sample ids (0..n-1 once each)."""
    fs, base = open_location(location)
    shards = [s for s in m.shards if s.split in splits]
    n = sum(s.rows for s in shards)
    y = np.full(n, -1, dtype=np.int64)
    seen = np.zeros(n, dtype=bool)
    for s in shards:
        try:
            t = pq.read_table(f"{base}/{s.file}", columns=["sample_id", "label"], filesystem=fs)
        except OSError as e:  # S3 access denied or throttled mid-way: one line
            raise DataError(f"{location}: cannot read the labels of shard {s.file} ({_first_line(e)}); check "
                            "that the location is readable (for s3://, the credentials)") from e  # fmt: skip
        ids = t.column("sample_id").to_numpy()
        if ids.size and (ids.min() < 0 or ids.max() >= n or seen[ids].any()):
            raise DataError(f"{location}: the {what} sample ids are not 0..{n - 1} once each; {_fix(location, m.source)}")
        y[ids] = t.column("label").to_numpy()
        seen[ids] = True
    if not seen.all():
        raise DataError(f"{location}: {int((~seen).sum())} {what} samples are missing; {_fix(location, m.source)}")
    return Labels(y)


def open_target(location: str) -> PreparedTarget:
    """Open a prepared directory for the Ray stages: manifest, shard sizes and checksums, labels; no images.

    Raises one-line :class:`DataError` when the directory is incomplete or damaged (each shard's sha256
    is checked here, once per version of the file: :mod:`idtl_ray.data.verify`).
    """
    m = read_manifest(location)
    fs, base = open_location(location)
    _check_files(fs, base, list(m.shards), location, m, verify=True)
    carved = m.split.get("val_source") == "split"
    train = _labels(location, m, ["train", "val"] if carved else ["train"], "training")
    val = None if carved or not m.counts.get("val") else _labels(location, m, ["val"], "validation")
    test = _labels(location, m, ["test"], "test") if m.counts.get("test") else Labels(np.zeros(0, np.int64))
    return PreparedTarget(location, m, train, val, test)


def _decode(batch: Any, shape: tuple[int, int, int], encoding: str) -> dict[str, np.ndarray]:
    """``map_batches`` function of :func:`read_samples`: the image column -> uint8 NHWC ``x``."""
    return {
        "x": decode_images(batch.column("image"), shape, encoding),
        "label": batch.column("label").to_numpy().astype(np.int64, copy=False),
        "sample_id": batch.column("sample_id").to_numpy().astype(np.int64, copy=False),
    }


def read_samples(target: PreparedTarget, part: str, rows: int = 1024, *, materialize: bool = True) -> Any:
    """The images of ``part`` ("train", "val" or "test") as a Ray Dataset: ``x``, ``label``, ``sample_id``.

    Read with ``read_parquet`` and decoded on CPU workers of any node in blocks of ``rows``; with
    ``materialize`` the decoded blocks are computed now and kept in Ray's object store (the driver
    holds only their references), so that several stages can read them.
    """
    import ray.data

    m = target.manifest
    fs, base = open_location(target.location)
    files = [f"{base}/{s.file}" for s in m.shards if s.split in target.part_shards(part)]
    if not files:
        raise DataError(f"{target.location}: the prepared dataset has no {part} rows")
    quiet_ray_data()
    ds = ray.data.read_parquet(files, filesystem=fs, num_cpus=READ_CPUS).select_columns(["sample_id", "label", "image"])
    ds = ds.map_batches(_decode, batch_format="pyarrow", batch_size=max(1, rows), num_cpus=READ_CPUS,
                        fn_kwargs={"shape": target.image_shape, "encoding": m.image_encoding})
    # blocks of `rows`: Ray Data would merge the decoded batches into few large blocks, one per actor at most
    ds = ds.repartition(target_num_rows_per_block=max(1, rows))
    return materialize_surviving_node_loss(ds) if materialize else ds


# What Ray raises when a node (and the actors or objects on it) went away during a run. An autoscaler that
# scales a node down, or a spot instance taken back, mid-read: Ray Data does not retry its file-listing actors.
_NODE_LOSS = ("ActorDiedError", "NodeDiedError", "WorkerCrashedError", "ObjectLostError", "OwnerDiedError")


def lost_a_node(error: BaseException) -> bool:
    """Whether ``error`` (or an error it wraps, or its text: Ray re-raises some as unserialisable) says a
    node, or a worker on it, died."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ in _NODE_LOSS or any(name in str(e) for name in _NODE_LOSS):
            return True
        e = e.__cause__ or e.__context__
    return False


def materialize_surviving_node_loss(ds: Any, attempts: int = 3) -> Any:
    """``ds.materialize()``, run again (up to ``attempts`` in all) when a node died during the read."""
    import sys

    for attempt in range(1, attempts):
        try:
            return ds.materialize()
        except Exception as e:
            if not lost_a_node(e):
                raise
            print(f"  a node left the cluster while reading the dataset ({type(e).__name__}); reading it again "
                  f"(attempt {attempt + 1} of {attempts})", file=sys.stderr, flush=True)
    return ds.materialize()  # the last attempt: its error, whatever it is, is the caller's


def quiet_ray_data() -> None:
    """No progress bars or execution-plan lines from Ray Data: the stages print their own progress."""
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": we know
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


@dataclass
class RaySamples:
    """Samples whose images are in a Ray Dataset: the dataset, the ids wanted (in order) and their labels.

    Small to pickle (the dataset is references to blocks), so it travels to the worker that needs the
    pixels, which calls :meth:`gather` there.
    """

    ds: Any
    ids: np.ndarray
    y: np.ndarray
    image_shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64)
        self.y = np.asarray(self.y, dtype=np.int64)
        if len(self.ids) != len(self.y):
            raise DataError(f"{len(self.ids)} sample ids but {len(self.y)} labels")

    def __len__(self) -> int:
        return int(len(self.ids))

    def take(self, positions: np.ndarray) -> RaySamples:
        """The samples at ``positions`` of this set (same dataset, fewer ids)."""
        p = np.asarray(positions, dtype=np.int64)
        return RaySamples(self.ds, self.ids[p], self.y[p], self.image_shape)

    def gather(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of these samples in the order of ``ids``, read from the dataset into this process."""
        order = np.argsort(self.ids, kind="stable")
        sorted_ids = self.ids[order]
        x = np.empty((len(self.ids), *self.image_shape), dtype=np.uint8)
        found = np.zeros(len(self.ids), dtype=bool)
        for batch in self.ds.iter_batches(batch_size=None, batch_format="numpy"):
            sid = np.asarray(batch["sample_id"], dtype=np.int64)
            pos = np.searchsorted(sorted_ids, sid)
            hit = (pos < len(sorted_ids)) & (sorted_ids[np.minimum(pos, len(sorted_ids) - 1)] == sid)
            if hit.any():
                where = order[pos[hit]]
                x[where] = batch["x"][hit]
                found[where] = True
        if not found.all():
            raise DataError(f"{int((~found).sum())} of the {len(self.ids)} requested samples are not in the dataset")
        return x, self.y.copy()
