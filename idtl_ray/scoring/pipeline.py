"""Distributed influence scoring on Ray Data (design.md §3).

Stages (one ``Scorer`` actor pool does the work of stages 1, 2 and 4; a small ``Coordinator`` actor is
the job board between it and the driver):
  1. g_val        the scoring actors start and, before scoring, compute the validation gradient's partial
                  sums, one validation batch ("chunk") per job; the driver adds them up in chunk order.
                  One set of processes imports torch and loads the model, once.
  2. s            (H + λI) s = g_val: the driver runs the cg / LiSSA iteration and the actors compute its
                  curvature products (summed by the driver in batch order); the exact solver runs on the
                  driver; on a GPU cluster one GPU actor runs the whole solve
  3. broadcast    ``ray.put(s)`` once by the driver; the coordinator hands every actor that ObjectRef
  4. scores       training set → the same actors → JVP scores, batch by batch (one actor per GPU, one
                  single-threaded actor per CPU on small CPU machines)
  5. checkpoint   the driver writes each finished shard to ``parts/`` (Parquet, atomic), so ``resume``
                  skips finished shards; actor deaths while scoring are retried by Ray Data, duplicates
                  are dropped (before scoring, a restarted actor's job goes back on the board)
  6. merge        all shards → one array aligned with the training order (the caller writes the mask)

The stage functions take plain arrays, so the same code scores registry datasets (uint8 images,
normalised in the actor) and a user's own tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.utils.data import TensorDataset

from .errors import IdtlError, InputError
from .influence import (CurvatureOperator, InfluenceConfig, InfluenceEngine, SolveInfo, curvature_subsample, eval_mode,
                        head_solve_info,
                        solve)
from .mask import atomic_write_table, write_json_atomic
from .self_influence import HeadFactors, fit_head_factors, self_influence_batch


@dataclass
class ArraySet:
    """Samples as arrays: ``x`` (uint8 NHWC images, or float model inputs), ``y`` int64, stable ``ids``."""

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray

    def __post_init__(self) -> None:
        self.y = np.asarray(self.y, dtype=np.int64)
        self.ids = np.asarray(self.ids, dtype=np.int64)
        if not (len(self.x) == len(self.y) == len(self.ids)):
            raise InputError(f"x, y and ids differ in length ({len(self.x)}, {len(self.y)}, {len(self.ids)})")

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Preprocess:
    """How an actor turns a batch of ``x`` into model input: normalise uint8 NHWC, or pass floats through."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        if self.mean is None:
            return torch.as_tensor(np.ascontiguousarray(x))
        from .data import to_tensor

        return to_tensor(x, self.mean, self.std)


@dataclass
class PipelineResult:
    """Scores aligned with the training set's order, and how they were made."""

    scores: np.ndarray
    solve: SolveInfo
    n_val: int
    timings: dict[str, float]
    shards_reused: int = 0
    samples_scored: int = 0
    actors: int = 1
    device: str = "cpu"


# ── Ray Data UDFs (run inside Ray workers) ──────────────────────────────────────────────────────


def _actor_device() -> torch.device:
    # Ray sets CUDA_VISIBLE_DEVICES for actors that asked for a GPU; without a real one torch says no.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _get(ref_or_value: Any) -> Any:
    import ray

    # Ray Data does not resolve ObjectRefs passed through fn_constructor_kwargs (ray-2.60-notes §1.2).
    return ray.get(ref_or_value) if isinstance(ref_or_value, ray.ObjectRef) else ref_or_value


def gradient_chunk(engine: InfluenceEngine, preprocess: Preprocess, x: np.ndarray, y: np.ndarray,
                   classes: Sequence[int] | None) -> tuple[np.ndarray, int]:
    """Σ ∇θ L over one validation batch (only ``classes`` when given): one partial sum of g_val.

    A chunk is exactly one batch of the in-process engine, filtered the same way, so the float64 sum of
    the chunks in order is the in-process g_val.
    """
    if classes is not None:
        keep = np.isin(y, np.asarray(list(classes), dtype=np.int64))
        x, y = x[keep], y[keep]
    if len(y) == 0:
        return np.zeros(engine.space.dim, dtype=np.float64), 0
    xb = preprocess(x).to(engine.device, engine.space.dtype)
    g, n = engine.gradient_sum(xb, torch.as_tensor(y).to(engine.device))
    return g.double().cpu().numpy(), n


