"""Sweep the number of frozen layers with Ray Tune (paper Table 3), one Ray Train run per trial.

Pattern (ray-2.60-notes §3): each Tune trial is a plain driver function that builds and fits a
TorchTrainer (through :func:`idtl_ray.finetune.run_finetune`); ``TuneReportCallback`` forwards every
epoch's report to Tune, and the Train run is named after the trial id so a restarted trial resumes
its own run. Every trial writes a normal fine-tuning run directory ``<out>/frozen-<N>/``.

Fault tolerance and reruns: the Tune experiment lives under ``<out>/ray/sweep-<digest>/`` (``out`` made
absolute; on a cluster it must be shared storage, as the Train checkpoints under it are). A failed trial
is retried (``FailureConfig``), and since it keeps its trial id its Train run continues from its last
checkpoint. Running the same sweep into the same ``out`` again restores that experiment
(``Tuner.restore``): finished trials are not run again, and unfinished or failed ones resume, their
Train runs from their last checkpoints, never from epoch 0.

Results: a table (frozen, test_error, val_acc, status, error) printed and saved as ``sweep.md`` and
``sweep.csv``. A failed trial stays in the table with its error; it is never dropped.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from . import models as M
from .errors import InputError
from .finetune import FinetuneConfig, run_finetune
from .storage import ensure_writable, json_digest, local_out_path, write_json_atomic, write_text_atomic

COLUMNS = ["frozen", "test_error", "val_acc", "status", "error"]


def check_frozen(base: FinetuneConfig, frozen: list[int]) -> list[int]:
    """Validate the frozen-layer counts against the model's layer count before any trial starts."""
    if not frozen:
        raise InputError("give at least one frozen-layer count, e.g. --frozen 20 30 40")
    if base.freeze_conv:
        raise InputError("--freeze-conv fixes the frozen layers; drop it to sweep --frozen")
    if len(set(frozen)) != len(frozen):
        raise InputError(f"frozen-layer counts repeat ({frozen}); give each count once")
    n = M.LAYER_COUNTS[base.model]
    bad = [f for f in frozen if not 0 <= f < n]
    if bad:
        raise InputError(f"{base.model} has {n} layers: cannot freeze {bad}; use counts in 0..{n - 1} "
                         f"(freezing every layer leaves nothing to train)")  # fmt: skip
    return [int(f) for f in frozen]


def _trial(config: dict[str, Any], base: dict[str, Any], out: str, prepared: str | None = None) -> None:
    """Tune trial (driver function): fine-tune with ``config["freeze"]`` frozen layers."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    n = int(config["freeze"])
    cfg = FinetuneConfig(**{**base, "freeze": n, "out": str(Path(out) / f"frozen-{n}")})
    trial_id = ray.tune.get_context().get_trial_id()
    final = run_finetune(cfg, callbacks=[TuneReportCallback()], run_name=f"train-trial_id={trial_id}", claim=False,
                         prepared=prepared)
    # also report the run's final numbers: a trial whose run had already finished trains nothing,
    # so the callback would forward nothing and the table would lose it
    ray.tune.report({k: final[k] for k in ("test_error", "val_acc", "train_loss", "epochs") if final[k] is not None})


def results_table(results: Iterable[Any]) -> pd.DataFrame:
    """One row per trial (objects with ``config``, ``metrics``, ``error``), sorted by ``frozen``."""
    rows = []
    for r in results:
        m = r.metrics or {}
        err = getattr(r, "error", None)
        rows.append({
            "frozen": int((r.config or {}).get("freeze", -1)),
            "test_error": m.get("test_error"),
            "val_acc": m.get("val_acc"),
            "status": "error" if err is not None else "ok",
            "error": "" if err is None else _one_line(err),
        })  # fmt: skip
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.sort_values("frozen").reset_index(drop=True)


def _one_line(e: BaseException) -> str:
    """The innermost cause's message, one line (Tune wraps the trial's exception)."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1][:300] if lines else ''}"


def to_markdown(df: pd.DataFrame, title: str) -> str:
    """A Markdown table of the sweep (no ``tabulate`` dependency)."""

    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return "-"
        return f"{v:.2f}" if isinstance(v, float) else str(v).replace("|", "/")

    lines = [title, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in df.to_dict("records")]
    return "\n".join(lines) + "\n"


