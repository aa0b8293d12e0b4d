"""Running a table: per seed and setting, pre-train the source, score, fine-tune each strategy, evaluate."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..storage import local_out_path
from .cifar_plus import build_cifar_plus, pick_class_a
from .files import check_files, preflight, resolve_dataset, source_npz
from .report import _document, report_mode, write_results
from .specs import ExperimentError, Setting, SourceSpec, TableSpec


@dataclass
class Resources:
    """Ray resources of the training and scoring stages."""

    workers: int = field(default=1, metadata={"help": "Ray Train workers (DDP ranks) per run (default 1)."})
    gpus_per_worker: float = field(default=0.0, metadata={"help": "GPUs per Train worker (default: 1 full, 0 smoke)."})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs per Train worker (default: 4 full, 1 smoke)."})
    score_actors: int | None = field(default=None, metadata={"help": "Scoring actors (default: one per GPU, else one per CPU up to 4 CPUs, then CPUs/2; smoke: 1)."})
    gpus: int = field(default=0, metadata={"help": "GPUs to run on: N Train workers and N scoring actors with one GPU each, asked of the autoscaler at start on a cluster (instead of --workers and --gpus-per-worker; 0: no GPU)."})

    @classmethod
    def default(cls, smoke: bool) -> Resources:
        """Smoke: one CPU worker (fits 2 CPUs beside Ray Data); full: one GPU worker with 4 CPUs."""
        return cls(1, 0.0, 1.0, 1) if smoke else cls(1, 1.0, 4.0, None)

    def declare_gpus(self, gpus: int, workers: int | None = None, gpus_per_worker: float | None = None) -> Resources:
        """``--gpus N``: N Train workers with one GPU each and N scoring actors (one GPU each); 0: no GPU.
        ``workers``/``gpus_per_worker``: what the job's flags also set (refused where they disagree)."""
        from ..resources import gpu_workers

        self.gpus = gpus
        self.workers, self.gpus_per_worker = gpu_workers(gpus, workers, gpus_per_worker)
        if gpus:
            self.score_actors = None
        return self

    def bundles(self) -> list[dict[str, float]]:
        """What the autoscaler is asked for at start: one bundle per GPU Train worker (a scoring actor,
        0.5 CPU and one GPU, fits in one too); none for CPU-only runs."""
        from ..resources import bundles_of

        return bundles_of(self.workers, self.cpus_per_worker, self.gpus_per_worker) if self.gpus_per_worker > 0 else []


_T0 = time.perf_counter()


def _cluster_address() -> str | None:
    """The cluster a job runs on (``RAY_ADDRESS``), handed to the stages as their ``address``.

    finetune's resource check treats ``address=None`` as "a local Ray" and refuses GPU workers the
    cluster does not have *yet*; on an autoscaling cluster (GPU workers min 0) they arrive on demand.
    """
    return os.environ.get("RAY_ADDRESS") or None


def _request_gpus(res: Resources, timeout_s: float = 900.0) -> None:
    """Ask the autoscaler for the GPU workers up front and wait for them (full tables on a cluster).

    The scoring stage picks GPU actors only when the cluster has GPUs at that moment; with GPU workers
    at min 0 it would otherwise score on CPU. The request stays until :func:`_release_gpus` unless Ray Data
    replaces it (docs/cluster.md); the wait holds a pending placement group, which nothing replaces.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from ..resources import request

    need = res.workers * res.gpus_per_worker
    have = ray.cluster_resources().get("GPU", 0.0)
    if need <= 0 or have >= need:
        return
    if _cluster_address() is None:  # a local Ray has no autoscaler to bring GPUs
        raise ExperimentError(f"{res.workers} workers x {res.gpus_per_worker:g} GPUs need {need:g} GPUs but this Ray has "
                              f"{have:g}; pass --gpus 0 (or --gpus-per-worker 0) or submit the job to a GPU cluster")  # fmt: skip
    bundles = res.bundles()
    request(bundles)  # at once; but Ray Data replaces it within 20 s on a cluster that has run a pipeline
    # What the autoscaler must satisfy meanwhile: a placement group of the job's bundles, pending until the nodes
    # join, then removed at once (its reservation would keep the job's own workers off those GPUs)
    pg = placement_group([{k: v for k, v in b.items() if v} for b in bundles], name="idtl-ray-await-gpus")
    try:
        _log(f"asked the autoscaler for {need:g} GPU(s); waiting for them to join the cluster (up to {timeout_s:.0f} s)")
        deadline = time.time() + timeout_s
        while (have := ray.cluster_resources().get("GPU", 0.0)) < need:
            if time.time() > deadline:
                raise ExperimentError(f"{have:g} of {need:g} GPU(s) joined the cluster within {timeout_s:.0f} s; check "
                                      f"the gpu_worker type and your EC2 GPU quota, or pass fewer --gpus")  # fmt: skip
            time.sleep(2)
    finally:
        remove_placement_group(pg)
    _log(f"{have:g} GPU(s) in the cluster")


def _release_gpus(res: Resources) -> None:
    """Withdraw the job's request (only a joined cluster has an autoscaler), so idle GPU workers can go."""
    if res.bundles() and _cluster_address() is not None:
        from ..resources import release

        release()