def _curvature_on(engine: InfluenceEngine, preprocess: Preprocess, x: np.ndarray, y: np.ndarray,
                  config: InfluenceConfig) -> CurvatureOperator:
    """The damped curvature on the (already drawn) subsample ``x, y``, batched as in-process."""
    data = TensorDataset(preprocess(x).to(engine.space.dtype), torch.as_tensor(y))
    return engine.curvature(data, config.curvature, config.damping, samples=None, batch_size=config.batch_size)


def _solve_task(model: nn.Module, params: Any, preprocess: Preprocess, x: np.ndarray, y: np.ndarray,
                g: np.ndarray, config: InfluenceConfig) -> tuple[np.ndarray, SolveInfo]:
    """Solve (H + λI) s = g_val on the curvature subsample ``x, y``: on the driver, or on a GPU actor."""
    engine = InfluenceEngine(model, params=params, device=_actor_device())
    op = _curvature_on(engine, preprocess, x, y, config)
    s, info = solve(op, torch.from_numpy(g).to(engine.device, torch.float64), config)
    return s.cpu().numpy(), info


def head_factors(model: nn.Module, preprocess: Preprocess, x: np.ndarray, y: np.ndarray,
                 config: InfluenceConfig) -> dict[str, np.ndarray]:
    """EK-FAC factors of the head on the curvature subsample (self-influence): on the driver or a GPU worker."""
    device = _actor_device()
    model = model.to(device)
    bs = config.batch_size
    batches = ((preprocess(x[i:i + bs]).to(device), torch.as_tensor(y[i:i + bs]).to(device)) for i in range(0, len(y), bs))
    return fit_head_factors(model, batches, config.head_damping, params=config.head_params).to_numpy()


class Scorer:
    """A scoring actor of the Ray Data pool (model loaded once per actor).

    ``s_source`` is the ObjectRef of s (a resumed run), or the run's :class:`Coordinator`. Then the
    constructor first works for the earlier stages, in the same process that will score: it takes jobs
    from the coordinator (g_val partial sums, curvature products of the solve, or on a GPU cluster the
    whole solve) until s is published. So one set of processes imports torch and loads the model.
    """

    def __init__(self, model_ref: Any, params: Any, preprocess: Preprocess, threads: int,
                 s_source: Any, n_train: int, method: str = "jvp", score: str = "paper"):
        import ray

        torch.set_num_threads(max(1, threads))
        self.preprocess = preprocess
        self.s_source = s_source
        self.s: torch.Tensor | None = None
        self.n_train = n_train
        self.method = method
        self.score = score
        self.factors: HeadFactors | None = None
        self.params = params
        self._curvature: CurvatureOperator | None = None
        # Without an ObjectRef, s_source is the coordinator: sign in (a fresh token per process start, so
        # a claim that a crashed earlier incarnation left waiting cannot take a job for us), then work
        # until s is out. With one, the run is resumed and s exists already.
        coordinator = None if isinstance(s_source, ray.ObjectRef) else s_source
        if coordinator is not None:
            ctx = ray.get_runtime_context()
            self._id, self._token = ctx.get_actor_id(), uuid.uuid4().hex
            if not ray.get(coordinator.register.remote(ctx.current_actor, self._id, self._token)):
                raise IdtlError("the scoring run this actor belongs to has failed already")
        try:
            self.engine = InfluenceEngine(_get(model_ref), params=params, device=_actor_device())
        except BaseException as e:
            if coordinator is not None:
                _report(coordinator, e)
            raise
        if coordinator is not None:
            self._work(coordinator)
            self._curvature = None  # the curvature batches are not needed for scoring

    def _work(self, coordinator: Any) -> None:
        """Run the coordinator's jobs until it has s, or the run has failed (then it answers None)."""
        import ray

        while (job := ray.get(coordinator.claim.remote(self._id, self._token))) is not None:
            key, (kind, *args) = job
            try:
                if kind == "gradient":  # (chunk ref, classes): one validation batch
                    x, y = ray.get(args[0][0])
                    result: Any = gradient_chunk(self.engine, self.preprocess, x, y, args[1])
                elif kind == "product":  # (v ref, curvature subsample ref, config, batch index)
                    op = self._curvature_op(args[1][0], args[2])
                    # v arrives in float64, cast here as the in-process operator casts it
                    v = torch.tensor(ray.get(args[0][0])).to(self.engine.device, self.engine.space.dtype)
                    with eval_mode(self.engine.model), torch.no_grad():
                        x, y = op.batches[args[3]]
                        result = op.batch_product(v, x, y).double().cpu().numpy()
                else:  # "solve": (curvature subsample ref, g, config), on this actor's GPU
                    x, y = ray.get(args[0][0])
                    result = _solve_task(self.engine.model, self.params, self.preprocess, x, y, args[1], args[2])
            except BaseException as e:  # the driver re-raises it; then this actor fails too
                _report(coordinator, e)
                raise
            ray.get(coordinator.deliver.remote(key, result))

    def _curvature_op(self, sub_ref: Any, config: InfluenceConfig) -> CurvatureOperator:
        """This actor's copy of the curvature batches (the same batches as the driver's and in-process)."""
        import ray

        if self._curvature is None:
            x, y = ray.get(sub_ref)
            self._curvature = _curvature_on(self.engine, self.preprocess, x, y, config)
        return self._curvature

    def _solution(self) -> torch.Tensor:
        import ray

        if self.s is None:
            ref = self.s_source
            if not isinstance(ref, ray.ObjectRef):  # the coordinator: blocks until the driver has s
                status, value = ray.get(ref.get.remote())
                if status == "error":
                    raise IdtlError(f"the scoring run failed before its scores: {value}")
                ref = value[0]
            # Read-only zero-copy view from the object store; copy once so torch owns writable memory.
            self.s = torch.from_numpy(np.array(ray.get(ref), copy=True)).to(self.engine.device)
        return self.s

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        x = self.preprocess(batch["x"])
        if self.score == "self":  # s_source is the ObjectRef of the head's EK-FAC factors
            if self.factors is None:
                self.factors = HeadFactors.from_numpy(ray.get(self.s_source), self.engine.device)
            y = torch.as_tensor(batch["label"]).to(self.engine.device)
            d = self_influence_batch(self.engine.model, self.factors, x.to(self.engine.device), y, self.n_train)
            return {"pos": batch["pos"], "delta_val_loss": d}
        s = self._solution()
        d = self.engine.score_batch(x, batch["label"], s, self.n_train, method=self.method)  # type: ignore[arg-type]
        return {"pos": batch["pos"], "delta_val_loss": d.numpy()}


