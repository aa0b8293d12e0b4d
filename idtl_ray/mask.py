"""The Parquet mask: one row per training sample, and the provenance that makes it safe to apply.

Columns (design.md §3): ``sample_id`` int64 (index in the dataset's original training split),
``label`` int64, one score column, ``keep`` bool. The score column is ``delta_val_loss`` float64
(``--score paper``: predicted change of the summed validation loss when the sample is removed;
negative = removing it helps) or ``self_influence`` float64 (``--score self``, the default: predicted
rise of the sample's own loss when it is removed; high = likely mislabelled or an outlier).

The file's key-value metadata (key ``idtl_ray``) holds a JSON object with the dataset and split
fingerprints, model and weights, solver settings and convergence, the validation reference, the sign
convention and the package version. :func:`check_mask` refuses a mask made for another dataset or split.
Files are written to a temporary name and renamed, so a crash never leaves a partial mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import MaskError
# the writers live in storage.py; these names stay importable from here (workflow, experiments, benchmarks)
from .storage import (ensure_writable, json_default, save_figure_atomic, write_json_atomic,  # noqa: F401
                      write_table_atomic, write_text_atomic)

META_KEY = b"idtl_ray"
SIGN_CONVENTION = (
    "delta_val_loss = (1/n) * g_val^T (H + damping*I)^-1 grad L(z_i): the predicted change of the summed "
    "validation loss when sample i is removed and the model re-fit. Negative = removing it lowers "
    "validation loss; the paper's rule drops samples with delta_val_loss < 0."
)

SCORE_COLUMNS = ("delta_val_loss", "self_influence")
SELF_INFLUENCE_CONVENTION = (
    "self_influence = (1/n) * grad L(z_i)^T (G + damping*I)^-1 grad L(z_i) over the model's head (EK-FAC): the "
    "predicted rise of sample i's own loss when it is removed and the head re-fit. High = the model bends towards "
    "the sample (a flipped label or an outlier); the budget rules drop the highest first."
)


def schema(score_name: str = "delta_val_loss") -> pa.Schema:
    """The mask's columns, with the score column named after what it holds."""
    if score_name not in SCORE_COLUMNS:
        raise MaskError(f"unknown score column {score_name!r}: internal error, please report")
    return pa.schema([("sample_id", pa.int64()), ("label", pa.int64()), (score_name, pa.float64()),
                      ("keep", pa.bool_())])


SCHEMA = schema()


@dataclass
class Mask:
    """A mask read back from disk."""

    sample_id: np.ndarray
    label: np.ndarray
    scores: np.ndarray
    keep: np.ndarray
    meta: dict[str, Any]
    score_name: str = "delta_val_loss"

    @property
    def delta_val_loss(self) -> np.ndarray:
        """The paper's score; a self-influence mask has none."""
        if self.score_name != "delta_val_loss":
            raise MaskError(f"this mask holds {self.score_name} scores, not delta_val_loss: re-score with --score paper")
        return self.scores

    def __len__(self) -> int:
        return len(self.sample_id)

    @property
    def kept_ids(self) -> np.ndarray:
        """Sample ids the mask keeps, sorted."""
        return np.sort(self.sample_id[self.keep])

    def per_class(self) -> list[tuple[int, int, int]]:
        """(label, kept, dropped) for every label present."""
        out = []
        for c in np.unique(self.label):
            sel = self.label == c
            out.append((int(c), int((self.keep & sel).sum()), int((~self.keep & sel).sum())))
        return out


atomic_write_table = write_table_atomic  # the name this module has always exported


def mask_table(sample_id: np.ndarray, label: np.ndarray, scores: np.ndarray, keep: np.ndarray,
               meta: dict[str, Any], score_name: str = "delta_val_loss") -> pa.Table:
    """Build the mask table (sorted by sample_id) with its metadata; validates the columns."""
    sample_id = np.asarray(sample_id, dtype=np.int64)
    n = len(sample_id)
    cols = {"label": label, score_name: scores, "keep": keep}
    for name, col in cols.items():
        if len(col) != n:
            raise MaskError(f"mask column {name} has {len(col)} rows, sample_id has {n}: internal error, please report")
    if len(np.unique(sample_id)) != n:
        raise MaskError("mask has duplicate sample ids: internal error, please report")
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise MaskError("refusing to write a mask with non-finite scores: check the model and inputs for NaN/inf")
    order = np.argsort(sample_id, kind="stable")
    table = pa.table(
        {
            "sample_id": sample_id[order],
            "label": np.asarray(label, dtype=np.int64)[order],
            score_name: scores[order],
            "keep": np.asarray(keep, dtype=bool)[order],
        },
        schema=schema(score_name),
    )
    convention = SIGN_CONVENTION if score_name == "delta_val_loss" else SELF_INFLUENCE_CONVENTION
    full = {"sign_convention": convention, **meta, "score_column": score_name}
    return table.replace_schema_metadata({META_KEY: json.dumps(full, default=json_default).encode()})