def _log(msg: str) -> None:
    print(f"[experiments {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class _Context:
    table: TableSpec
    root: Path
    data_dir: str | None
    res: Resources
    cache: Path


def _pretrain_source(ctx: _Context, seed: int) -> str:
    from ..finetune import pretrain

    src = ctx.table.source
    assert src is not None
    path = ctx.root / f"seed{seed}" / "source.pt"
    if path.is_file():
        return str(path)
    name = source_npz(src, ctx.data_dir, ctx.cache)
    _log(f"seed {seed}: pre-training the source model ({src.model} on {src.dataset}, {src.epochs} epochs"
         f"{'' if src.via_ray else ', in-process'})")
    if not src.via_ray:
        _train_in_process(name, src, seed, path, ctx.data_dir)
        return str(path)
    pretrain(name, src.model, src.epochs, path, batch_size=src.batch_size, seed=seed, data_dir=ctx.data_dir,
             image_size=src.image_size if name == src.dataset else None, workers=ctx.res.workers,
             cpus_per_worker=ctx.res.cpus_per_worker, gpus_per_worker=ctx.res.gpus_per_worker,
             address=_cluster_address())  # fmt: skip
    return str(path)


def _train_in_process(name: str, src: SourceSpec, seed: int, path: Path, data_dir: str | None) -> None:
    """A small source model trained in this process (Xavier, Adam 1e-3, as pretrain), saved as a checkpoint."""
    import torch

    from .. import data as D
    from .. import models as M

    d = D.load_dataset(name, data_dir, download=False)
    h, _, c = d.image_shape
    torch.manual_seed(seed)
    model = M.build_model(src.model, d.num_classes, c, h)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(src.epochs):
        order = rng.permutation(len(d.train))
        for i in range(0, len(order), src.batch_size):
            idx = order[i:i + src.batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(D.to_tensor(d.train.x[idx], d.mean, d.std)),
                                                     torch.as_tensor(d.train.y[idx]))  # fmt: skip
            loss.backward()
            opt.step()
    M.save_checkpoint(path, model, {"dataset": d.name, "classes": list(d.classes),
                                    "dataset_fingerprint": d.fingerprint(), "epochs": src.epochs})  # fmt: skip


def _score(ctx: _Context, s: Setting, dataset: str, weights: str, seed: int, classes: list[int] | None) -> dict[str, Any]:
    from ..config import ScoreConfig
    from ..influence import InfluenceConfig
    from ..workflow import run_score

    tag = "" if classes is None else "-classA" + "_".join(map(str, classes))
    out = ctx.root / f"seed{seed}" / f"score-{s.score_key()}{tag}"
    # The jobs reproduce the paper: its validation-influence score and its rule (drop every score < 0).
    # selection="default" runs idtl-ray's own defaults instead (self-influence, --drop auto).
    rule = ({"influence": InfluenceConfig(score="paper"), "drop": "paper"} if ctx.table.selection == "paper"
            else {"auto_epochs": max(1, s.epochs)})
    cfg = ScoreConfig(dataset=dataset, model=s.model, weights=weights, data_dir=ctx.data_dir, image_size=s.image_size,
                      **rule,  # type: ignore[arg-type]
                      target_classes=classes if ctx.table.selection == "paper" else None,  # self-influence: no g_val
                      seed=seed, out=str(out), resume=True, actors=ctx.res.score_actors,
                      gpus=ctx.res.gpus, address=_cluster_address())  # fmt: skip
    _log(f"seed {seed}: scoring {dataset} with {s.model} ({weights})"
         f"{'' if cfg.target_classes is None else f' against class {classes}'}")
    summary = run_score(cfg, progress=False)
    return {"dir": str(out), "mask": summary["mask"], "n_train": summary["n_train"], "n_dropped": summary["n_dropped"],
            "validation_reference": summary.get("validation_reference"), "solve": summary.get("solve")}  # fmt: skip


def _evaluate(model_path: str, x: np.ndarray, y: np.ndarray, mean: Any, std: Any, gpus: float) -> float:
    """Test error (%) of a saved model on (x, y), in a Ray task (on a GPU worker when the run had one)."""
    import ray

    @ray.remote(num_cpus=1, num_gpus=gpus)
    def evaluate(path: str, x: np.ndarray, y: np.ndarray) -> float:
        import torch

        from idtl_ray import data as D  # absolute: this function is shipped to a Ray worker by value
        from idtl_ray.models import load_checkpoint
        from idtl_ray.scoring.common import worker_device

        device = worker_device()  # with no GPU asked for, a GPU this worker can see belongs to another
        model, _ = load_checkpoint(path)
        model.to(device).eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(y), 512):
                logits = model(D.to_tensor(x[i:i + 512], mean, std).to(device))
                correct += int((logits.argmax(1).cpu().numpy() == y[i:i + 512]).sum())
        return 100.0 * (1.0 - correct / max(1, len(y)))

    return float(ray.get(evaluate.remote(model_path, x, y)))