def _report(coordinator: Any, error: BaseException) -> None:
    """Hand an actor's error to the coordinator, so the driver raises it with its own type and text."""
    import ray

    try:
        ray.get(coordinator.fail.remote(error))
    except Exception:  # an exception that does not pickle: send its text
        ray.get(coordinator.fail.remote(f"{type(error).__name__}: {error}"))


class Coordinator:
    """A job board for the run's stages before scoring, as a small Ray actor (asyncio, no CPU).

    The driver ``add``s jobs (g_val chunks, curvature products, the GPU solve) and ``take``s their
    results one by one, in the order it chooses, so every sum is formed in the in-process order. The
    scoring actors ``claim`` jobs (waiting while there is none) and ``deliver`` results, until the
    driver ``put``s the ObjectRef of s; then ``claim`` answers None and ``get`` hands them s.

    An actor that Ray restarts signs in again with the same id; the jobs it held go back on the board.
    ``fail`` records an error that every waiter (driver or actor) receives; ``actors`` lists everyone
    who signed in, so the driver can stop them after a failure.
    """

    def __init__(self) -> None:
        import asyncio

        self._jobs: dict[Any, tuple[Any, ...]] = {}  # key -> payload, in the order added
        self._held: dict[Any, str] = {}               # key -> actor id working on it
        self._results: dict[Any, Any] = {}
        self._error: BaseException | None = None
        self._final: list[Any] | None = None
        self._actors: dict[str, Any] = {}
        self._tokens: dict[str, str] = {}             # actor id -> token of its current process
        self._changed = asyncio.Condition()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _wait(self, ready: Callable[[], bool]) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._error is not None or ready())

    async def register(self, actor: Any, aid: str, token: str) -> bool:
        """Sign in a scoring actor; False when the run has failed already. A restart gives back its jobs."""
        if self._error is not None:
            return False
        if aid in self._actors:  # Ray restarted this actor: what it was doing is lost
            for key in [k for k, who in self._held.items() if who == aid]:
                del self._held[key]
            await self._notify()
        self._actors[aid] = actor
        self._tokens[aid] = token
        return True

    async def actors(self) -> list[Any]:
        """Handles of every actor that signed in."""
        return list(self._actors.values())

    async def count(self) -> int:
        """How many actors have signed in (the driver's check that the pool could start)."""
        return len(self._actors)

    async def add(self, jobs: dict[Any, tuple[Any, ...]]) -> None:
        """Put jobs on the board (``key -> (kind, *args)``)."""
        self._jobs.update(jobs)
        await self._notify()

    def _free(self) -> Any:
        return next((k for k in self._jobs if k not in self._held), None)

    async def claim(self, actor_id: str, token: str) -> tuple[Any, tuple[Any, ...]] | None:
        """The oldest job nobody holds, once there is one; None once s is out (or the run failed).

        A claim from an earlier process of a restarted actor (an old token) gets None: its caller is gone.
        """
        await self._wait(lambda: self._final is not None or self._free() is not None)
        if self._error is not None or self._final is not None or self._tokens.get(actor_id) != token:
            return None
        key = self._free()
        self._held[key] = actor_id
        return key, self._jobs[key]

    async def deliver(self, key: Any, result: Any) -> None:
        """A job's result (the first copy counts: a job given back after a restart can finish twice)."""
        if key in self._jobs:
            del self._jobs[key]
            self._held.pop(key, None)
            self._results[key] = result
            await self._notify()

    async def take(self, key: Any) -> tuple[str, Any]:
        """``("ok", result)`` of job ``key`` once delivered (and forget it), or ``("error", exception)``."""
        await self._wait(lambda: key in self._results)
        if self._error is not None:
            return "error", self._error
        return "ok", self._results.pop(key)

    async def fail(self, error: BaseException | str) -> None:
        """Record why the run failed (the first cause is kept): every waiter gets it."""
        if self._error is None:
            self._error = error if isinstance(error, BaseException) else IdtlError(str(error))
        await self._notify()

    async def put(self, boxed_ref: list[Any]) -> None:
        """Publish ``[ObjectRef of s]``: the actors stop claiming and start scoring."""
        self._final = boxed_ref
        await self._notify()

    async def get(self) -> tuple[str, Any]:
        """``("ok", [ObjectRef of s])`` once published, or ``("error", message)``."""
        await self._wait(lambda: self._final is not None)
        return ("error", str(self._error)) if self._error is not None else ("ok", self._final)