def write_mask(path: str | Path, sample_id: np.ndarray, label: np.ndarray, scores: np.ndarray,
               keep: np.ndarray, meta: dict[str, Any], score_name: str = "delta_val_loss") -> Path:
    """Write the mask atomically; returns its path. ``score_name``: delta_val_loss or self_influence."""
    # flushed to disk: the run deletes its resumable score files right after
    write_table_atomic(mask_table(sample_id, label, scores, keep, meta, score_name), path, fsync=True)
    return Path(path)


def read_mask(path: str | Path) -> Mask:
    """Read a mask written by :func:`write_mask`; raises MaskError if missing or not a mask."""
    p = Path(path)
    if p.is_dir():
        p = p / "mask.parquet"
    if not p.exists():
        raise MaskError(f"mask {p} not found: run `idtl-ray score` first, or give the path of the mask.parquet it wrote")
    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise MaskError(f"mask {p} is not a readable Parquet file ({e}); re-run `idtl-ray score`") from e
    raw = (table.schema.metadata or {}).get(META_KEY)
    score_name = next((c for c in SCORE_COLUMNS if c in table.column_names), None)
    missing = [c for c in schema(score_name or SCORE_COLUMNS[0]).names if c not in table.column_names]
    if score_name is None:  # either score column makes a mask: name both, not the one it was guessed to lack
        missing = [" or ".join(SCORE_COLUMNS) if c == SCORE_COLUMNS[0] else c for c in missing]
    if raw is None or missing:
        raise MaskError(f"{p} is not an idtl-ray mask (missing {missing or 'metadata'}); re-run `idtl-ray score`")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise MaskError(f"{p} has damaged metadata ({e}); re-run `idtl-ray score`") from e
    if not isinstance(meta, dict):
        raise MaskError(f"{p} has damaged metadata (a JSON {type(meta).__name__}, not an object); re-run `idtl-ray score`")
    # the metadata names the score column (a file could hold both); the types must be the schema's:
    # an integer keep column would be read as positions by kept_ids
    if meta.get("score_column") in table.column_names:
        score_name = meta["score_column"]
    want = schema(score_name)
    wrong = [f"{f.name} is {table.schema.field(f.name).type}, not {f.type}" for f in want
             if table.schema.field(f.name).type != f.type]
    if wrong:
        raise MaskError(f"{p} is not an idtl-ray mask ({'; '.join(wrong)}); re-run `idtl-ray score`")
    nulls = [f.name for f in want if table[f.name].null_count]
    if nulls:  # to_numpy would give None or NaN where a mask has a value for every sample
        raise MaskError(f"{p} has missing values in {', '.join(nulls)}; re-run `idtl-ray score`")
    return Mask(
        sample_id=table["sample_id"].to_numpy(),
        label=table["label"].to_numpy(),
        scores=table[score_name].to_numpy(),
        keep=table["keep"].to_numpy(zero_copy_only=False),
        meta=meta,
        score_name=score_name,
    )


def check_mask(mask: Mask, dataset_fingerprint: str, split_fingerprint: str, dataset_name: str = "") -> None:
    """Refuse a mask made for another dataset or validation split."""
    m = mask.meta
    if m.get("dataset_fingerprint") != dataset_fingerprint:
        raise MaskError(
            f"the mask was made for dataset {m.get('dataset')!r} (fingerprint {m.get('dataset_fingerprint')}), "
            f"not for {dataset_name or 'this dataset'} ({dataset_fingerprint}): score this dataset first"
        )
    if m.get("split_fingerprint") != split_fingerprint:
        raise MaskError(
            f"the mask was made for another train/validation split (fingerprint {m.get('split_fingerprint')}, "
            f"this one {split_fingerprint}): use the split.json saved beside the mask, or re-score"
        )
