"""The scoring run: pre-scoring worker, then a plain Ray Data pipeline that writes the scores.

  1. pre-score   one Ray task (a GPU one on a GPU cluster): s, or the head factors (prescore.py)
  2. broadcast   ``ray.put`` once; every scoring actor reads that one object
  3. score       training rows not yet scored → ``map_batches`` over an actor pool (one actor per GPU
                 with ``num_gpus=1``, CPU actors otherwise), each holding the model and s
  4. write       ``write_parquet`` into ``parts/scores-<fingerprint>``: a resumed run skips the sample_ids written
  5. merge       the files → one array in the training order (parts.py); the caller writes the mask

Ray Data retries the work of an actor that dies; the merge drops the duplicates that can leave.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from ..errors import IdtlError, InputError
from ..influence import InfluenceConfig, InfluenceEngine, curvature_subsample
from ..data.samples import READ_CPUS, RaySamples, quiet_ray_data
from ..self_influence import HeadFactors, self_influence_batch
from ..storage import json_digest
from .common import ArraySet, PipelineResult, Preprocess, _get, device_batch_size, setup_worker, unwrap_ray_error
from .parts import RunParts
from .prescore import Prescored, PrescoreWaiter, log, start_prescore
from .session import drop_embedded_ray, joined_cluster, runs_embedded_ray

PROGRESS_EVERY_S = 2.0


class Scorer:
    """A scoring actor of the Ray Data pool: holds the model and s (or the head factors), scores batches."""

    def __init__(self, model_ref: Any, params: Any, preprocess: Preprocess, threads: int, payload_ref: Any,
                 n_train: int, score: str = "paper", method: str = "jvp", todo_ref: Any = None):
        self.device = setup_worker(threads)
        self.preprocess, self.n_train, self.score, self.method = preprocess, n_train, score, method
        self.engine = InfluenceEngine(_get(model_ref), params=params, device=self.device)
        payload = _get(payload_ref)  # blocks until the pre-scoring task is done when it is its ObjectRef
        payload = payload.payload if isinstance(payload, Prescored) else payload
        todo = _get(todo_ref)  # reading a prepared dataset: the ids to score (the rest are done or validation)
        self.todo = None if todo is None else np.asarray(todo, dtype=np.int64)
        if score == "self":
            self.factors = HeadFactors.from_numpy(payload, self.device)
        else:  # copied once from the read-only object-store view, already in the model's dtype
            self.s = torch.from_numpy(np.array(payload, copy=True)).to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.todo is not None:
            wanted = np.isin(batch["sample_id"], self.todo)
            if not wanted.all():
                batch = {k: v[wanted] for k, v in batch.items()}
            if not len(batch["sample_id"]):
                return {"sample_id": np.zeros(0, np.int64), "score": np.zeros(0, np.float64)}
        # in the model's dtype, as in-process: inputs passed through (no mean/std) may be uint8 or float64
        x = self.preprocess(batch["x"], self.device).to(self.engine.space.dtype)
        if self.score == "self":
            y = torch.as_tensor(batch["label"]).to(self.device)
            d = self_influence_batch(self.engine.model, self.factors, x, y, self.n_train, positions=batch["sample_id"])
        else:  # the sample ids name the samples when one is not finite
            d = self.engine.score_batch(x, batch["label"], self.s, self.n_train, method=self.method,  # type: ignore[arg-type]
                                        positions=batch["sample_id"]).numpy()
        return {"sample_id": batch["sample_id"], "score": np.asarray(d, dtype=np.float64)}


class Pool(NamedTuple):
    """The scoring actor pool for this cluster."""

    actors: int
    cpus: float    # CPUs Ray reserves per actor
    gpu: bool      # one GPU per actor
    threads: int   # torch threads per actor


def scoring_pool(actors: int | None, gpus: int = 0, cpus: int | None = None) -> Pool:
    """The pool for this run: declared resources first, else what the local Ray has.

    ``gpus`` (``--gpus``): one actor per GPU, each with ``num_gpus=1``. ``cpus`` (``--cpus``) or the
    local machine's CPUs: one single-threaded actor per CPU up to 4 CPUs, then one 2-thread actor per 2
    CPUs: two 1-thread processes score ~18% faster than one 2-thread process on 2 cores, and more
    actors than that only multiply model copies. Each CPU actor leaves room for the read tasks
    (:data:`~idtl_ray.data.samples.READ_CPUS`). ``actors`` overrides the count (never above the GPUs).
    On a joined cluster with nothing declared, what it has now is used, and a cluster scaled to zero is
    refused with a line that says to declare ``--gpus`` or ``--cpus``.
    """
    if gpus > 0:
        # A GPU actor needs little CPU; asking for a whole one starves Ray Data (ray-2.60-notes P2).
        return Pool(min(actors or gpus, gpus), 0.5, True, 2)
    if cpus is None:
        import ray

        from ..resources import joined_cluster

        res = ray.cluster_resources()
        have_gpus, have_cpus = int(res.get("GPU", 0)), float(res.get("CPU", 0))
        if joined_cluster() and have_gpus == 0 and have_cpus == 0:
            raise InputError("the cluster has no CPU or GPU yet (it scales from zero): declare what to use, "
                             "--gpus N (one scoring actor per GPU) or --cpus N, and it scales up for it")
        if have_gpus > 0:
            return Pool(min(actors or have_gpus, have_gpus), 0.5, True, 2)
        cpus = max(1, int(have_cpus))
    n = actors or (max(1, cpus) if cpus <= 4 else cpus // 2)
    per = max(min(cpus / n, (cpus - READ_CPUS) / n), 0.1) if n <= cpus else 0.5
    return Pool(n, per, False, max(1, int(round(cpus / n))))


def pool_bundles(pool: Pool) -> list[dict[str, float]]:
    """The resource shapes of ``pool``'s actors (what the autoscaler is asked for)."""
    from ..resources import bundles_of

    return bundles_of(pool.actors, pool.cpus, 1.0 if pool.gpu else 0.0)