def experiment_name(base: FinetuneConfig, frozen: list[int]) -> str:
    """The Tune experiment's name: a digest of what the sweep trains, so the same sweep finds its experiment.

    Settings that do not change what is trained (address, resources per worker, worker-failure
    retries, fault injection) are left out: a rerun on another cluster still restores the same sweep.
    """
    what = {**replace(base, freeze=None, out=None).identity(), "epochs": base.epochs, "eval_every": base.eval_every}
    return "sweep-" + json_digest([what, sorted(frozen)], length=12)  # --frozen 3 2 is the sweep of --frozen 2 3


def run_sweep(base: FinetuneConfig, frozen: list[int], out: str | Path, max_concurrent: int = 1,
              trial_failures: int = 2, gpus: int = 0) -> pd.DataFrame:  # fmt: skip
    """Fine-tune once per frozen-layer count with Ray Tune; print and save the results table.

    ``base`` gives every other setting (its ``freeze`` and ``out`` are replaced per trial).
    ``max_concurrent`` should be the number of trials the cluster fits at once (GPUs // GPUs per trial).
    ``gpus = N`` (``--gpus N``) declares it instead: trials of ``base.workers`` DDP workers with one GPU
    each, N // workers at once; on a cluster the autoscaler is asked for them at start, and ``out`` must
    be on shared storage. (``base.gpus = N``, as before: N trials of one GPU worker each.)
    ``trial_failures``: how often Tune retries a failed trial (its Train run continues from its last
    checkpoint; ``base.max_failures`` is the Train run's own retries of a lost worker, inside one attempt).
    A rerun into the same ``out`` restores the experiment: finished trials are kept, the others resume.
    Writes ``sweep.md`` and ``sweep.csv`` in ``out``; returns the table.
    """
    root = local_out_path(out)  # absolute: Tune and Train storage, and every trial's run directory
    # Tune runs each trial in its own directory (RAY_CHDIR_TO_TRIAL_DIR): a relative --mask, --weights,
    # --split or dataset path would point nowhere there
    base = base.with_absolute_paths()
    frozen = check_frozen(base, frozen)
    _check_inputs(base)
    if max_concurrent < 1:
        raise InputError(f"--max-concurrent must be >= 1, got {max_concurrent}")
    if trial_failures < 0:
        raise InputError(f"trial_failures must be >= 0, got {trial_failures}")
    from .resources import claim_cluster, release
    from .scoring import ensure_ray

    base, max_concurrent = _gpu_trials(base, gpus, max_concurrent)
    max_concurrent = _own_experiment(root, experiment_name(base, frozen), max_concurrent, trial_failures)
    trial_bundles = [{"CPU": _TRIAL_DRIVER_CPU}, *base.bundles()]
    claimed = claim_cluster(base.address, root, base.dataset, lambda: trial_bundles * max_concurrent)
    try:
        ensure_ray(base.address)
        from .finetune.run import check_local_resources

        check_local_resources(base, _TRIAL_DRIVER_CPU)  # once, here: in a trial a cluster looks local
        return _tune(base, frozen, root, max_concurrent, trial_failures)
    finally:
        if claimed:
            release()


