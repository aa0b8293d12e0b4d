"""The pre-scoring worker: everything that needs the model before scoring, in one Ray task.

The paper's score needs s = (H + λI)⁻¹ g_val: the validation gradient, the curvature on a seeded
subsample and the iterative solve. Self-influence needs the head's EK-FAC factors instead. Either way
it is one task, on a GPU when the cluster has one, that runs the in-process engine's own code (so the
result is the in-process result) and returns its payload once; s travels in the model's dtype
(float32 for a float32 model). Ray retries the task if its worker dies (a lost node, an OOM kill).
"""

from __future__ import annotations

import _thread
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..errors import IdtlError, InputError
from ..influence import CurvatureOperator, InfluenceConfig, InfluenceEngine, SolveInfo, head_solve_info, solve
from ..self_influence import fit_head_factors
from .common import Preprocess, setup_worker, unwrap_ray_error

PRESCORE_RETRIES = 2  # a worker that dies (node lost, OOM kill) is restarted this often
WAIT_REPORT_S = 30.0  # "still working" line while the driver waits
PRESCORE_NAME = "idtl-prescore"


@dataclass
class Prescored:
    """What scoring needs: s (paper) or the head's factors (self), with the solve's report."""

    payload: Any  # np.ndarray s, or the dict of HeadFactors.to_numpy()
    solve: SolveInfo
    n_val: int
    timings: dict[str, float] = field(default_factory=dict)


def validation_gradient(engine: InfluenceEngine, preprocess: Preprocess, x: np.ndarray, y: np.ndarray,
                        classes: Sequence[int] | None, batch_size: int) -> tuple[torch.Tensor, int]:
    """Σ ∇θ L over the validation arrays (only ``classes`` when given), batch by batch as in-process.

    Preprocessing per batch keeps the worker's memory at one batch of floats, whatever the set's size.
    """
    wanted = None if classes is None else np.asarray(list(classes), dtype=np.int64)
    total = torch.zeros(engine.space.dim, dtype=torch.float64, device=engine.device)
    count = 0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        if wanted is not None:
            keep = np.isin(yb, wanted)
            xb, yb = xb[keep], yb[keep]
            if len(yb) == 0:
                continue
        g, n = engine.gradient_sum(preprocess(xb, engine.device).to(engine.device, engine.space.dtype),
                                   torch.as_tensor(yb).to(engine.device))
        total += g.double()
        count += n
    if count == 0:
        raise InputError(f"no validation sample belongs to classes {list(classes or [])}: "
                         "choose classes present in the validation set")
    return total, count


def curvature_on(engine: InfluenceEngine, preprocess: Preprocess, x: np.ndarray, y: np.ndarray,
                 config: InfluenceConfig) -> CurvatureOperator:
    """The damped curvature on the (already drawn) subsample ``x, y``, batched as in-process."""
    data = TensorDataset(preprocess(x).to(engine.space.dtype), torch.as_tensor(y))
    return engine.curvature(data, config.curvature, config.damping, samples=None, batch_size=config.batch_size)


def head_factors(model: nn.Module, preprocess: Preprocess, x: np.ndarray, y: np.ndarray,
                 config: InfluenceConfig, device: torch.device | None = None) -> dict[str, np.ndarray]:
    """EK-FAC factors of the head on the curvature subsample (self-influence)."""
    device = device or torch.device("cpu")
    model = model.to(device)
    bs = config.batch_size
    dtype = next(model.parameters()).dtype  # inputs passed through (no mean/std) may be uint8 or float64
    batches = ((preprocess(x[i:i + bs], device).to(device, dtype), torch.as_tensor(y[i:i + bs]).to(device))
               for i in range(0, len(y), bs))
    return fit_head_factors(model, batches, config.head_damping, params=config.head_params).to_numpy()


def _arrays(samples: Any) -> tuple[np.ndarray, np.ndarray]:
    """(x, y): as given, or gathered here from Ray Data (:class:`~idtl_ray.data.samples.RaySamples`)."""
    return samples.gather() if hasattr(samples, "gather") else samples