# Hash of everything that determines the scores (a dict): a resumed run must match it.
run_fingerprint = json_digest


class _Progress:
    """Reports the rows written so far, from a thread, while Ray Data writes them.

    ``hook(rows)`` runs on that thread (tests use it to kill an actor or interrupt the run).
    """

    def __init__(self, parts: RunParts, start: int, total: int, enabled: bool, hook: Callable[[int], None] | None):
        self.parts, self.start, self.total, self.enabled, self.hook = parts, start, total, enabled, hook
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="idtl-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last, said = -1, 0.0
        while not self._stop.wait(PROGRESS_EVERY_S if self.hook is None else 0.2):
            try:
                rows = self.parts.rows_written() - self.start
                if self.hook is not None:
                    self.hook(rows)
            except Exception as e:  # progress is a courtesy: never let it end the run
                print(f"  (progress reporting stopped: {type(e).__name__}: {e})", file=sys.stderr, flush=True)
                return
            now = time.perf_counter()
            if self.enabled and rows and rows != last and now - said >= 5:
                rate = rows / max(now - self._t0, 1e-9)
                print(f"  scored {rows}/{self.total} samples ({rate:.0f}/s)", file=sys.stderr, flush=True)
                said = now
            last = rows

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _input_blocks(train: ArraySet, todo: np.ndarray, rows: int) -> list[pa.Table]:
    # One Arrow table per block: Ray Data hands blocks to actors, so several blocks = parallel actors.
    from ray.data.extensions import ArrowTensorArray

    return [pa.table({"sample_id": train.ids[p], "x": ArrowTensorArray.from_numpy(np.ascontiguousarray(train.x[p])),
                      "label": train.y[p]}) for p in (todo[i:i + rows] for i in range(0, len(todo), rows))]


def _image_px(train: ArraySet | RaySamples) -> int:
    if isinstance(train, RaySamples):
        return int(train.image_shape[0])
    return int(train.x.shape[1]) if train.x.ndim == 4 else 0


