"""The `score` stage end to end: data → adapted model → Ray pipeline → Parquet mask (+ summary).

Two entry points:
  - :func:`run_score` for registry datasets and models (what `idtl-ray score` runs);
  - :func:`~idtl_ray.user_score.score` for a user's own ``nn.Module`` and map-style datasets (also
    importable from here and as ``idtl_ray.score``).

Output directory (``ScoreConfig.out_dir``)::

    mask.parquet   one row per training sample (see idtl_ray.mask)
    split.json     the train/validation split every later stage reuses
    model.pt       the adapted model that was scored (new head fitted when classes differ)
    summary.json   settings, solver convergence, counts per class, time per stage
    parts/         s and the written scores of an unfinished run (what --resume continues from)
    .idtl-lock     held by the run that owns the directory
"""

from __future__ import annotations

import datetime as _dt
import functools
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from . import __version__
from .adapt import adapt_model, fit_new_head, prepare_model
from .config import ScoreConfig
from .errors import IdtlError, InputError
from .head import fit_head
from .mask import write_mask
from .scoring import PipelineResult, Preprocess, ensure_ray, hold_directory, run_fingerprint, run_pipeline
from .scoring.parts import LOCK_NAME
from .selection import budget_count, harm_of, keep_least_harmful, keep_mask
from .storage import digest, ensure_writable, write_json_atomic
from .summary import format_summary, inspect_mask


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the model's state (parameters and buffers): identifies exactly what was scored."""
    return digest(*(c for k, v in sorted(model.state_dict().items()) for c in (k, v.detach().cpu().numpy())))


# ── the new head (design.md §2: a linear probe puts the adapted model near a target optimum) ──────


def fit_head_on_worker(model: nn.Module, x: Any, y: np.ndarray, preprocess: Preprocess, steps: int = 30,
                       seed: int = 0, gpu: bool | None = None) -> dict[str, float]:
    """:func:`fit_head` as one Ray task, on a GPU when ``gpu`` (None: when the cluster has one); the fitted
    head is loaded here. ``x``: images or :class:`~idtl_ray.data.samples.RaySamples`."""
    from .head import fit_head_task
    from .models import head_module
    from .scoring.prescore import run_on_worker

    state, info = run_on_worker(fit_head_task, (model, x, y, preprocess, steps, seed), name="idtl-fit-head", say=_log,
                                what=f"fitting the new head on {len(y)} samples", gpu=gpu)
    head_module(model).load_state_dict(state)
    return info


# ── run_score: registry datasets ─────────────────────────────────────────────────────────────────


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_score(cfg: ScoreConfig, *, progress: bool = True, on_progress: Any = None) -> dict[str, Any]:
    """Score a registry dataset with a registry model and write the mask; returns the summary dict.

    The run holds ``cfg.out_dir`` (a second run into it refuses); an ``--out`` this run created is
    removed again when the run fails before writing anything into it.
    """
    from .resources import release

    out = Path(cfg.out_dir)
    created = not out.exists()
    ensure_writable(out / "mask.parquet")  # fail before any expensive work
    with hold_directory(out):
        try:  # the claim inside: a refusal (another run holds out, storage not shared) withdraws it too
            _claim_cluster(cfg, out)
            return _run_score(cfg, out, progress, on_progress)
        except BaseException:  # cleaned while still held: never a directory another run has just taken
            if created and out.exists() and {p.name for p in out.iterdir()} <= {LOCK_NAME}:
                shutil.rmtree(out, ignore_errors=True)
            raise
        finally:
            release()


def _claim_cluster(cfg: ScoreConfig, out: Path) -> None:
    """On a cluster: join it, check shared storage and ask for the scoring pool now (resources.claim_cluster)."""
    from .resources import claim_cluster
    from .scoring.pipeline import pool_bundles, scoring_pool

    claim_cluster(cfg.address, out, cfg.dataset, lambda: pool_bundles(scoring_pool(cfg.actors, cfg.gpus, cfg.cpus)))


