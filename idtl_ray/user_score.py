"""`score` for a user's own ``nn.Module`` and map-style datasets: gathered into arrays, then scored on Ray
exactly like :func:`idtl_ray.workflow.run_score`, with an optional Parquet mask."""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import __version__
from .errors import InputError
from .influence import InfluenceConfig, ParamSpec
from .influence.inputs import label_tensor
from .mask import write_mask
from .scoring import ArraySet, PipelineResult, ScoreOutput, ensure_ray, hold_directory, run_fingerprint, run_pipeline
from .selection import budget_count, harm_of, keep_least_harmful, keep_mask
from .storage import digest, ensure_writable
from .workflow import model_fingerprint, score_column


def _materialise(ds: Dataset, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for xb, yb in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0):
        xs.append(torch.as_tensor(xb).numpy())
        ys.append(label_tensor(yb).long().numpy())  # float or bool labels are refused, not truncated
    if not xs:
        return np.zeros((0,)), np.zeros((0,), np.int64)
    return np.concatenate(xs), np.concatenate(ys)


def score(
    model: nn.Module,
    train: Dataset,
    val: Dataset | None = None,
    *,
    config: InfluenceConfig | None = None,
    classes: Sequence[int] | None = None,
    params: ParamSpec = None,
    actors: int | None = None,
    out: str | Path | None = None,
    drop_threshold: float = 0.0,
    drop_budget: int | float | None = None,
    address: str | None = None,
    resume: bool = False,
    shard_size: int = 1024,
    progress: bool = False,
) -> ScoreOutput:
    """Score a user's own model and map-style datasets of ``(input, label)`` on Ray.

    The inputs are gathered into arrays, shipped to Ray Data and scored exactly like
    :func:`run_score`; the result matches :func:`idtl_ray.score_samples` run in-process. With ``out``,
    a mask is written to ``out/mask.parquet`` (sample ids = positions in ``train``). ``val`` is the
    paper's validation reference; self-influence (the default) uses none, and ignores one given.

    Drop rule: with ``config.score == "paper"`` the paper's (``delta_val_loss < drop_threshold``, at most
    ``drop_budget``); with self-influence (the default) exactly ``drop_budget`` samples (default 0.1),
    the highest first. ``drop_budget``: a fraction below 1 or a whole count >= 1.
    """
    from .influence import check_pairs

    config = config or InfluenceConfig()
    if classes and config.score != "paper":
        raise InputError("classes picks the validation samples the paper's score measures against; self-influence "
                         "(the default) uses no validation set: pass config=InfluenceConfig(score='paper')")
    if drop_budget is not None:
        budget_count(drop_budget, 1)  # a bad budget fails now, not after the scoring
    if not math.isfinite(drop_threshold):
        raise InputError(f"drop_threshold must be a finite number, got {drop_threshold}")
    if drop_threshold != 0.0 and config.score != "paper":
        raise InputError("drop_threshold is the paper's rule (delta_val_loss < threshold); self-influence (the default) "
                         "drops exactly drop_budget samples: pass drop_budget, or config=InfluenceConfig(score='paper')")
    paper = config.score == "paper"
    if paper and val is None:
        raise InputError("the paper's score measures each sample against a validation set: pass val")
    check_pairs(train, "train")  # dict items etc.: one clear error, not the DataLoader's TypeError
    tx, ty = _materialise(train, config.batch_size)
    if paper:
        check_pairs(val, "val")
        vx, vy = _materialise(val, config.batch_size)
    else:  # self-influence needs no validation set: none is read, and none changes the run's fingerprint
        vx, vy = np.zeros((0,) + tx.shape[1:], tx.dtype), np.zeros(0, np.int64)
    if len(ty) == 0:
        raise InputError("the training set is empty: give at least one training sample")
    if paper and len(vy) == 0:
        raise InputError("the validation set is empty: pass a validation set with at least one sample")
    if config.score != "paper" and budget_count(0.1 if drop_budget is None else drop_budget, len(ty)) >= len(ty):
        raise InputError(f"drop_budget {drop_budget} would drop all {len(ty)} training samples: pass a smaller count "
                         "or a fraction below 1 (e.g. 0.1)")
    ids = np.arange(len(ty), dtype=np.int64)
    data_fp, split_fp = digest(tx, ty), digest(vx, vy)
    mfp = model_fingerprint(model)
    fp = run_fingerprint({"data": data_fp, "val": split_fp, "model": mfp, "influence": asdict(config),
                          "classes": list(classes) if classes else None, "params": str(params), "shard": shard_size})
    mask_path = ensure_writable(Path(out) / "mask.parquet") if out is not None else None
    ensure_ray(address)
    with hold_directory(out) if out is not None else contextlib.nullcontext():  # until the mask is written
        result: PipelineResult = run_pipeline(
            model, ArraySet(tx, ty, ids), ArraySet(vx, vy, np.arange(len(vy))), config, classes=classes, params=params,
            actors=actors, work_dir=out, resume=resume, shard_size=shard_size, fingerprint=fp, progress=progress,
        )
        return _finish_user_score(result, model, ty, ids, config, classes, drop_threshold, drop_budget, mask_path,
                                  {"data": data_fp, "split": split_fp, "model": mfp})


def _finish_user_score(result: PipelineResult, model: nn.Module, ty: np.ndarray, ids: np.ndarray,
                       config: InfluenceConfig, classes: Sequence[int] | None, drop_threshold: float,
                       drop_budget: int | float | None, mask_path: Path | None, fps: dict[str, str]) -> ScoreOutput:
    """:func:`score`'s drop rule and mask (``fps``: the data, split and model fingerprints)."""
    data_fp, split_fp, mfp = fps["data"], fps["split"], fps["model"]
    if config.score == "paper":  # the paper's rule, optionally capped
        keep = keep_mask(result.scores, drop_threshold, drop_budget)
        rule = {"rule": "paper", "threshold": drop_threshold, "budget": drop_budget}
    else:  # self-influence: drop a budget (default 10%), highest first
        b = 0.1 if drop_budget is None else drop_budget
        keep = keep_least_harmful(harm_of(result.scores, "self"), budget_count(b, len(ty)))
        rule = {"rule": "budget", "budget": b}
    if mask_path is not None:
        meta = {"dataset": "user", "dataset_fingerprint": data_fp, "split_fingerprint": split_fp,
                "model": type(model).__name__, "model_fingerprint": mfp, "influence": asdict(config),
                "solve": result.solve.as_dict(), "validation_reference": {"classes": list(classes) if classes else "all",
                                                                          "n_samples": result.n_val},
                "score": config.score, "drop_rule": rule, "n_train": len(ty),
                "n_dropped": int((~keep).sum()), "timings": result.timings, "idtl_ray_version": __version__}
        write_mask(mask_path, ids, ty, result.scores, keep, meta, score_column(config.score))
        shutil.rmtree(mask_path.parent / "parts", ignore_errors=True)
    return ScoreOutput(result.scores, keep, result.solve, result.timings, mask_path)