def _run_setting(ctx: _Context, s: Setting, seed: int, weights: str) -> list[dict[str, Any]]:
    """Score, then train every strategy of one setting for one seed; one result row per run."""
    from .. import data as D
    from ..finetune import FinetuneConfig, run_finetune

    dataset = resolve_dataset(s, ctx.data_dir, ctx.cache)
    class_a = None
    plus_xy = None
    if s.plus is not None:
        data = D.load_dataset(dataset, ctx.data_dir, download=False, image_size=s.image_size)
        class_a = pick_class_a(s.plus, data.num_classes, seed)
        plus_xy = build_cifar_plus(data.test.x, data.test.y, data.num_classes, class_a, seed, rounds=s.plus.rounds,
                                   per_round=s.plus.per_round, per_other=s.plus.per_other, max_degrees=s.plus.max_degrees)  # fmt: skip
        plus_stats = (data.mean, data.std)
    score = _score(ctx, s, dataset, weights, seed, None if class_a is None else [class_a])
    rows = []
    for strategy, epochs in s.arms():
        run_dir = ctx.root / f"seed{seed}" / s.key.replace("/", "-") / strategy
        cfg = FinetuneConfig(
            dataset=dataset, model=s.model, strategy=strategy, weights=weights,
            mask=score["mask"] if strategy == "instance" else None, split=str(Path(score["dir"]) / "split.json"),
            data_dir=ctx.data_dir, image_size=s.image_size, epochs=epochs, batch_size=_per_worker_batch(s, ctx.res.workers),
            lr=s.lr,
            lr_drop_at=s.lr_drop_at, freeze=s.freeze, freeze_conv=s.freeze_conv,
            hybrid_init=s.hybrid_init if strategy != "scratch" else None, workers=ctx.res.workers,
            gpus_per_worker=ctx.res.gpus_per_worker, cpus_per_worker=ctx.res.cpus_per_worker, seed=seed,
            augment=s.augment, out=str(run_dir), address=_cluster_address(),
        )  # fmt: skip
        t = time.perf_counter()
        _log(f"seed {seed}: {s.key} {strategy} ({epochs} epochs)")
        final = run_finetune(cfg)
        row = {
            "setting": s.key, "seed": seed, "strategy": strategy, "row": s.row, "epochs": final["epochs"],
            "test_error": final["test_error"], "val_acc": final["val_acc"], "n_train_samples": final["n_train_samples"],
            "n_dropped_by_mask": score["n_dropped"], "n_scored": score["n_train"], "run_dir": str(run_dir),
            "mask": score["mask"], "validation_reference": score["validation_reference"],
            "train_s": round(time.perf_counter() - t, 1),
        }  # fmt: skip
        if plus_xy is not None:
            # the table's number is the CIFAR+ error; the uniform test error stays beside it
            row["uniform_test_error"] = row["test_error"]
            row["test_error"] = _evaluate(str(run_dir / "model.pt"), *plus_xy, *plus_stats, ctx.res.gpus_per_worker)
            row["class_a"] = class_a
            row["plus_test_size"] = int(len(plus_xy[1]))
        rows.append(row)
        _log(f"seed {seed}: {s.key} {strategy}: test error {row['test_error']:.2f}%")
    return rows


