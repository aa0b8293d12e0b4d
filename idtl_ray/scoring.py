"""Distributed influence scoring on Ray Data (design.md §3).

Stages:
  1. g_val        validation set → Ray Data blocks → ``gradient_sum_block`` tasks → partial sums, added up
                  on the driver (task workers outlive the stage, so a second run starts warm)
  2. s            one Ray task on a GPU when the cluster has one, else the driver, solves (H + λI) s = g_val
  3. broadcast    ``ray.put(s)`` once; every scoring actor reads the same object
  4. scores       training set → ``Scorer`` actor pool (one actor per GPU, CPU actors otherwise) → JVP scores;
                  on CPUs the pool starts *during* the solve and its actors wait for s in a ``SolutionBox``
  5. checkpoint   the driver writes each finished shard to ``parts/`` (Parquet, atomic), so ``resume``
                  skips finished shards; actor deaths are retried by Ray Data, duplicates are dropped
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
from .influence import InfluenceConfig, InfluenceEngine, SolveInfo, curvature_subsample, solve
from .mask import atomic_write_table, write_json_atomic


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


_ENGINES: dict[tuple[str, str, str], InfluenceEngine] = {}


def _cached_engine(model_ref: Any, params: Any) -> InfluenceEngine:
    """The engine of this worker process, built once per model: Ray reuses task workers across stages
    and runs, so only the first task in a process pays for unpickling the model (and importing torch)."""
    key = (_ref_key(model_ref), repr(params), str(_actor_device()))
    if key not in _ENGINES:
        _ENGINES.clear()  # one model per process: a new run's model replaces the old one
        _ENGINES[key] = InfluenceEngine(_get(model_ref), params=params, device=_actor_device())
    return _ENGINES[key]


def _ref_key(ref_or_value: Any) -> str:
    """A process-independent name for the model in the object store (its ObjectRef id)."""
    import ray

    return ref_or_value.hex() if isinstance(ref_or_value, ray.ObjectRef) else str(id(ref_or_value))


def gradient_sum_block(batch: dict[str, np.ndarray], *, model_ref: Any, params: Any, preprocess: Preprocess,
                       threads: int, classes: Sequence[int] | None, batch_size: int) -> dict[str, np.ndarray]:
    """Partial sum of validation-loss gradients over one block (optionally only chosen classes).

    Runs as a Ray Data *task*: task workers outlive the stage, so the next run's g_val starts warm.
    """
    torch.set_num_threads(max(1, threads))
    engine = _cached_engine(model_ref, params)
    x, y = batch["x"], batch["label"]
    if classes is not None:
        sel = np.isin(y, np.asarray(list(classes), dtype=np.int64))
        x, y = x[sel], y[sel]
    total = torch.zeros(engine.space.dim, dtype=torch.float64, device=engine.device)
    count = 0
    for i in range(0, len(y), batch_size):
        xb = preprocess(x[i:i + batch_size]).to(engine.device, engine.space.dtype)
        g, n = engine.gradient_sum(xb, torch.as_tensor(y[i:i + batch_size]).to(engine.device))
        total += g.double()
        count += n
    return {"grad": total.cpu().numpy()[None], "count": np.array([count], dtype=np.int64)}


class Scorer:
    """JVP scores of one batch against the broadcast solution s (a Ray Data actor: model loaded once).

    ``s_source`` is the ObjectRef of s, or a :class:`SolutionBox` that will hold it: then the actors
    start (import torch, load the model) while the driver is still solving, and wait for s on their
    first batch.
    """

    def __init__(self, model_ref: Any, params: Any, preprocess: Preprocess, threads: int,
                 s_source: Any, n_train: int, method: str = "jvp"):
        import ray

        if not isinstance(s_source, ray.ObjectRef):  # a SolutionBox: sign in, so a failed run can stop us
            if not ray.get(s_source.register.remote(ray.get_runtime_context().current_actor)):
                raise IdtlError("the scoring run this actor belongs to has failed already")
        torch.set_num_threads(max(1, threads))
        self.engine = InfluenceEngine(_get(model_ref), params=params, device=_actor_device())
        self.preprocess = preprocess
        self.s_source = s_source
        self.s: torch.Tensor | None = None
        self.n_train = n_train
        self.method = method

    def _solution(self) -> torch.Tensor:
        import ray

        if self.s is None:
            ref = self.s_source
            if not isinstance(ref, ray.ObjectRef):  # a SolutionBox handle: blocks until the driver has s
                ref = ray.get(ref.get.remote())[0]
            # Read-only zero-copy view from the object store; copy once so torch owns writable memory.
            self.s = torch.from_numpy(np.array(ray.get(ref), copy=True)).to(self.engine.device)
        return self.s

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s = self._solution()
        x = self.preprocess(batch["x"])
        d = self.engine.score_batch(x, batch["label"], s, self.n_train, method=self.method)  # type: ignore[arg-type]
        return {"pos": batch["pos"], "delta_val_loss": d.numpy()}


class SolutionBox:
    """Hands s to scoring actors that started before it existed (a Ray actor; ``get`` waits for ``put``).

    The actors sign in with ``register``, so that after a failed solve the driver can stop every one
    of them (``actors``), and one that starts later refuses to.
    """

    def __init__(self) -> None:
        import asyncio

        self._ready = asyncio.Event()
        self._value: Any = None
        self._actors: list[Any] = []

    async def register(self, actor: Any) -> bool:
        """Sign in a scoring actor; False when the run has failed already."""
        if self._ready.is_set() and isinstance(self._value, str):
            return False
        self._actors.append(actor)
        return True

    async def actors(self) -> list[Any]:
        """Handles of every actor that signed in."""
        return list(self._actors)

    async def put(self, boxed_ref: list[Any] | None, error: str | None = None) -> None:
        """``[ObjectRef of s]``, or an error message that makes every waiting actor fail."""
        self._value = boxed_ref if error is None else error
        self._ready.set()

    async def get(self) -> list[Any]:
        await self._ready.wait()
        if isinstance(self._value, str):
            raise IdtlError(self._value)
        return self._value


# ── stage 2: the solve, as one Ray task ───────────────────────────────────────────────────────────


def _solve_task(model: nn.Module, params: Any, preprocess: Preprocess, x: np.ndarray, y: np.ndarray,
                g: np.ndarray, config: InfluenceConfig) -> tuple[np.ndarray, SolveInfo]:
    engine = InfluenceEngine(model, params=params, device=_actor_device())
    data = TensorDataset(preprocess(x).to(engine.space.dtype), torch.as_tensor(y))
    op = engine.curvature(data, config.curvature, config.damping, samples=None, batch_size=config.batch_size)
    s, info = solve(op, torch.from_numpy(g).to(engine.device, torch.float64), config)
    return s.cpu().numpy(), info


# ── the pipeline ──────────────────────────────────────────────────────────────────────────────────


def _arrow(x: np.ndarray, y: np.ndarray, pos: np.ndarray) -> pa.Table:
    from ray.data.extensions import ArrowTensorArray

    return pa.table({"pos": pos.astype(np.int64), "x": ArrowTensorArray.from_numpy(np.ascontiguousarray(x)),
                     "label": y.astype(np.int64)})


def _blocks(x: np.ndarray, y: np.ndarray, pos: np.ndarray, rows: int) -> list[pa.Table]:
    # One Arrow table per block: Ray Data hands blocks to actors, so several blocks = parallel actors.
    return [_arrow(x[i:i + rows], y[i:i + rows], pos[i:i + rows]) for i in range(0, len(pos), rows)]


def _resources(actors: int | None) -> tuple[int, float, float, int]:
    """(actors, cpus per actor, gpus per actor, torch threads) for this cluster."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 1))
    if gpus > 0:
        n = actors or gpus
        # A GPU actor needs little CPU; asking for a whole one starves Ray Data (ray-2.60-notes P2).
        return n, 0.5, 1.0, 2
    n = actors or max(1, int(cpus) // 4)
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
    timings: dict[str, float] = {}
    n_actors, cpus, gpus, threads = _resources(actors)
    parts = Path(work_dir) / "parts" if work_dir is not None else None
    state = _open_parts(parts, fingerprint, resume)
    model = model.cpu()
    model_ref = ray.put(model)
    common = dict(model_ref=model_ref, params=params, preprocess=preprocess, threads=threads)
    n = len(train)
    n_shards = -(-n // shard_size)
    done: dict[int, np.ndarray] = dict(state.get("shards", {}))
    todo = [k for k in range(n_shards) if k not in done]
    pos = np.concatenate([np.arange(k * shard_size, min(n, (k + 1) * shard_size)) for k in todo]) if todo else np.zeros(0, np.int64)

    def start_scoring(s_source: Any) -> _Stream | None:
        """Start the scoring actor pool in the background (stage 4); batches arrive on the returned stream."""
        if not len(pos):
            return None
        block_rows = max(1, min(config.batch_size, -(-len(pos) // (2 * n_actors))))
        tds = ray.data.from_arrow(_blocks(train.x[pos], train.y[pos], pos, block_rows))
        out = tds.map_batches(Scorer, fn_constructor_kwargs={**common, "s_source": s_source, "n_train": n},
                              batch_size=config.batch_size, batch_format="numpy",
                              compute=ray.data.ActorPoolStrategy(size=n_actors), num_cpus=cpus, num_gpus=gpus or None)
        return _Stream(out)

    # ── 1-3: g_val, s (reused when resuming) ──
    stream: _Stream | None = None
    box: Any = None
    if state.get("s") is not None:
        s, info, n_val = state["s"], state["solve"], state["n_val"]
        timings["validation_gradient_s"] = timings["solve_s"] = 0.0
    else:
        t = time.perf_counter()
        vpos = np.arange(len(val))
        # Blocks hold whole batches, so every batch (and its fp32 gradient) is the one the in-process
        # engine would form; only the float64 sum over batches is split across workers.
        bs = config.batch_size
        per_block = max(1, -(-len(val) // (n_actors * bs))) * bs
        vds = ray.data.from_arrow(_blocks(val.x, val.y, vpos, per_block))
        sums = vds.map_batches(gradient_sum_block, fn_kwargs={**common, "classes": classes, "batch_size": bs},
                               batch_size=None, batch_format="numpy", compute=ray.data.TaskPoolStrategy(size=n_actors),
                               num_cpus=cpus, num_gpus=gpus or None)
        g, n_val = None, 0
        for row in sums.iter_rows():
            g = row["grad"].astype(np.float64) if g is None else g + row["grad"]
            n_val += int(row["count"])
        if n_val == 0:
            raise InputError(f"no validation sample belongs to classes {list(classes or [])}: "
                             "choose classes present in the validation set")
        timings["validation_gradient_s"] = time.perf_counter() - t
        t = time.perf_counter()
        sub = curvature_subsample(len(train), config.curvature_samples, config.seed)
        if gpus:  # one solve on a GPU worker; the scoring actors start after it, as they need its GPU
            task = ray.remote(_solve_task).options(num_cpus=1, num_gpus=1, max_retries=1)
            s, info = ray.get(task.remote(model_ref, params, preprocess, train.x[sub], train.y[sub], g, config))
        else:
            # CPU cluster: solve here while the scoring actors start (import torch, load the model) and
            # wait for s in a SolutionBox; that hides the pool's start-up behind the solve.
            if len(pos):
                box = ray.remote(SolutionBox).options(num_cpus=0).remote()
                stream = start_scoring(box)
            try:
                s, info = _solve_task(model, params, preprocess, train.x[sub], train.y[sub], g, config)
            except BaseException as e:
                if box is not None:  # the waiting actors fail at once, which ends the pool's execution
                    box.put.remote(None, error=f"the solve on the driver failed: {e}")
                if stream is not None:
                    stream.close()
                if box is not None:  # Ray Data may leave an actor that was still starting; stop them all
                    for actor in ray.get(box.actors.remote()):
                        ray.kill(actor)
                raise
        timings["solve_s"] = time.perf_counter() - t
        if parts is not None:
            _save_solution(parts, s, info, n_val, fingerprint)
    s_ref = ray.put(s)  # broadcast once; every scoring actor reads this one object
    if box is not None:
        box.put.remote([s_ref])
    else:
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
            if p in pending.get(k, {}):
                continue  # a retried task after an actor died: keep the first copy
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