class RemoteCurvature:
    """The solver's curvature operator, with each batch product computed by a scoring actor.

    Same interface as :class:`~idtl_ray.influence.CurvatureOperator` (``matvec``, ``batches``, ``kind``)
    for the cg and LiSSA solvers; the driver adds the per-batch products in batch order, exactly as the
    in-process operator does, so only where each product runs changes. Two 1-thread processes compute
    these products ~18% faster than one 2-thread process on 2 cores, and they do not slow down when
    Ray's own processes take a core for a moment, as lock-step OpenMP threads do.
    """

    def __init__(self, coordinator: Any, wait_for: Callable[[Any], Any], sub: tuple[np.ndarray, np.ndarray],
                 config: InfluenceConfig):
        import ray

        self.kind, self.damping = config.curvature, config.damping
        self._coordinator, self._wait_for, self._config = coordinator, wait_for, config
        self._sub_ref = ray.put(sub)
        n = len(sub[1])
        self.batches = [(None, range(i, min(n, i + config.batch_size))) for i in range(0, n, config.batch_size)]
        self.n = n
        self.matvecs = 0

    def matvec(self, v: torch.Tensor, batches: list[Any] | None = None) -> torch.Tensor:
        import ray

        idx = range(len(self.batches)) if batches is None else [self.batches.index(b) for b in batches]
        v_ref = ray.put(v.double().numpy())
        keys = [("product", self.matvecs, b) for b in idx]
        self._coordinator.add.remote({k: ("product", [v_ref], [self._sub_ref], self._config, k[2]) for k in keys})
        acc = torch.zeros_like(v)
        for k in keys:  # batch order: the in-process operator's order of summation
            acc = acc + torch.tensor(self._wait_for(self._coordinator.take.remote(k)), dtype=v.dtype)
        self.matvecs += 1
        return acc / sum(len(self.batches[b][1]) for b in idx) + self.damping * v


ACTOR_START_TIMEOUT_S = 900.0  # no scoring actor signed in by then: the cluster cannot host one

# ── the pipeline ──────────────────────────────────────────────────────────────────────────────────


def _arrow(x: np.ndarray, y: np.ndarray, pos: np.ndarray) -> pa.Table:
    from ray.data.extensions import ArrowTensorArray

    return pa.table({"pos": pos.astype(np.int64), "x": ArrowTensorArray.from_numpy(np.ascontiguousarray(x)),
                     "label": y.astype(np.int64)})


def _blocks(x: np.ndarray, y: np.ndarray, pos: np.ndarray, rows: int) -> list[pa.Table]:
    # One Arrow table per block: Ray Data hands blocks to actors, so several blocks = parallel actors.
    return [_arrow(x[i:i + rows], y[i:i + rows], pos[i:i + rows]) for i in range(0, len(pos), rows)]