def block_rows(n: int, pool: Pool, batch_size: int, image_px: int) -> int:
    """Rows per input block for scoring ``n`` samples on ``pool``.

    Small sets: at least 2 blocks per actor, so all actors work. Large sets: blocks of 2 batches
    (fewer Ray Data tasks) while the last block, which one actor finishes alone, stays short.
    """
    bs = device_batch_size(batch_size, pool.gpu, image_px)
    return 2 * bs if n >= 16 * pool.actors * bs else max(1, min(bs, -(-n // (2 * pool.actors))))


def _score_rows(model_ref: Any, train: ArraySet | RaySamples, todo: np.ndarray, payload_ref: Any,
                config: InfluenceConfig, pool: Pool, params: Any, preprocess: Preprocess, out: Path,
                shard_size: int) -> None:
    """Stages 3-4: score the rows ``todo`` (positions) of ``train`` on the actor pool and write them under ``out``.

    Arrays are cut into blocks here; a prepared dataset's blocks are already in the object store
    (:func:`idtl_ray.data.samples.read_samples`) and the actors skip the rows not to score.
    """
    import ray
    import ray.data

    n_actors, cpus, gpu, threads = pool
    bs = device_batch_size(config.batch_size, gpu, _image_px(train))
    rows = block_rows(len(todo), pool, config.batch_size, _image_px(train))
    if isinstance(train, RaySamples):
        ds, todo_ref = train.ds, ray.put(train.ids[todo])
    else:
        ds, todo_ref = ray.data.from_arrow(_input_blocks(train, todo, min(rows, shard_size))), None
    scored = ds.map_batches(
        Scorer, batch_size=bs, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=n_actors),
        num_cpus=cpus, num_gpus=1 if gpu else None,
        fn_constructor_kwargs=dict(model_ref=model_ref, params=params, preprocess=preprocess, threads=threads,
                                   payload_ref=payload_ref, n_train=len(train), score=config.score,
                                   todo_ref=todo_ref))
    # The writers need no CPU (the actors hold them all, and a CPU-hungry writer would wait until the
    # pool drains, leaving nothing to resume from) and run on the driver's node, where `out` is.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    scored.write_parquet(str(out), max_rows_per_file=shard_size,
                         ray_remote_args={"num_cpus": 0, "scheduling_strategy": here})


def _wind_down(parts: RunParts, pool: Pool, limit_s: float = 30.0) -> None:
    """After an interruption: let the writers in flight finish (only complete files stay) and wait until
    the scoring actors have given their resources back, so that a resume in the same Ray session (a
    notebook, a test) finds the CPUs or GPUs free instead of waiting for them forever."""
    import gc

    import ray

    parts.settle()
    gc.collect()  # the interrupted pipeline's objects hold the actor handles
    # the embedded Ray is shut down by the caller (_score_todo); on a cluster other work may hold the resources
    if runs_embedded_ray() or joined_cluster():
        return
    key, need = ("GPU", float(pool.actors)) if pool.gpu else ("CPU", pool.actors * pool.cpus)
    deadline = time.monotonic() + limit_s
    while ray.available_resources().get(key, 0.0) + 1e-6 < need and time.monotonic() < deadline:
        time.sleep(0.2)


@contextlib.contextmanager
def _ctrl_c_noted() -> Iterator[threading.Event]:
    """Note a Ctrl-C (SIGINT) while Ray Data runs: its executor can catch the KeyboardInterrupt and fail
    with an error of its own shutdown, and the user must see the interruption (finished files kept,
    `--resume` continues), not a Ray trace. Main thread only, where Python delivers signals."""
    noted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return

    def on_sigint(signum: int, frame: Any) -> None:
        noted.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)