def _model_args(cfg: ScoreConfig) -> list[Any]:
    """What decides the scored model besides the weights and the split (checked when a run resumes)."""
    return [cfg.model, cfg.head, cfg.head_steps, cfg.image_size, cfg.seed]


# Settings that do not change the scores or the mask: a finished run is returned whatever they are.
_NOT_IN_RESULT = {"resume", "address", "actors", "gpus", "cpus", "out", "data_dir"}


def _finished_summary(cfg: ScoreConfig, out: Path) -> dict[str, Any] | None:
    """The summary of a finished run in ``out`` made with these settings (``--resume`` returns it as is);
    one made with other settings is refused, as an unfinished one is."""
    import json

    mask_path, summary_path = out / "mask.parquet", out / "summary.json"
    if not (mask_path.exists() and summary_path.exists()) or (out / "parts").exists():
        return None
    summary = json.loads(summary_path.read_text())
    old = {k: v for k, v in summary.get("config", {}).items() if k not in _NOT_IN_RESULT}
    new = {k: v for k, v in json.loads(json.dumps(cfg.to_dict(), default=str)).items() if k not in _NOT_IN_RESULT}
    if old != new:
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise InputError(f"cannot resume: {out} holds a finished run with other settings ({', '.join(changed)}); "
                         "drop --resume to score again, or choose another --out")
    return summary


