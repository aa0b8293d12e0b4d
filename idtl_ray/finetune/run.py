"""Stages 3-4 of a run: Ray Data sets and a TorchTrainer, resumed from its checkpoints, with progress on stderr."""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import data as D
from ..errors import InputError
from ..storage import digest, ensure_writable, write_json_atomic
from .config import FinetuneConfig, TrainingError
from .outputs import write_outputs
from .plan import Plan, arch_of, build_finetune_model, make_plan
from .progress import Progress, Relay, emitter


def _check_out_dir(cfg: FinetuneConfig) -> Path:
    out = cfg.out_dir.expanduser().resolve()
    prev = out / "config.json"
    if prev.is_file():
        try:
            old = json.loads(prev.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            old = None
        if not isinstance(old, dict) or not {"strategy", "dataset", "model"} <= old.keys():
            raise InputError(f"{prev} is not the config.json of an idtl-ray run: pass another --out, or move that file")
        diff = sorted(k for k, v in cfg.identity().items() if k in old and old[k] != v)
        if diff:
            raise InputError(f"{out} holds a run with another config (differs in {', '.join(diff)}); "
                             f"pass another --out or delete that directory")  # fmt: skip
    return out


def check_local_resources(cfg: FinetuneConfig, driver_cpus: float = 0.0) -> None:
    """Refuse up front what would otherwise hang on the embedded local Ray: workers that can never be
    scheduled. A cluster is never refused for what it has now: it scales up for the request.
    ``driver_cpus``: what the run's own driver holds beside its workers (a sweep trial's 0.5)."""
    import ray

    from ..resources import joined_cluster

    if joined_cluster():
        return
    res = ray.cluster_resources()
    need_cpu = cfg.workers * cfg.cpus_per_worker + driver_cpus
    if need_cpu > res.get("CPU", 0.0):
        extra = f" + {driver_cpus:g} for the trial's driver" if driver_cpus else ""
        raise InputError(f"{cfg.workers} workers x {cfg.cpus_per_worker:g} CPUs{extra} need {need_cpu:g} CPUs but the "
                         f"local Ray has {res.get('CPU', 0.0):g}; lower --workers or --cpus-per-worker (e.g. 0.5)")  # fmt: skip
    need_gpu = cfg.workers * cfg.gpus_per_worker
    if need_gpu > res.get("GPU", 0.0):
        raise InputError(f"{cfg.workers} workers x {cfg.gpus_per_worker:g} GPUs need {need_gpu:g} GPUs but the local Ray "
                         f"has {res.get('GPU', 0.0):g}; pass --gpus 0 or join a GPU cluster with --address")  # fmt: skip


def _finished_run(cfg: FinetuneConfig, out: Path, plan: Plan, emit: Progress | None) -> tuple[str, dict[str, Any] | None]:
    """The digest of the training ids, and the saved result when ``out`` already holds this run, finished.

    The config names the mask by its path; what it keeps can change (a re-scored mask). A run trained
    on other samples must not be resumed or returned as if it were this one.
    """
    ids_sha = digest(np.asarray(plan.train_ids, dtype=np.int64))  # in plan order (unlike ids_hash)
    prev = out / "config.json"
    if prev.is_file():
        old_sha = json.loads(prev.read_text(encoding="utf-8")).get("train_ids_sha")
        if old_sha is not None and old_sha != ids_sha:
            raise InputError(f"{out} holds a run trained on other samples (the mask changed since; it now keeps "
                             f"{len(plan.train_ids)}): choose another --out, or remove that directory to retrain")
    final_path = out / "final.json"
    if final_path.is_file():
        final = json.loads(final_path.read_text(encoding="utf-8"))
        if final.get("epochs") == cfg.epochs and (out / "model.pt").is_file():
            if emit:
                emit(f"{out} already holds the finished run ({cfg.epochs} epochs): nothing to train")
            return ids_sha, final
    return ids_sha, None


def _newest_checkpoint(out: Path, name: str) -> tuple[Path | None, list[dict[str, Any]]]:
    """The newest checkpoint of run ``name`` that reads whole, and its history (every trained epoch with
    its learning rate); ``(None, [])`` when there is none. One cut short is skipped, as Ray Train skips it."""
    for ckpt in sorted((out / "ray" / name).glob("checkpoint_epoch=*"), reverse=True):
        try:
            # mmap: only the history is needed here, not the model and optimizer tensors read into memory
            history = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True, mmap=True)["history"]
            np.load(ckpt / "seen_ids.npy", mmap_mode="r")
        except (OSError, RuntimeError, KeyError, EOFError, ValueError):
            continue
        return ckpt, list(history)
    return None, []