def _resources(actors: int | None) -> tuple[int, float, float, int]:
    """(actors, cpus per actor, gpus per actor, torch threads) for this cluster.

    CPU clusters: by default one single-threaded actor per CPU up to 4 CPUs, then one 2-thread actor per
    2 CPUs. Two 1-thread processes score ~18% faster than one 2-thread process on 2 cores (intra-op
    threads barely help a small convnet), and more actors than that only multiply model copies.
    """
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 1))
    if gpus > 0:
        n = actors or gpus
        # A GPU actor needs little CPU; asking for a whole one starves Ray Data (ray-2.60-notes P2).
        return n, 0.5, 1.0, 2
    n = actors or (max(1, int(cpus)) if cpus <= 4 else int(cpus) // 2)
    per = max(cpus / n, 0.1) if n <= cpus else 0.5
    return n, per, 0.0, max(1, int(round(min(per, cpus / n))))


class _Stream:
    """Iterates a Ray Data dataset on a background thread, so the driver can work while it starts.

    Iterating yields its batches in arrival order and re-raises the execution's error, if any.
    """

    _END = object()

    def __init__(self, ds: Any):
        import queue
        import threading

        self._q: queue.Queue[Any] = queue.Queue()
        self._stop = threading.Event()
        self.error: BaseException | None = None  # set when the execution fails (read while waiting for s)
        self._thread = threading.Thread(target=self._run, args=(ds,), name="idtl-scoring", daemon=True)
        self._thread.start()

    def _run(self, ds: Any) -> None:
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                if self._stop.is_set():
                    break
                self._q.put(batch)
            self._q.put(self._END)
        except BaseException as e:  # handed to the consumer, which re-raises it
            self.error = e
            self._q.put(e)

    def __iter__(self) -> Any:
        while True:
            item = self._q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self, timeout: float = 60.0) -> None:
        """Stop consuming (after a failure elsewhere) and wait briefly for the execution to wind down.

        Queued batches and errors are dropped: an unread error's traceback would keep Ray Data's
        executor, and through it the pool's actors, alive until the next garbage collection.
        """
        import gc
        import queue

        self._stop.set()
        self._thread.join(timeout)
        dropped = False
        while True:
            try:
                self._q.get_nowait()
                dropped = True
            except queue.Empty:
                break
        if dropped:
            gc.collect()  # the executor sits in reference cycles; free its actors now, not later


