"""Validation splits: index arrays into a dataset's ORIGINAL training split, so that scores, masks and
fine-tuning all refer to the same samples."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..storage import digest, write_json_atomic
from .arrays import ImageArrays, TargetData


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
        chunks: list[str | np.ndarray] = [f"{self.dataset_fingerprint}|{self.val_source}|"]
        for ids in (self.val_ids, self.train_ids):
            a = np.ascontiguousarray(ids, dtype="<i8")
            chunks += [f"{a.shape[0]}|", a]
        return digest(*chunks)

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
        """Write the split as JSON atomically, flushed to disk before the rename."""
        write_json_atomic(self.to_dict(), path, indent=None, fsync=True)

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