def _part(samples: ArraySet | RaySamples, positions: np.ndarray | None = None) -> Any:
    """What the pre-scoring worker gets of a set: arrays, or the Ray samples it gathers itself."""
    if isinstance(samples, RaySamples):
        return samples if positions is None else samples.take(positions)
    if positions is None:
        return samples.x, samples.y
    return samples.x[positions], samples.y[positions]


def run_pipeline(
    model: nn.Module,
    train: ArraySet | RaySamples,
    val: ArraySet | RaySamples,
    config: InfluenceConfig,
    *,
    preprocess: Preprocess | None = None,
    classes: Sequence[int] | None = None,
    params: Any = None,
    actors: int | None = None,
    gpus: int = 0,
    cpus: int | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    shard_size: int = 1024,
    fingerprint: str = "",
    progress: bool = True,
    on_progress: Callable[[int], None] | None = None,
) -> PipelineResult:
    """Score ``train`` against ``val`` on the running Ray cluster; see the module docstring.

    ``work_dir/parts`` keeps s and the written scores so that ``resume=True`` continues an interrupted
    run; ``fingerprint`` identifies the settings, and a resume with other settings is refused.
    ``shard_size`` caps the rows per written file (the unit a resume can skip). ``gpus``/``cpus``:
    the declared resources (:func:`scoring_pool`); the pre-scoring worker takes a GPU when there are GPUs.
    """
    preprocess = preprocess or Preprocess()
    if len(train) == 0:
        raise InputError("the training set is empty: give at least one training sample")
    if config.score == "paper" and len(val) == 0:
        raise InputError("the validation set is empty: pass a validation set with at least one sample")
    if shard_size < 1:
        raise InputError(f"shard_size must be >= 1, got {shard_size}")
    quiet_ray_data()
    say = log if progress else (lambda msg: None)
    pool = scoring_pool(actors, gpus, cpus)
    with tempfile.TemporaryDirectory(prefix="idtl-scoring-") as scratch:
        parts = RunParts(Path(work_dir) / "parts" if work_dir is not None else Path(scratch) / "parts", fingerprint, resume)
        return _run(model, train, val, config, preprocess, classes, params, pool, parts, shard_size, say, progress,
                    on_progress)


def _start_prescore(model_ref: Any, train: ArraySet | RaySamples, val: ArraySet | RaySamples, config: InfluenceConfig,
                    preprocess: Preprocess, classes: Sequence[int] | None, params: Any, pool: Pool, parts: RunParts,
                    say: Callable[[str], None], overlap: bool) -> PrescoreWaiter:
    """Stage 1, submitted: with ``overlap`` (samples to score) the task takes a token CPU on a CPU pool, so
    that every scoring actor starts beside it (they wait, idle, for its result)."""
    wanted = None if classes is None else [int(c) for c in classes]
    if wanted is not None and config.score == "paper" and not np.isin(val.y, wanted).any():
        raise InputError(f"no validation sample belongs to classes {wanted}: choose classes present in the validation set")
    sub = curvature_subsample(len(train), config.curvature_samples, config.seed)
    ref = start_prescore(model_ref, params, preprocess, _part(train, sub), _part(val) if config.score == "paper" else None,
                         wanted, config, say=say, gpu=pool.gpu, cpus=READ_CPUS if overlap and not pool.gpu else None)
    return PrescoreWaiter(ref, parts, say, interrupt=overlap and threading.current_thread() is threading.main_thread())