def run_fingerprint(parts: dict[str, Any]) -> str:
    """Hash of everything that determines the scores: a resumed run must match it."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Progress:
    """A small progress line on stderr (rich when it is a terminal)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.t0 = time.perf_counter()
        self._last = 0.0
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self._bar = Progress("scoring", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
            self._bar.start()
            self._task = self._bar.add_task("scores", total=total)

    def advance(self, k: int) -> None:
        self.done += k
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
        elif self.enabled and (time.perf_counter() - self._last > 5 or self.done == self.total):
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            print(f"  scored {self.done}/{self.total} samples ({rate:.0f}/s)", file=sys.stderr, flush=True)
            self._last = time.perf_counter()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def run_pipeline(
    model: nn.Module,
    train: ArraySet,
    val: ArraySet,
    config: InfluenceConfig,
    *,
    preprocess: Preprocess | None = None,
    classes: Sequence[int] | None = None,
    params: Any = None,
    actors: int | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    shard_size: int = 1024,
    fingerprint: str = "",
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
) -> PipelineResult:
    """Score ``train`` against ``val`` on the running Ray cluster; see the module docstring.

    ``work_dir/parts`` keeps finished shards (and s) so that ``resume=True`` continues an interrupted
    run; ``fingerprint`` identifies the settings, and a resume with other settings is refused.
    ``on_shard(k)`` is called after shard k is saved (tests use it to interrupt a run).
    """
    import ray
    import ray.data

    preprocess = preprocess or Preprocess()
    if len(train) == 0:
        raise InputError("the training set is empty: give at least one training sample")
    if len(val) == 0:
        raise InputError("the validation set is empty: pass a validation set with at least one sample")
    if shard_size < 1:
        raise InputError(f"shard_size must be >= 1, got {shard_size}")
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # The actors' constructors do g_val and the solve (minutes to hours on big models) before the first
    # block moves; Ray Data would call that "no progress" after 30 min. wait_for has its own backstop.
    ctx.execution_no_progress_timeout_s = -1
    timings: dict[str, float] = {}
    n_actors, cpus, gpus, threads = _resources(actors)
    parts = Path(work_dir) / "parts" if work_dir is not None else None
    state = _open_parts(parts, fingerprint, resume)
    model = model.cpu()
    model_ref = ray.put(model)
    common = dict(model_ref=model_ref, params=params, preprocess=preprocess, threads=threads, score=config.score)
    n = len(train)
    n_shards = -(-n // shard_size)
    done: dict[int, np.ndarray] = dict(state.get("shards", {}))
    todo = [k for k in range(n_shards) if k not in done]
    pos = np.concatenate([np.arange(k * shard_size, min(n, (k + 1) * shard_size)) for k in todo]) if todo else np.zeros(0, np.int64)

    def start_scoring(s_source: Any) -> _Stream:
        """Start the scoring actor pool in the background (stage 4); batches arrive on the returned stream."""
        # Small sets: at least 2 blocks per actor, so all actors work. Large sets: blocks of 2 batches,
        # half the Ray Data tasks (driver and scheduling work) while the last block, which one actor
        # finishes alone, stays short.
        bs = config.batch_size
        block_rows = 2 * bs if len(pos) >= 16 * n_actors * bs else max(1, min(bs, -(-len(pos) // (2 * n_actors))))
        tds = ray.data.from_arrow(_blocks(train.x[pos], train.y[pos], pos, block_rows))
        out = tds.map_batches(Scorer, fn_constructor_kwargs={**common, "s_source": s_source, "n_train": n},
                              batch_size=config.batch_size, batch_format="numpy",
                              compute=ray.data.ActorPoolStrategy(size=n_actors), num_cpus=cpus, num_gpus=gpus or None)
        return _Stream(out)

    def say(msg: str) -> None:
        if progress:
            print(f"  {msg}", file=sys.stderr, flush=True)

    pool_up = False

    def wait_for(ref: Any) -> Any:
        """The coordinator's answer for ``ref``; re-raises an actor's error, or the pool's if it died.

        Also the backstop for a pool that cannot start (Ray Data's own no-progress timeout is off,
        since the pre-scoring work runs inside the actors' constructors and moves no blocks).
        """
        nonlocal pool_up
        t0 = time.monotonic()
        while not ray.wait([ref], timeout=0.5)[0]:
            if stream is not None and stream.error is not None:
                raise stream.error
            if not pool_up and time.monotonic() - t0 > ACTOR_START_TIMEOUT_S:
                pool_up = ray.get(coordinator.count.remote()) > 0
                if not pool_up:
                    raise IdtlError(
                        f"no scoring actor started within {ACTOR_START_TIMEOUT_S:.0f} s: the cluster lacks the "
                        f"resources for one ({cpus:g} CPU, {gpus:g} GPU each); add nodes or lower --actors")
        pool_up = True
        status, value = ray.get(ref)
        if status == "error":
            raise value if isinstance(value, BaseException) else IdtlError(str(value))
        return value

    # ── 1-3: g_val, s (reused when resuming); self-influence: the head's EK-FAC factors instead ──
    stream: _Stream | None = None
    if config.score == "self":
        info, n_val = head_solve_info(), 0
        timings["validation_gradient_s"] = 0.0
        if len(pos):
            t = time.perf_counter()
            sub = curvature_subsample(n, config.curvature_samples, config.seed)
            args = (train.x[sub], train.y[sub], config)
            if gpus:  # on a GPU worker: the driver of a GPU cluster has none
                task = ray.remote(head_factors).options(num_cpus=cpus, num_gpus=gpus)
                factors = ray.get(task.remote(model_ref, preprocess, *args))
            else:
                factors = head_factors(model, preprocess, *args)
            timings["solve_s"] = time.perf_counter() - t
            say(f"self-influence curvature (EK-FAC of the head) on {len(sub)} samples: {timings['solve_s']:.1f} s")
            stream = start_scoring(ray.put(factors))
    elif state.get("s") is not None:
        s, info, n_val = state["s"], state["solve"], state["n_val"]
        timings["validation_gradient_s"] = timings["solve_s"] = 0.0
    else:
        if not len(pos):  # finished shards without their s cannot happen; rescore rather than guess
            done.clear()
            todo[:] = list(range(n_shards))
            pos = np.arange(n)
        wanted = None if classes is None else [int(c) for c in classes]
        if wanted is not None and not np.isin(val.y, np.asarray(wanted, dtype=np.int64)).any():
            raise InputError(f"no validation sample belongs to classes {wanted}: "
                             "choose classes present in the validation set")
        t = time.perf_counter()
        say(f"starting {n_actors} scoring actor{'s' if n_actors > 1 else ''} ({'GPU' if gpus else f'{threads} CPU thread(s) each'}); "
            "they compute the validation gradient and the solve's products first")
        coordinator = ray.remote(Coordinator).options(num_cpus=0).remote()
        stream = start_scoring(coordinator)  # the actors start, then take the jobs below
        try:
            # g_val: one job per in-process batch, so every partial sum is one the in-process engine forms.
            # A few jobs ahead of the one the driver adds next, so that finished partial sums (each the
            # size of the model) never pile up in the coordinator.
            bs = config.batch_size
            starts = list(range(0, len(val), bs))
            window = 2 * n_actors

            def chunk_job(k: int) -> dict[Any, Any]:
                i = starts[k]
                return {("gradient", k): ("gradient", [ray.put((val.x[i:i + bs], val.y[i:i + bs]))], wanted)}

            coordinator.add.remote({key: job for k in range(min(window, len(starts))) for key, job in chunk_job(k).items()})
            g, n_val = np.zeros(0), 0
            for k in range(len(starts)):  # chunk order: the sum does not depend on which actor finished first
                if k + window < len(starts):
                    coordinator.add.remote(chunk_job(k + window))
                part, count = wait_for(coordinator.take.remote(("gradient", k)))
                g, n_val = (part if not len(g) else g + part), n_val + count
            timings["validation_gradient_s"] = time.perf_counter() - t
            say(f"validation gradient: {n_val} samples in {len(starts)} batches, {timings['validation_gradient_s']:.1f} s "
                "(with the actors' start-up)")
            t = time.perf_counter()
            sub = curvature_subsample(len(train), config.curvature_samples, config.seed)
            if gpus:  # the actors hold the GPUs: one of them solves on its GPU
                coordinator.add.remote({("solve",): ("solve", [ray.put((train.x[sub], train.y[sub]))], g, config)})
                s, info = wait_for(coordinator.take.remote(("solve",)))
            elif config.solver in ("cg", "lissa"):  # the driver iterates; the actors compute the products
                op = RemoteCurvature(coordinator, wait_for, (train.x[sub], train.y[sub]), config)
                s_t, info = solve(op, torch.from_numpy(g), config)
                s = s_t.numpy()
            else:  # the exact solver needs the dense matrix: small models only, on the driver
                s, info = _solve_task(model, params, preprocess, train.x[sub], train.y[sub], g, config)
            timings["solve_s"] = time.perf_counter() - t
            say(f"solve: {info.solver}, {info.iterations} iterations, relative residual {info.relative_residual:.1e}, "
                f"{timings['solve_s']:.1f} s")
            if parts is not None:
                _save_solution(parts, s, info, n_val, fingerprint)
        except BaseException as e:
            # Stop the pool: the coordinator refuses newcomers and stops handing out jobs; the actors that
            # signed in are killed (one may be busy in a long job), which ends Ray Data's execution.
            ray.get(coordinator.fail.remote(f"{type(e).__name__}: {e}"))
            data_log = logging.getLogger("ray.data")
            level = data_log.level
            data_log.setLevel(logging.CRITICAL)  # Ray Data would log the kills below as its own crash
            try:
                for actor in ray.get(coordinator.actors.remote()):
                    ray.kill(actor)
                stream.close(timeout=30)
                for actor in ray.get(coordinator.actors.remote()):  # any that signed in meanwhile
                    ray.kill(actor)
            finally:
                data_log.setLevel(level)
            raise
    if config.score != "self":
        s_ref = ray.put(s)  # broadcast once; every scoring actor reads this one object
        if stream is not None:
            coordinator.put.remote([s_ref])
        elif len(pos):
            stream = start_scoring(s_ref)

    # ── 4-5: scores, shard by shard ──
    t = time.perf_counter()
    scored = 0
    if stream is not None:
        bar = _Progress(len(pos), enabled=progress)
        try:
            scored = _collect(stream, todo, done, n, shard_size, parts, fingerprint, bar, on_shard)
        finally:
            bar.close()
            stream.close()  # after an error here (e.g. a full disk), stop scoring instead of running on
        missing = [k for k in todo if k not in done]
        if missing:
            raise IdtlError(f"scoring lost shards {missing[:5]}: re-run with --resume to score them")
    timings["scores_s"] = time.perf_counter() - t
    scores = np.concatenate([done[k] for k in range(n_shards)])
    if not np.isfinite(scores).all():
        raise IdtlError("non-finite scores: the model produces non-finite losses on some samples; check the inputs")
    return PipelineResult(scores, info, n_val, timings, shards_reused=n_shards - len(todo), samples_scored=scored,
                          actors=n_actors, device="cuda" if gpus else "cpu")


def _collect(stream: _Stream, todo: list[int], done: dict[int, np.ndarray], n: int, shard_size: int,
             parts: Path | None, fingerprint: str, bar: _Progress, on_shard: Callable[[int], None] | None) -> int:
    """Gather streamed scores into shards; save each shard as soon as it is complete. Returns #scored."""
    pending: dict[int, dict[int, float]] = {k: {} for k in todo}
    scored = 0
    for batch in stream:
        for p, d in zip(batch["pos"].tolist(), batch["delta_val_loss"].tolist()):
            k = p // shard_size
            if k not in pending or p in pending[k]:
                continue  # a retried task after an actor died: keep the first copy (its shard may be saved)
            pending[k][p] = d
            scored += 1
            bar.advance(1)
            size = min(n, (k + 1) * shard_size) - k * shard_size
            if len(pending[k]) == size:
                vals = np.array([pending[k][q] for q in range(k * shard_size, k * shard_size + size)])
                done[k] = vals
                del pending[k]
                if parts is not None:
                    _save_shard(parts, k, vals, fingerprint)
                if on_shard is not None:
                    on_shard(k)
    return scored


# ── shard checkpoints ─────────────────────────────────────────────────────────────────────────────


def _open_parts(parts: Path | None, fingerprint: str, resume: bool) -> dict[str, Any]:
    """Finished shards and s of an earlier run with the same fingerprint (resume), else a clean folder."""
    if parts is None:
        return {}
    manifest = parts / "run.json"
    if parts.exists() and not resume:
        shutil.rmtree(parts)  # a fresh run never mixes with an old one
    if resume and manifest.exists():
        old = json.loads(manifest.read_text())
        if old.get("fingerprint") != fingerprint:
            raise IdtlError(
                f"cannot resume: the unfinished run in {parts.parent} used other settings or data "
                f"(fingerprint {old.get('fingerprint')} != {fingerprint}); drop --resume to start over"
            )
    parts.mkdir(parents=True, exist_ok=True)
    if not manifest.exists():
        write_json_atomic({"fingerprint": fingerprint}, manifest)
    state: dict[str, Any] = {"shards": {}}
    sol = parts / "solution.npz"
    if resume and sol.exists():
        z = np.load(sol, allow_pickle=False)
        info = json.loads(str(z["info"]))
        state.update(s=z["s"], solve=SolveInfo(**info), n_val=int(z["n_val"]))
    if resume:
        for f in sorted(parts.glob("shard-*.parquet")):
            try:
                tbl = pq.read_table(f)
                meta = json.loads((tbl.schema.metadata or {}).get(b"idtl_ray_shard", b"{}"))
            except Exception:
                continue  # a damaged shard is simply scored again
            if meta.get("fingerprint") == fingerprint:
                state["shards"][int(meta["shard"])] = tbl["delta_val_loss"].to_numpy()
    return state


def _save_shard(parts: Path, k: int, scores: np.ndarray, fingerprint: str) -> None:
    tbl = pa.table({"delta_val_loss": scores.astype(np.float64)})
    tbl = tbl.replace_schema_metadata({b"idtl_ray_shard": json.dumps({"shard": k, "fingerprint": fingerprint}).encode()})
    atomic_write_table(tbl, parts / f"shard-{k:06d}.parquet")


def _save_solution(parts: Path, s: np.ndarray, info: SolveInfo, n_val: int, fingerprint: str) -> None:
    tmp = parts / "solution.tmp.npz"
    np.savez(tmp, s=s, info=json.dumps(info.as_dict()), n_val=n_val, fingerprint=fingerprint)
    os.replace(tmp, parts / "solution.npz")


# ── Ray session ───────────────────────────────────────────────────────────────────────────────────


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join a running cluster, or start an embedded local Ray, unless Ray is up already.

    ``address`` given: join it. ``RAY_ADDRESS`` set (inside `ray job submit`): join that. Otherwise
    start a fresh local Ray, never attaching by accident to another instance on the machine.
    """
    import logging

    import ray

    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR"}
    if address:
        kwargs["address"] = address
    elif not os.environ.get("RAY_ADDRESS"):
        kwargs["address"] = "local"
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)


@dataclass
class ScoreOutput:
    """What :func:`idtl_ray.score` returns."""

    scores: np.ndarray
    keep: np.ndarray
    solve: SolveInfo
    timings: dict[str, float] = field(default_factory=dict)
    mask_path: Path | None = None