def prescore(model: nn.Module, params: Any, preprocess: Preprocess, sub: Any, val: Any, classes: Sequence[int] | None, config: InfluenceConfig,
             threads: int) -> Prescored:
    """The whole pre-scoring stage in this process: head factors (self), or g_val → curvature → s (paper)."""
    device = setup_worker(threads)
    t0 = time.perf_counter()
    sub, val = _arrays(sub), _arrays(val) if val is not None else None
    if config.score == "self":
        factors = head_factors(model, preprocess, *sub, config, device)
        return Prescored(factors, head_solve_info(), 0, {"validation_gradient_s": 0.0, "solve_s": time.perf_counter() - t0})
    engine = InfluenceEngine(model, params=params, device=device)
    if val is None:
        raise InputError("score='paper' needs a validation set: pass one, or use score='self'")
    g, n_val = validation_gradient(engine, preprocess, *val, classes, config.batch_size)
    t1 = time.perf_counter()
    s, info = solve(curvature_on(engine, preprocess, *sub, config), g, config)
    # Cast once, here: scoring uses s in the model's dtype, so anything wider is wasted on the wire.
    s_wire = s.to(engine.space.dtype).cpu().numpy()
    return Prescored(s_wire, info, n_val, {"validation_gradient_s": t1 - t0, "solve_s": time.perf_counter() - t1})


def start_prescore(model_ref: Any, params: Any, preprocess: Preprocess, sub: Any, val: Any,
                   classes: Sequence[int] | None, config: InfluenceConfig, *, say: Callable[[str], None],
                   gpu: bool | None = None, cpus: float | None = None) -> Any:
    """Submit :func:`prescore` as one Ray task (a GPU one when ``gpu``, or on a GPU cluster); its ObjectRef.

    Wait for it with :func:`wait_on_worker` (``name="idtl-prescore"``).
    """
    what = "head factors (EK-FAC)" if config.score == "self" else "validation gradient, curvature and solve"
    return start_on_worker(prescore, (model_ref, params, preprocess, sub, val, classes, config),
                           name=PRESCORE_NAME, say=say, what=what, gpu=gpu, cpus=cpus)


def single_worker(gpu: bool | None = None) -> tuple[bool, int]:
    """(GPU?, torch threads) of a task that runs alone, before the scoring pool.

    ``gpu``: as the scoring pool decided (declared ``--gpus``); None: whether the cluster has a GPU now.
    A GPU task takes one GPU. Otherwise the task asks Ray for one CPU (a whole free node may never
    come) and uses the cores of the largest node as threads.
    """
    import ray

    if gpu is None:
        gpu = ray.cluster_resources().get("GPU", 0) > 0
    if gpu:
        return True, 2
    return False, max([int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] + [1])


def run_on_worker(fn: Callable[..., Any], args: tuple[Any, ...], *, name: str, say: Callable[[str], None],
                  what: str, gpu: bool | None = None) -> Any:
    """Run ``fn(*args, threads=...)`` as one Ray task on :func:`single_worker`'s resources and wait for it.

    Errors come back with their own type and text; a worker that dies is retried by Ray; an
    interrupted wait cancels the task.
    """
    return wait_on_worker(start_on_worker(fn, args, name=name, say=say, what=what, gpu=gpu), name=name, say=say)


def start_on_worker(fn: Callable[..., Any], args: tuple[Any, ...], *, name: str, say: Callable[[str], None],
                    what: str, gpu: bool | None = None, cpus: float | None = None) -> Any:
    """Submit ``fn(*args, threads=...)`` as :func:`run_on_worker` does; return its ObjectRef at once.

    ``cpus``: the logical CPUs the task asks for, when not the usual one (half beside a GPU).
    """
    import ray

    gpu, threads = single_worker(gpu)
    # a GPU task's process must end with it (max_calls=1, which Ray sets only when num_gpus is given to the
    # decorator, not to .options): a reused process keeps its CUDA context and cached memory on the GPU a
    # scoring actor gets next, and keeps using its first GPU when Ray hands it another one
    task = (ray.remote(max_calls=1)(fn) if gpu else ray.remote(fn)).options(num_cpus=cpus if cpus is not None else (0.5 if gpu else 1), num_gpus=1 if gpu else 0,
                                  max_retries=PRESCORE_RETRIES, retry_exceptions=False, name=name)
    say(f"{what} on one {'GPU' if gpu else f'{threads}-thread CPU'} worker ...")
    return task.remote(*args, threads=threads)