def _run(model: nn.Module, train: ArraySet | RaySamples, val: ArraySet | RaySamples, config: InfluenceConfig,
         preprocess: Preprocess, classes: Sequence[int] | None, params: Any, pool: Pool, parts: RunParts,
         shard_size: int, say: Callable[[str], None], progress: bool,
         on_progress: Callable[[int], None] | None) -> PipelineResult:
    """run_pipeline's stages on an open run directory: pre-score (unless saved) while the actors start,
    score what is missing, merge."""
    import ray

    timings: dict[str, float] = {"validation_gradient_s": 0.0, "solve_s": 0.0}
    done_ids, _ = parts.read_scores(drop_damaged=True)
    files_reused = parts.files()
    todo = np.flatnonzero(~np.isin(train.ids, done_ids))
    model_ref = ray.put(model.cpu())
    pre: Prescored | None = parts.load_prescored()
    waiter = None
    if pre is None:
        # GPU pools do not overlap: actors that wait in their constructor for the task's result could hold
        # every GPU of the cluster while the task itself waits for one (a hang at a quota or a fixed size)
        overlap = bool(len(todo)) and not pool.gpu
        waiter = _start_prescore(model_ref, train, val, config, preprocess, classes, params, pool, parts, say, overlap)
        if not overlap:
            try:
                pre = waiter.get()
            except KeyboardInterrupt:
                waiter.cancel()
                drop_embedded_ray()  # the cancelled task's worker may be left unusable (session.py)
                raise
            timings.update(pre.timings)
            waiter = None
    t = time.perf_counter()
    if len(todo):
        payload_ref = waiter.ref if waiter is not None else ray.put(pre.payload)
        _score_todo(model_ref, train, todo, payload_ref, config, pool, params, preprocess, parts, shard_size, say,
                    progress, on_progress, len(done_ids), waiter)
    if waiter is not None:
        pre = waiter.get()
        timings.update(pre.timings)
    assert pre is not None
    # the stage's own time: what scoring adds once s is ready (the actors' start-up overlapped the solve)
    timings["scores_s"] = time.perf_counter() - max(t, waiter.done_at if waiter is not None else t)
    scores = parts.merge(train.ids)
    if not np.isfinite(scores).all():
        raise IdtlError("non-finite scores: the model produces non-finite losses on some samples; check the inputs")
    return PipelineResult(scores, pre.solve, pre.n_val, timings, shards_reused=files_reused,
                          samples_scored=int(len(todo)), actors=pool.actors, device="cuda" if pool.gpu else "cpu")


def _score_todo(model_ref: Any, train: ArraySet | RaySamples, todo: np.ndarray, payload_ref: Any,
                config: InfluenceConfig, pool: Pool, params: Any, preprocess: Preprocess, parts: RunParts,
                shard_size: int, say: Callable[[str], None], progress: bool,
                on_progress: Callable[[int], None] | None, done: int, waiter: PrescoreWaiter | None) -> None:
    """Stages 3-4 with progress, Ctrl-C and the pre-scoring task's failure turned into clear errors."""
    say(f"scoring {len(todo)} samples on {pool.actors} {'GPU' if pool.gpu else 'CPU'} actor{'s' if pool.actors > 1 else ''}"
        + (f" ({done} already scored)" if done else "") + (" (they start while pre-scoring runs)" if waiter else ""))
    bar = _Progress(parts, done, len(todo), progress, on_progress)
    try:
        with _ctrl_c_noted() as interrupted:
            try:
                _score_rows(model_ref, train, todo, payload_ref, config, pool, params, preprocess, parts.scores_dir,
                            shard_size)
            except BaseException as e:
                if waiter is not None and waiter.failed():
                    raise waiter.error from None  # the actors stopped because pre-scoring failed: say why
                if waiter is not None:
                    waiter.cancel()
                if not (interrupted.is_set() or isinstance(e, KeyboardInterrupt)):
                    raise unwrap_ray_error(e) from None
                # Ray Data may turn the Ctrl-C into an error of its own; either way it is an interruption,
                # raised below, outside this block, so that it does not keep this error (and with its
                # traceback the pipeline and its actors) alive as its context
            else:
                if not interrupted.is_set():  # ... or Ray Data swallowed the Ctrl-C
                    return
                if waiter is not None and waiter.failed():
                    raise waiter.error from None
        bar.close()  # no more progress lines (nor test hooks) while the pipeline winds down
        _wind_down(parts, pool)
        raise KeyboardInterrupt
    except BaseException:
        drop_embedded_ray()  # a failed run's tasks are cancelled too: the next run gets fresh workers (session.py)
        raise
    finally:
        bar.close()