def _gpu_trials(base: FinetuneConfig, gpus: int, max_concurrent: int) -> tuple[FinetuneConfig, int]:
    """The trial config and trials at once for a GPU budget: ``gpus`` over trials of ``base.workers`` GPU workers."""
    if gpus < 0:
        raise InputError(f"--gpus takes a GPU count >= 0, got {gpus}")
    if not gpus and base.gpus:  # the Python API's older form: base.gpus = N, N trials of one GPU worker
        gpus, base = base.gpus, replace(base, gpus=None, workers=1, gpus_per_worker=0.0)
    if not gpus:
        return base, max_concurrent
    per = base.workers
    if base.gpus_per_worker not in (0.0, 1.0):
        raise InputError(f"--gpus gives each trial worker one GPU: leave out --gpus-per-worker {base.gpus_per_worker:g}")
    if gpus < per or gpus % per:
        raise InputError(f"--gpus {gpus} does not split into trials of --workers {per} GPU workers: give a multiple "
                         f"of {per} (e.g. --gpus {per * max(1, gpus // per)})")
    if max_concurrent not in (1, gpus // per):
        raise InputError(f"--gpus {gpus} with --workers {per} runs {gpus // per} trial(s) at once: leave out --max-concurrent")
    return replace(base, gpus=per, workers=per, gpus_per_worker=1.0), gpus // per


def _own_experiment(root: Path, name: str, max_concurrent: int, trial_failures: int) -> int:
    """Claim ``root`` for the experiment ``name`` (``<root>/sweep.json``) before Ray starts; the number of
    trials at once it runs with.

    Every trial writes ``<root>/frozen-N``: another sweep (other epochs or settings) into the same ``root``
    would retrain those directories over this one's, so it is refused. A rerun of this sweep restores its
    Tune experiment, which keeps its first run's trials at once and retries (said, and claimed as such).
    """
    ensure_writable(root / "sweep.md")
    record = root / "sweep.json"
    old = json.loads(record.read_text()) if record.is_file() else None
    if old is not None and old.get("experiment") != name:
        raise InputError(f"{root} holds another sweep ({old.get('experiment')}: other settings, epochs or counts); "
                         "pass another --out, or remove that directory to start over")
    if old is not None and (old.get("max_concurrent"), old.get("trial_failures")) != (max_concurrent, trial_failures):
        print(f"sweep: resuming with its first run's {old['max_concurrent']} trial(s) at once and "
              f"{old['trial_failures']} retries (a restored Ray Tune experiment keeps them)", file=sys.stderr, flush=True)
        return int(old["max_concurrent"])
    if old is None:
        write_json_atomic({"experiment": name, "max_concurrent": max_concurrent, "trial_failures": trial_failures},
                          record)
    return max_concurrent


def _check_inputs(base: FinetuneConfig) -> None:
    """A missing mask or weights file is refused before Ray starts, not in every trial."""
    from .finetune.plan import existing_mask_file

    M.check_weights_file(base.weights if base.strategy != "scratch" else None)
    if base.mask:
        existing_mask_file(base.mask)


_TRIAL_DRIVER_CPU = 0.5  # a trial's driver only waits on its TorchTrainer


def _tune(base: FinetuneConfig, frozen: list[int], root: Path, max_concurrent: int, trial_failures: int) -> pd.DataFrame:
    """:func:`run_sweep` once the cluster is claimed: run (or restore) the Tune experiment, write the table."""
    import ray.tune

    from .data.cache import ensure_prepared
    from .data.samples import open_target

    name = experiment_name(base, frozen)  # of the dataset as given: a rerun finds its experiment
    # prepared here, once, into the shared cache: a trial on a GPU node preparing it itself would hash that
    # node's view of the source files (another key, another copy), or miss a --data-dir only this node has
    where = ensure_prepared(base.dataset, base.data_dir, base.image_size,
                            say=lambda m: print(f"sweep: {m}", file=sys.stderr, flush=True))
    if "://" not in where:  # absolute: each trial runs in its own directory (a relative IDTL_CACHE_DIR)
        where = str(Path(where).expanduser().resolve())
    # checked here once, so a damaged copy fails before Tune, and the shards' hashes are stamped in this
    # node's IDTL_CACHE_DIR: trials that share it (this node, or a shared cache) do not each stream and hash
    # the whole dataset again; a trial on a node with a cache of its own still hashes it once
    open_target(where)
    # the dataset stays as given in each trial's config (its identity, checked on every rerun): only where
    # it is read from is passed apart, so a re-keyed cache copy does not make a resumed trial "another run"
    base_dict = replace(base, freeze=None, out=None).to_dict()
    storage = root / "ray"
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(_trial, base=base_dict, out=str(root), prepared=where), {"cpu": _TRIAL_DRIVER_CPU})
    if ray.tune.Tuner.can_restore(str(storage / name)):
        # same sweep, same out: finished trials stay finished; unfinished and failed ones resume with their
        # trial ids, so their Train runs (named after the trial id) continue from their last checkpoints
        print(f"sweep: resuming the experiment in {storage / name} (finished trials are not run again)",
              file=sys.stderr, flush=True)  # fmt: skip
        tuner = ray.tune.Tuner.restore(str(storage / name), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)  # fmt: skip
    else:
        tuner = ray.tune.Tuner(
            trainable,
            param_space={"freeze": ray.tune.grid_search(frozen)},
            tune_config=ray.tune.TuneConfig(max_concurrent_trials=max_concurrent),
            run_config=ray.tune.RunConfig(name=name, storage_path=str(storage), verbose=0,
                                          failure_config=ray.tune.FailureConfig(max_failures=trial_failures)),
        )  # fmt: skip
    results = tuner.fit()  # never raises for a failed trial: those are in results.errors / result.error
    df = results_table(results)
    title = f"Frozen-layer sweep: {base.model} on {base.dataset}, {base.strategy}, {base.epochs} epochs (test error %)"
    md = to_markdown(df, title)
    print(md, end="", flush=True)
    write_text_atomic(md, root / "sweep.md")
    write_text_atomic(df.to_csv(index=False), root / "sweep.csv")
    return df