def _per_worker_batch(s: Setting, workers: int) -> int:
    """The setting's batch (the paper's, per optimiser step) split over the DDP workers, each of which
    takes ``batch_size`` rows per step: with 4 GPUs a batch of 128 is 32 per worker, not 512 in all."""
    if s.batch_size % workers:
        raise ExperimentError(f"{s.key}: the paper's batch of {s.batch_size} does not split evenly over {workers} "
                              f"workers; use a worker count that divides it (e.g. --gpus {_divisor(s.batch_size, workers)})")
    return s.batch_size // workers


def _divisor(n: int, below: int) -> int:
    """The largest divisor of ``n`` that is at most ``below``."""
    return max(d for d in range(1, below + 1) if n % d == 0)


def run_root(out: Path, n: int, smoke: bool) -> Path:
    """Where Table ``n``'s run directories live: ``<out>/tableN``, or ``<out>/tableN-smoke`` for ``--smoke``.

    Apart, because a run directory is reused when found: a full run after a smoke one (same ``--out``)
    would otherwise fine-tune from the smoke's tiny source model.
    """
    return out / f"table{n}{'-smoke' if smoke else ''}"


def _refuse_replacing_report(root: Path, table: TableSpec) -> None:
    """A smoke (or analogue) run must not overwrite a longer run's ``tableN.md`` in the same ``--out``."""
    path = root / f"table{table.number}.json"
    try:
        old = json.loads(path.read_text(encoding="utf-8")).get("mode")
    except (OSError, ValueError, AttributeError):
        return  # none, or not ours: written over as before
    new = report_mode(table)
    if old not in (None, new, "smoke"):
        raise ExperimentError(
            f"{path.parent / path.stem}.md holds a {old} run's report, which this {new} run would replace; "
            f"give it another --out (e.g. --out {root / new})")


def run_table(n: int, smoke: bool = False, data_dir: str | None = None, out: str | Path = "results",
              seeds: list[int] | tuple[int, ...] = (0,), resources: Resources | None = None,
              spec: TableSpec | None = None) -> dict[str, Any]:  # fmt: skip
    """Run paper Table ``n`` for every seed and write ``<out>/tableN.{md,json,png}`` (+ ``_curves.png``).

    ``spec`` replaces the built-in settings of Table ``n`` (a real-data analogue, see
    ``benchmarks/real_analogues.py``). Needs a running Ray (a job's ``ray.init()``) or starts a local one
    through the stages. Returns the JSON document (keys: table, mode, title, seeds, settings, runs,
    summary, paper, notes, timings, ...).
    """
    if not seeds or len(set(seeds)) != len(seeds):
        raise ExperimentError(f"seeds must be distinct and at least one, got {list(seeds)}; e.g. --seeds 0 1 2")
    root = local_out_path(out)
    if _cluster_address() is not None:  # before any work: paths the workers on other nodes could not see
        from ..resources import check_shared_storage

        check_shared_storage({"--out": root, "--data-dir": data_dir}, (resources or Resources.default(smoke)).bundles())
    table = preflight(n, smoke, data_dir) if spec is None else check_files(spec, data_dir)
    n = table.number
    _refuse_replacing_report(root, table)
    runs_root = run_root(root, n, smoke)
    ctx = _Context(table, runs_root, data_dir, resources or Resources.default(smoke), runs_root / "_data")
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for s in table.settings:
        _per_worker_batch(s, ctx.res.workers)  # before any work
    try:
        _request_gpus(ctx.res)  # inside: a wait cut short (timeout, Ctrl-C, SIGTERM) still withdraws the request
        for seed in seeds:
            weights_src = _pretrain_source(ctx, seed) if table.source is not None else None
            for s in table.settings:
                weights = weights_src if s.weights == "source" else s.weights
                if weights is None:
                    raise ExperimentError(f"{s.key} needs a source model but Table {n} defines none; fix its TableSpec")
                runs.extend(_run_setting(ctx, s, seed, weights))
    finally:
        _release_gpus(ctx.res)
    doc = _document(table, list(seeds), runs, time.perf_counter() - t0, ctx.res)
    write_results(doc, root, table)
    return doc