def _check_epochs(cfg: FinetuneConfig, out: Path, history: list[dict[str, Any]]) -> None:
    """A rerun may continue a run to more epochs; it may not shorten it, nor re-time the learning rate of
    epochs already trained (the x0.1 drop sits at ``lr_drop_at * epochs``, so ``--epochs`` moves it)."""
    from .worker import lr_at

    done = len(history)
    if done > cfg.epochs:
        raise InputError(f"{out} holds a run trained for {done} epochs; --epochs {cfg.epochs} is fewer: pass "
                         f"--epochs {done} (or more, to continue it), or another --out")
    moved = [row for row in history if not np.isclose(row["lr"], lr_at(cfg, row["epoch"]))]
    if moved:
        e = moved[0]["epoch"]
        raise InputError(f"{out} holds {done} epochs trained on another learning-rate schedule: epoch {e} ran at lr "
                         f"{moved[0]['lr']:g}, and --epochs {cfg.epochs} would run it at {lr_at(cfg, e):g} (the x0.1 "
                         "drop comes at --lr-drop-at x --epochs). Train the new length in another --out")


def _trainer(cfg: FinetuneConfig, out: Path, plan: Plan, model: nn.Module, name: str, callbacks: list[Any]) -> Any:
    """The TorchTrainer of a run: the samples as Ray Datasets (read now), the model once in the object store."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from .data import exact_split_config, train_datasets
    from .worker import train_worker

    datasets = train_datasets(plan.data, plan.train_ids, plan.val, cfg.workers, seed=cfg.seed)
    loop_config = {
        "cfg": replace(cfg, out=str(out)).to_dict(),  # absolute: Ray Train changes the workers' cwd
        "init_model": ray.put(model),  # once in the object store instead of once per worker config
        "augment": D.batch_augmentation(cfg.dataset) if cfg.augment else None,  # applied on the worker's device
        "eval_sets": sorted(set(datasets) - {"train"}),
        "mean": plan.data.mean,
        "std": plan.data.std,
        "n_train": int(len(plan.train_ids)),
    }
    resources: dict[str, float] = {"CPU": cfg.cpus_per_worker}
    if cfg.gpus_per_worker > 0:
        resources["GPU"] = cfg.gpus_per_worker
    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0,
                                               resources_per_worker=resources),  # fmt: skip
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(out / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None,
        ),
        datasets=datasets,
        dataset_config=exact_split_config(),
    )


def _fit(trainer: Any, name: str, out: Path, relay: Relay | None) -> tuple[dict[str, Any], np.ndarray]:
    """Run the trainer; the final checkpoint's state and the sample ids seen in epoch 0, or one-line errors."""
    try:
        with relay or nullcontext():
            result = trainer.fit()
    except Exception as e:  # V2 raises TrainingFailedError (wrapping the worker's error) after retries
        raise TrainingError(f"training run {name} failed ({type(e).__name__}: {_first_line(e)}); "
                            f"fix the cause and run the same command again to resume from the last checkpoint") from e
    if getattr(result, "error", None) is not None:
        raise TrainingError(f"training run {name} failed ({_first_line(result.error)}); rerun the same command to resume")
    if result.checkpoint is None:
        raise TrainingError(f"training run {name} reported no checkpoint; delete {out / 'ray'} and run again")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
        seen = np.load(Path(d) / "seen_ids.npy")
    return state, seen


