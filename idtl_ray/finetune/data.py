"""The samples of a fine-tuning run as Ray Datasets: the driver picks sample ids, Ray Data reads the images.

The driver of :func:`idtl_ray.finetune.run_finetune` holds the prepared dataset's labels and the ids
to train on, never the images. :func:`train_datasets` reads the prepared shards with
``read_parquet``, decodes them in ``map_batches`` tasks on any node's CPUs
(:func:`idtl_ray.data.samples.read_samples`), keeps the rows whose ``sample_id`` the run wants, and
computes the blocks into Ray's object store before training starts, because:

- the Train workers may hold every CPU (2 workers x 1 CPU on a 2-CPU machine), and a read task
  could then never be scheduled beside them;
- every epoch and every evaluation then reads decoded blocks, not files, in a fixed block order,
  so that a seed reproduces a run.

:func:`exact_split_config` hands each worker its shard of ``train`` (no row dropped) and the whole
``val`` and ``test`` sets (rank 0 evaluates on them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.samples import READ_CPUS, PreparedTarget, materialize_surviving_node_loss, read_samples
from ..errors import DataError

# Rows per decoded block: at most this many (a 224 px RGB block stays near 150 MB) ...
MAX_BLOCK_ROWS = 1024
# ... and at least this many blocks per Train worker, so the streaming split can balance the shards.
BLOCKS_PER_WORKER = 8
# Rows of a worker's per-epoch local shuffle buffer. A shard larger than this is only shuffled within
# a window of it, so its rows are shuffled once across the whole set first (see train_datasets).
SHUFFLE_BUFFER_ROWS = 4096


@dataclass(frozen=True)
class Rows:
    """The rows of one prepared part ("train", "val" or "test") that a dataset takes, by sample id."""

    part: str
    ids: np.ndarray


def _keep_rows(batch: Any, wanted: np.ndarray) -> Any:
    """``map_batches`` function: the rows of a pyarrow batch whose ``sample_id`` is marked in ``wanted``."""
    return batch.filter(wanted[batch.column("sample_id").to_numpy()])


def _part_size(target: PreparedTarget, part: str) -> int:
    labels = {"train": target.train, "val": target.val, "test": target.test}[part]
    return 0 if labels is None else len(labels)


def read_rows(target: PreparedTarget, rows: Rows, block_rows: int = MAX_BLOCK_ROWS,
              shuffle_seed: int | None = None) -> Any:
    """The samples ``rows`` as a materialized Ray Dataset (``x`` uint8 HWC, ``label``, ``sample_id``)
    in blocks of ``block_rows``; with ``shuffle_seed``, in a seeded random row order.

    The ids travel once, as a boolean per sample id of the part, inside the filter's task; a filter
    that would keep every row is left out. Read and filtered in large blocks, then cut: each task has
    a fixed cost (filtering digits' training split in 16 blocks took 9-28 s, in 2 blocks 1-3 s, on 2 busy CPUs).
    """
    n = _part_size(target, rows.part)
    wanted = np.zeros(n, dtype=bool)
    wanted[np.asarray(rows.ids, dtype=np.int64)] = True
    ds = read_samples(target, rows.part, MAX_BLOCK_ROWS, materialize=False)
    if not wanted.all():
        ds = ds.map_batches(_keep_rows, batch_format="pyarrow", batch_size=None, num_cpus=READ_CPUS,
                            fn_kwargs={"wanted": wanted})  # fmt: skip
    if block_rows < MAX_BLOCK_ROWS:
        ds = ds.repartition(target_num_rows_per_block=max(1, block_rows))
    if shuffle_seed is not None:
        ds = ds.random_shuffle(seed=shuffle_seed)
    ds.context.execution_options.preserve_order = True  # blocks in shard order: a seed reproduces the epochs
    ds = materialize_surviving_node_loss(ds)
    if ds.count() != int(wanted.sum()):  # metadata only: the blocks stay in the object store
        raise DataError(f"{target.location}: {ds.count()} of the {int(wanted.sum())} wanted {rows.part} samples were "
                        f"read; prepare the dataset again (idtl-ray prepare)")  # fmt: skip
    return ds


def train_datasets(target: PreparedTarget, train_ids: np.ndarray, val: Rows | None, workers: int,
                   seed: int = 0) -> dict[str, Any]:
    """``{"train", "val", "test"}`` Ray Datasets of a run (``val``/``test`` absent when there are none).

    ``train`` comes in ``BLOCKS_PER_WORKER`` blocks per worker (fewer, larger ones only past
    ``MAX_BLOCK_ROWS``); the evaluation sets, read whole by rank 0, in large blocks. When a worker's
    share exceeds its shuffle buffer, ``train`` is shuffled once (seeded) across the whole set: a
    dataset stored class by class (an image folder) would otherwise give batches of one class.
    """
    rows = max(1, min(MAX_BLOCK_ROWS, math.ceil(len(train_ids) / (BLOCKS_PER_WORKER * workers))))
    shuffle = seed if len(train_ids) > SHUFFLE_BUFFER_ROWS * workers else None
    jobs = {"train": (Rows("train", train_ids), rows, shuffle)}
    if val is not None and len(val.ids):
        jobs["val"] = (val, MAX_BLOCK_ROWS, None)
    if len(target.test):
        jobs["test"] = (Rows("test", np.arange(len(target.test))), MAX_BLOCK_ROWS, None)
    # one after the other: concurrent executions share the cluster's CPUs between them (Ray Data's
    # autoscaling coordinator) and measured slower than in turn
    return {name: read_rows(target, r, b, s) for name, (r, b, s) in jobs.items()}


def exact_split_config() -> Any:
    """A DataConfig that splits only ``train``, keeping every row, and gives every worker all of the others.

    Ray's default ``streaming_split(equal=True)`` drops up to ``workers - 1`` rows to even the shards,
    so instance training would silently lose kept samples; the uneven shards this leaves are handled
    by DDP's ``join()`` in the worker.
    """
    import ray.train

    class ExactSplitDataConfig(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):  # type: ignore[no-untyped-def]
            out: list[dict[str, Any]] = [{} for _ in range(world_size)]
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self.default_ingest_options()
                if name != "train":  # evaluation sets: whole, on every rank (only rank 0 reads them)
                    for i in range(world_size):
                        out[i][name] = ds.iterator()
                    continue
                for i, it in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    out[i][name] = it
            return out

    return ExactSplitDataConfig()