def _run_score(cfg: ScoreConfig, out: Path, progress: bool, on_progress: Any) -> dict[str, Any]:
    """run_score's stages: target data → scored model → Ray pipeline → drop rule → mask and summary."""
    t_start = time.perf_counter()
    mask_path = out / "mask.parquet"
    if cfg.resume and (summary := _finished_summary(cfg, out)) is not None:
        _log(f"{mask_path} is complete; nothing to resume")
        return summary
    timings: dict[str, float] = {}
    t = time.perf_counter()
    data, split, train, val, train_ids = _load_target(cfg, out)
    preprocess = Preprocess(data.mean, data.std)
    t_model = time.perf_counter()
    model, model_info, fitted = _adapted_model(cfg, out, split, data)  # weights errors surface before Ray starts
    t_model = time.perf_counter() - t_model
    ensure_ray(cfg.address)  # from here on every stage runs on Ray workers, reading the images from Ray Data
    train, val = _ray_samples(cfg, data, split, train, val, train_ids)
    timings["load_data_s"] = time.perf_counter() - t - t_model
    t = time.perf_counter()
    if not fitted:  # a new head is fitted on a worker (a GPU one with --gpus, or on a GPU cluster)
        fit_new_head(model, model_info, train, train.y, preprocess, cfg,
                     fit=functools.partial(fit_head_on_worker, gpu=True if cfg.gpus else None))
    _save_scored_model(cfg, out, model, model_info, data, split)
    timings["prepare_model_s"] = time.perf_counter() - t + t_model
    mfp = model_fingerprint(model)
    fingerprint = run_fingerprint({
        "dataset": data.fingerprint(), "split": split.fingerprint(), "model": mfp,
        "influence": asdict(cfg.influence), "classes": cfg.target_classes, "params": cfg.params,
        "shard_size": cfg.shard_size, "val_half": cfg.drop == "auto" and cfg.influence.score == "paper",
    })
    val_ref, val_pick = _validation_parts(cfg, val)
    if cfg.influence.score == "self":
        _log(f"scoring {len(train)} training samples of {data.name} by self-influence "
             f"(head {cfg.influence.head_params}, EK-FAC, damping {cfg.influence.head_damping} x mean eigenvalue)")
    else:
        _log(f"scoring {len(train)} training samples of {data.name} against {len(val_ref.y)} validation samples "
             f"({cfg.influence.solver}, {cfg.influence.curvature}, damping {cfg.influence.damping})")
    result = run_pipeline(
        model, train, val_ref, cfg.influence,
        preprocess=preprocess, classes=cfg.target_classes, params=cfg.params, actors=cfg.actors, gpus=cfg.gpus,
        cpus=cfg.cpus, work_dir=out,
        resume=cfg.resume, shard_size=cfg.shard_size, fingerprint=fingerprint, progress=progress,
        on_progress=on_progress,
    )
    timings.update(result.timings)
    t = time.perf_counter()
    keep, drop_info = decide_keep(cfg, result.scores, model, train, train.y, val_pick, data, out, progress)
    timings["drop_rule_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    meta = _mask_meta(cfg, data, split, (len(train), len(val)), mfp, model_info, result, drop_info, keep, timings)
    write_mask(mask_path, train_ids, train.y, result.scores, keep, meta, score_column(cfg.influence.score))
    summary = {**meta, "mask": str(mask_path), "per_class": _per_class(train.y, keep, data.classes)}
    write_json_atomic(summary, out / "summary.json")
    shutil.rmtree(out / "parts", ignore_errors=True)  # the mask now holds everything
    return summary


def _load_target(cfg: ScoreConfig, out: Path) -> tuple[Any, Any, Any, Any, np.ndarray]:
    """(data, split, train, val, train_ids) with labels only: the images stay on storage.

    A dataset given by name is prepared into the cache first (:mod:`idtl_ray.data.cache`). The split
    of a resumed run is reused when it still fits. Everything that needs the data's size is checked
    here, before the head fit and Ray start.
    """
    from .data import Split, apply_split, make_split
    from .data.cache import ensure_prepared
    from .data.samples import open_target, split_note

    data = open_target(ensure_prepared(cfg.dataset, cfg.data_dir, cfg.image_size, say=_log))
    if cfg.target_classes:
        bad = [c for c in cfg.target_classes if not 0 <= c < data.num_classes]
        if bad:
            raise InputError(f"--target-class {bad} is outside {data.name}'s classes 0..{data.num_classes - 1}")
    split_path = out / "split.json"
    split = Split.load(split_path) if split_path.exists() and cfg.resume else None
    if split is not None:
        _check_resumed_split(cfg, split, data, out)
    else:
        split = make_split(data, cfg.val_fraction, cfg.seed)
        if (note := split_note(data, cfg.val_fraction, cfg.seed)) is not None:
            _log(note)
    train, val, train_ids = apply_split(data, split)
    _check_budgets_fit(cfg, len(train.y))
    if len(np.unique(train.y)) < 2:
        raise InputError(f"{data.name}'s training split holds a single class ({data.classes[int(train.y[0])]!r}): "
                         "influence scores need at least two; check the dataset")
    return data, split, train, val, train_ids


def _check_resumed_split(cfg: ScoreConfig, split: Any, data: Any, out: Path) -> None:
    """A resumed run continues on its own split: same dataset, --seed and --val-fraction, or one line."""
    old = []
    if split.dataset_fingerprint != data.fingerprint():
        old.append("another dataset")
    if split.seed != cfg.seed:
        old.append(f"--seed {split.seed}")
    if split.val_source == "split" and split.val_fraction != cfg.val_fraction:
        old.append(f"--val-fraction {split.val_fraction}")
    if old:
        raise InputError(f"cannot resume: {out} was scored on the split of {', '.join(old)}; pass the same settings, "
                         "or drop --resume to score again")


def _ray_samples(cfg: ScoreConfig, data: Any, split: Any, train: Any, val: Any, train_ids: np.ndarray) -> tuple[Any, Any]:
    """The training and validation samples as :class:`RaySamples`: the images are read and decoded by
    Ray Data on CPU workers, once, into the object store, in blocks sized for the scoring pool."""
    from .data.samples import RaySamples, read_samples
    from .scoring.pipeline import block_rows, scoring_pool

    rows = block_rows(len(train_ids), scoring_pool(cfg.actors, cfg.gpus, cfg.cpus), cfg.influence.batch_size,
                      data.image_shape[0])
    ds = read_samples(data, "train", min(rows, cfg.shard_size))
    train_rs = RaySamples(ds, train_ids, train.y, data.image_shape)
    if split.val_source == "split":
        return train_rs, RaySamples(ds, split.val_ids, val.y, data.image_shape)
    return train_rs, RaySamples(read_samples(data, "val", rows), np.arange(len(val.y)), val.y, data.image_shape)


def _adapted_model(cfg: ScoreConfig, out: Path, split: Any, data: Any) -> tuple[nn.Module, dict[str, Any], bool]:
    """(model, model_info, fitted): the model a resumed run saved in ``model.pt`` with the same
    settings (fitted), else the weights loaded and the head decided, a new head still to be fitted."""
    from .models import load_checkpoint

    model_path = out / "model.pt"
    if cfg.resume and model_path.exists():
        model, meta = load_checkpoint(model_path)
        if (meta.get("split_fingerprint"), meta.get("weights_arg"), meta.get("model_args")) == (
                split.fingerprint(), cfg.weights, _model_args(cfg)):
            return model, meta.get("model_info", {}), True
        if (out / "parts").exists():  # scores were written with that model: refitting could only end in a refusal
            raise InputError(f"cannot resume: {out} was scored with another model (--weights {meta.get('weights_arg')}, "
                             "or another --model/--head/--head-steps/--image-size/--seed); pass the same settings, or "
                             "drop --resume to score again")
    model, model_info = adapt_model(cfg, data)
    return model, model_info, False


def _save_scored_model(cfg: ScoreConfig, out: Path, model: nn.Module, model_info: dict[str, Any], data: Any,
                       split: Any) -> None:
    """The scored model and the split, saved before the long part so that a resumed run reuses both.

    A fresh run removes an older run's mask and summary first: the directory never pairs them with this
    run's split and model (an interrupted run leaves no result rather than another run's).
    """
    from .models import save_checkpoint

    if not cfg.resume:
        for name in ("mask.parquet", "summary.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "auto-budget", ignore_errors=True)  # an older run's Ray Tune experiment

    split.save(out / "split.json")
    save_checkpoint(out / "model.pt", model, {"dataset": data.name, "classes": list(data.classes), "dataset_fingerprint": data.fingerprint(),
                                              "split_fingerprint": split.fingerprint(), "weights_arg": cfg.weights,
                                              "model_args": _model_args(cfg), "model_info": model_info})


def _mask_meta(cfg: ScoreConfig, data: Any, split: Any, sizes: tuple[int, int], mfp: str, model_info: dict[str, Any],
               result: PipelineResult, drop_info: dict[str, Any], keep: np.ndarray,
               timings: dict[str, float]) -> dict[str, Any]:
    """What the mask and summary.json record about a run (``sizes``: training and validation samples)."""
    n_train, n_val = sizes
    return {
        "dataset": data.name,
        "dataset_fingerprint": data.fingerprint(),
        "split_fingerprint": split.fingerprint(),
        "split": {"file": "split.json", "val_source": split.val_source, "val_fraction": split.val_fraction,
                  "seed": split.seed, "n_train": n_train, "n_val": n_val},
        "model": cfg.model,
        "model_fingerprint": mfp,
        **model_info,
        "influence": asdict(cfg.influence),
        "params": cfg.params,
        "solve": result.solve.as_dict(),
        "validation_reference": {"classes": cfg.target_classes or "all", "n_samples": result.n_val},
        "score": cfg.influence.score,
        "drop_rule": drop_info,
        "n_train": n_train,
        "n_dropped": int((~keep).sum()),
        "actors": result.actors,
        "device": result.device,
        "shards_reused": result.shards_reused,
        "samples_scored": result.samples_scored,
        "timings": timings,
        "config": cfg.to_dict(),
        "idtl_ray_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _check_budgets_fit(cfg: ScoreConfig, n_train: int) -> None:
    """A count budget must leave something to train on: refused here, before the head fit and Ray start.
    (Under --drop paper the budget is a cap on the paper's rule, and a cap above n is simply no cap.)"""
    budgets = ([cfg.drop_budget] if cfg.drop == "budget" and cfg.drop_budget is not None else []) + (
        list(cfg.auto_budgets or []) if cfg.drop == "auto" else [])
    for b in budgets:
        if b >= 1 and int(b) >= n_train:
            flag = "--auto-budget" if cfg.drop == "auto" else "--drop-budget"
            raise InputError(f"{flag} {int(b)} would drop all {n_train} training samples: pass a smaller count "
                             "or a fraction below 1 (e.g. 0.1)")


def score_column(score: str) -> str:
    """The mask column a score kind is written to."""
    return "self_influence" if score == "self" else "delta_val_loss"


def _validation_parts(cfg: ScoreConfig, val: Any) -> tuple[Any, Any]:
    """(reference for g_val, part the auto budget is chosen on).

    Self-influence never reads the validation split, so --drop auto may use all of it. The paper's score
    sums over it, so with --drop auto it gets a seeded half and the budget is chosen on the other half.
    """
    if cfg.drop != "auto" or cfg.influence.score == "self":
        return val, val
    if len(val.y) < 4:
        raise InputError(f"--drop auto with --score paper splits the validation set in two; {len(val.y)} samples "
                         "are too few: use a larger --val-fraction or --drop budget")
    order = np.random.default_rng(cfg.seed).permutation(len(val.y))
    return val.take(np.sort(order[: len(order) // 2])), val.take(np.sort(order[len(order) // 2:]))


def decide_keep(cfg: ScoreConfig, scores: np.ndarray, model: nn.Module, x: Any, y: np.ndarray,
                val_pick: Any, data: Any, out: Path, progress: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """Apply ``cfg.drop`` to the scores: the keep mask and what the rule did (for the metadata)."""
    from .budget import TrainRecipe, choose_budget
    from .data import augmentation
    from .errors import DataError

    if cfg.drop == "paper":
        return keep_mask(scores, cfg.drop_threshold, cfg.drop_budget), {
            "rule": "paper", "threshold": cfg.drop_threshold, "budget": cfg.drop_budget}
    harm = harm_of(scores, cfg.influence.score)
    if cfg.drop == "budget":
        b = 0.1 if cfg.drop_budget is None else cfg.drop_budget
        return keep_least_harmful(harm, budget_count(b, len(harm))), {"rule": "budget", "budget": b}
    try:
        augment = augmentation(data.name)
    except DataError:
        augment = None
    import ray

    gpus = 1.0 if cfg.gpus or ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    shutil.rmtree(out / "auto-budget", ignore_errors=True)  # one experiment there: this run's (Tune dates each one)
    choice = choose_budget(model, x, y, harm, val_pick, val_pick.y, data.mean, data.std,
                           candidates=cfg.auto_budgets, recipe=TrainRecipe(epochs=cfg.auto_epochs), augment=augment,
                           seed=cfg.seed, gpus_per_trial=gpus, storage=str((out / "auto-budget").resolve()),
                           progress=_log if progress else None)
    return keep_least_harmful(harm, choice.k), {"rule": "auto", **choice.as_dict(), "n_val": int(len(val_pick.y))}


def _per_class(y: np.ndarray, keep: np.ndarray, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    for c in np.unique(y):
        sel = y == c
        rows.append({"label": int(c), "name": (names[int(c)] if names and int(c) < len(names) else str(int(c))),
                     "kept": int((keep & sel).sum()), "dropped": int((~keep & sel).sum())})
    return rows


def __getattr__(name: str) -> Any:
    """``score`` (a user's own module and datasets) lives in :mod:`idtl_ray.user_score`, which imports this
    module; it is found here too, loaded on first use."""
    if name == "score":
        from .user_score import score

        return score
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["IdtlError", "fit_head", "format_summary", "inspect_mask", "prepare_model", "run_score", "score"]