def run_finetune(cfg: FinetuneConfig, *, callbacks: list[Any] | None = None, run_name: str | None = None,
                 progress: bool | Progress = False, claim: bool = True, prepared: str | None = None) -> dict[str, Any]:
    """Train one strategy with Ray Train and write the run directory; returns the ``final.json`` dict.

    Running it again with the same ``out`` and config resumes: a finished run returns its saved
    results at once, an interrupted one continues from its last checkpoint. ``callbacks`` (Ray Train
    ``UserCallback``s, e.g. Tune's ``TuneReportCallback``) and ``run_name`` are for :mod:`idtl_ray.sweep`.
    ``progress``: ``True`` prints a line per epoch on stderr (loss, validation accuracy, test error,
    elapsed time), a callable receives those lines instead; off by default (Tune trials, tests).
    The images never enter this process: Ray Data reads them into the object store for the workers.
    On a cluster (``--address``, ``RAY_ADDRESS``) the paths workers use must be shared storage, and the
    workers' resources are asked of the autoscaler at start (``claim``; a sweep asks for its trials).
    ``prepared``: where ``cfg.dataset`` is prepared already (a sweep's trials: their driver prepared it).
    """
    from ..resources import claim_cluster, release

    out = _check_out_dir(cfg)
    claimed = claim and claim_cluster(cfg.address, out, cfg.dataset, cfg.bundles)
    try:
        return _run(cfg, out, callbacks, run_name, emitter(progress), check=claim, prepared=prepared)
    finally:
        if claimed:
            release()


def _run(cfg: FinetuneConfig, out: Path, callbacks: list[Any] | None, run_name: str | None,
         emit: Progress | None, check: bool = True, prepared: str | None = None) -> dict[str, Any]:  # fmt: skip
    """:func:`run_finetune` once the cluster is claimed. ``check``: refuse what the local Ray cannot place
    (a sweep's trial does not: its driver checked, and inside a trial a joined cluster looks local)."""
    plan = make_plan(cfg, say=emit, prepared=prepared)
    ids_sha, final = _finished_run(cfg, out, plan, emit)
    if final is not None:
        return final
    name = run_name or cfg.run_name()
    ckpt, history = _newest_checkpoint(out, name)
    _check_epochs(cfg, out, history)
    model, info = build_finetune_model(cfg, *arch_of(plan.data), data=plan.data)
    ensure_writable(out / "config.json")  # one line naming --out, not an OSError traceback
    write_json_atomic({**cfg.to_dict(), "train_ids_sha": ids_sha}, out / "config.json")
    if ckpt is not None and len(history) == cfg.epochs:
        # trained to the end, its outputs lost (final.json or model.pt removed, or a write failed): write them
        # again from the checkpoint. Starting Ray Train to re-report it would make Ray's checkpoint manager
        # count that directory twice and, on the next such rerun, delete it as the oldest of num_to_keep.
        if emit:
            emit(f"{out} holds all {cfg.epochs} epochs in {ckpt.name}: writing the run's outputs again")
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        return write_outputs(cfg, plan, out, model, state, np.load(ckpt / "seen_ids.npy"), info, name)
    (out / "final.json").unlink(missing_ok=True)  # a shorter run's result: it no longer describes this directory
    from ..scoring import ensure_ray

    ensure_ray(cfg.address)
    if check:
        check_local_resources(cfg)
    relay = Relay(emit, cfg.epochs) if emit else None
    if emit:
        emit(f"training {cfg.model} on {len(plan.train_ids)} samples of {cfg.dataset} for {cfg.epochs} epoch"
             f"{'s' if cfg.epochs > 1 else ''} on {cfg.workers} Ray Train worker{'s' if cfg.workers > 1 else ''}")
    trainer = _trainer(cfg, out, plan, model, name, [*(callbacks or []), *([relay.callback] if relay else [])])
    state, seen = _fit(trainer, name, out, relay)
    model.load_state_dict(state["model"])
    return write_outputs(cfg, plan, out, model, state, seen, info, name)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:200] if s else type(e).__name__