def wait_on_worker(ref: Any, *, name: str, say: Callable[[str], None], report_s: float = WAIT_REPORT_S) -> Any:
    """Wait for a task :func:`start_on_worker` submitted; its errors as one clear exception."""
    import ray

    t0 = time.monotonic()
    try:
        while not ray.wait([ref], timeout=report_s)[0]:
            say(f"{name} still running ({time.monotonic() - t0:.0f} s)")
        return ray.get(ref)
    except BaseException as e:
        try:
            if not ray.wait([ref], timeout=0)[0]:  # interrupted: do not leave the task running
                ray.cancel(ref, force=True)
        except Exception:  # the driver lost Ray: the original error is what matters
            pass
        raise worker_error(e, name) from None


def worker_error(error: BaseException, name: str) -> BaseException:
    """The user-facing form of a pre-scoring task's failure (its own error, or one line about the worker)."""
    import ray

    inner = unwrap_ray_error(error)
    died = (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError, ray.exceptions.NodeDiedError)
    if isinstance(inner, died):  # more often than Ray retries
        return IdtlError(f"the {name} worker died {PRESCORE_RETRIES + 1} times ({type(inner).__name__}): "
                         "check the nodes' memory and `ray logs`, then re-run (score: with --resume)")
    if isinstance(inner, ray.exceptions.RayError):
        first = (str(inner).strip().splitlines() or [""])[0][:200]
        return IdtlError(f"the {name} task failed ({type(inner).__name__}: {first}); see `ray logs`, "
                         "then re-run (score: with --resume)")
    return inner


class PrescoreWaiter:
    """Waits, on a thread, for the pre-scoring task while the scoring actors start; saves its result.

    The actors receive the task's ObjectRef and block in their constructor until s is ready, so their
    start-up (import torch, load the model: ~12 s on 2 CPUs) overlaps the solve instead of following
    it. A failed task interrupts the main thread's pipeline, whose actors would only fail with it.
    ``parts``: the run's :class:`~idtl_ray.scoring.parts.RunParts`, where the result is saved.
    """

    def __init__(self, ref: Any, parts: Any, say: Callable[[str], None], interrupt: bool):
        self.ref, self.parts, self.say, self.interrupt = ref, parts, say, interrupt
        self.result: Prescored | None = None
        self.error: BaseException | None = None
        self.done_at = time.perf_counter()
        self._thread = threading.Thread(target=self._wait, name="idtl-prescore-wait", daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        try:
            pre = wait_on_worker(self.ref, name=PRESCORE_NAME, say=self.say)
            self.parts.save_prescored(pre)
            self.result = pre
            info, t = pre.solve, pre.timings
            self.say(f"pre-scoring: {info.solver}, {info.iterations} iterations, relative residual "
                     f"{info.relative_residual:.1e}, {t.get('validation_gradient_s', 0) + t.get('solve_s', 0):.1f} s")
        except BaseException as e:  # handed to the main thread
            self.error = e
            if self.interrupt:
                _thread.interrupt_main()
        finally:
            self.done_at = time.perf_counter()

    def failed(self, timeout: float = 10.0) -> bool:
        """After the pipeline stopped: whether the pre-scoring task failed (waits briefly for its verdict)."""
        self._thread.join(timeout if self.interrupt else 0.0)
        return self.error is not None

    def cancel(self) -> None:
        """Do not leave the task running when the run stops for another reason."""
        import ray

        try:
            if not ray.wait([self.ref], timeout=0)[0]:
                ray.cancel(self.ref, force=True)
        except Exception:  # the driver lost Ray: nothing to cancel
            pass

    def get(self) -> Prescored:
        """The pre-scoring result, or its error raised here."""
        self._thread.join()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def log(msg: str) -> None:
    """A progress line on stderr."""
    print(f"  {msg}", file=sys.stderr, flush=True)
