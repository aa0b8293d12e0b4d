"""The public calls: :func:`score_samples` (scores with their solve report) and :func:`compute_influence`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ..errors import InputError, SolverDivergedError
from ..self_influence import LossFn, fit_head_factors, self_influence_batch
from .config import CurvatureKind, InfluenceConfig, ParamSpec, ScoreKind, SolveInfo, Solver
from .engine import InfluenceEngine
from .inputs import as_batches, default_device, label_tensor
from .solvers import curvature_subsample, solve


@dataclass
class InfluenceResult:
    """Scores plus what produced them (written beside the mask); ``np.asarray(result)`` is the scores.

    ``score`` names what ``scores`` holds: ``self`` = self-influence (high = likely mislabelled or an
    outlier; drop the highest), ``paper`` = delta_val_loss (negative = removing it lowers the summed
    validation loss; drop the lowest).
    """

    scores: np.ndarray
    solve: SolveInfo
    config: InfluenceConfig
    n_val: int
    n_params: int
    timings: dict[str, float] = field(default_factory=dict)
    score: ScoreKind = "paper"

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return self.scores if dtype is None else self.scores.astype(dtype)

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def harm(self) -> np.ndarray:
        """The scores oriented so that higher = drop first, whichever score was computed."""
        return self.scores if self.score == "self" else -self.scores


def head_solve_info() -> SolveInfo:
    """The solve report of a self-influence run: EK-FAC is a direct inverse, so it is exact by construction."""
    return SolveInfo("ekfac-head", 0, 0.0, True, 0.0, 0.0)


def compute_influence(
    model: nn.Module,
    train: Dataset,
    val: Dataset | None = None,
    config: InfluenceConfig | None = None,
    *,
    device: str | torch.device | None = None,
    classes: Sequence[int] | None = None,
    params: ParamSpec = None,
    method: Literal["jvp", "grad"] = "jvp",
    loss_fn: LossFn | None = None,
) -> InfluenceResult:
    """The whole in-process computation with its diagnostics: self-influence, or g_val → s → scores."""
    config = config or InfluenceConfig()
    if len(train) == 0:
        raise InputError("the training set is empty: give at least one training sample")
    if config.score == "self":  # options of the paper's score would be silently ignored: refused instead
        if params is not None:
            raise InputError("params chooses the parameters of score='paper'; self-influence always uses the model's "
                             "head (head_params='bias' or 'head'): pass score='paper' or leave params out")
        if classes:
            raise InputError("classes picks the validation samples of score='paper'; self-influence uses no "
                             "validation set: pass score='paper' or leave classes out")
        if method != "jvp":
            raise InputError(f"method={method!r} chooses how score='paper' takes its gradient products; "
                             "self-influence has its own: pass score='paper' or leave method out")
        return _on_callers_device(model, lambda: _self_influence(model, train, config, device, loss_fn))
    return _on_callers_device(model, lambda: _paper_score(model, train, val, config, device, classes, params, method,
                                                          loss_fn))


def _on_callers_device(model: nn.Module, run: Callable[[], InfluenceResult]) -> InfluenceResult:
    """``run()``, then the model goes back to the device it came on (scoring moves it, in place)."""
    first = next(model.parameters(), None)
    try:
        return run()
    finally:
        if first is not None:
            model.to(first.device)


def _paper_score(model: nn.Module, train: Dataset, val: Dataset | None, config: InfluenceConfig, device: Any,
                 classes: Sequence[int] | None, params: ParamSpec, method: Literal["jvp", "grad"],
                 loss_fn: LossFn | None) -> InfluenceResult:
    """g_val → s → scores: the paper's delta_val_loss."""
    import time

    if val is None:
        raise InputError("score='paper' needs a validation set (delta_val_loss is the change of its summed loss): "
                         "pass val, or use score='self', which needs none")
    engine = InfluenceEngine(model, params=params, device=device, loss_fn=loss_fn)
    t = {"start": time.perf_counter()}
    g, n_val = engine.validation_gradient(val, classes=classes, batch_size=config.batch_size)
    t["validation_gradient"] = time.perf_counter()
    op = engine.curvature(train, config.curvature, config.damping, config.curvature_samples, config.seed, config.batch_size)
    s, info = solve(op, g, config)
    t["solve"] = time.perf_counter()
    scores = engine.score_dataset(train, s, config.batch_size, method)
    t["scores"] = time.perf_counter()
    if not np.isfinite(scores).all():
        raise SolverDivergedError("non-finite scores: the model produces non-finite losses on some training samples; check the inputs")
    stages = ["start", "validation_gradient", "solve", "scores"]
    timings = {b: t[b] - t[a] for a, b in zip(stages, stages[1:])}
    return InfluenceResult(scores, info, config, n_val, engine.space.dim, timings, score="paper")


def _self_influence(model: nn.Module, train: Dataset, config: InfluenceConfig, device: Any,
                    loss_fn: LossFn | None) -> InfluenceResult:
    import time

    dev = torch.device(device) if device is not None else default_device()
    model = model.to(dev)
    dtype = next(model.parameters()).dtype

    bs = config.batch_size

    def batches(data: Dataset, positions: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        """(x, y, the samples' positions in ``train``: named if one of them is not finite)."""
        for b, (xb, yb) in enumerate(as_batches(data, bs)):
            yield (torch.as_tensor(xb).to(dev, dtype), (torch.as_tensor(yb) if loss_fn else label_tensor(yb)).to(dev),
                   positions[b * bs:b * bs + len(yb)])

    t0 = time.perf_counter()
    sub = curvature_subsample(len(train), config.curvature_samples, config.seed)
    factors = fit_head_factors(model, batches(Subset(train, sub.tolist()), sub), config.head_damping, loss_fn,
                               config.head_params)
    t1 = time.perf_counter()
    scores = np.concatenate([self_influence_batch(model, factors, x, y, len(train), loss_fn, positions=pos)
                             for x, y, pos in batches(train, np.arange(len(train)))])
    t2 = time.perf_counter()
    if not np.isfinite(scores).all():
        raise SolverDivergedError("non-finite self-influence: the model produces non-finite outputs on some training "
                                  "samples; check the inputs and weights for NaN/inf")
    n_params = int(factors.inv.numel())
    return InfluenceResult(scores, head_solve_info(), config, 0, n_params,
                           {"curvature": t1 - t0, "scores": t2 - t1}, score="self")


def score_samples(
    model: nn.Module,
    train: Dataset,
    val: Dataset | None = None,
    *,
    score: ScoreKind = "self",
    loss_fn: LossFn | None = None,
    solver: Solver = "cg",
    damping: float = 0.1,
    head_damping: float = 0.1,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    classes: Sequence[int] | None = None,
    params: ParamSpec = None,
    curvature: CurvatureKind = "ggn",
    curvature_samples: int | None = 512,
    max_iter: int = 30,
    tol: float = 1e-2,
    lissa_scale: float = 10.0,
    seed: int = 0,
    method: Literal["jvp", "grad"] = "jvp",
    head_params: Literal["bias", "head"] = "bias",
) -> InfluenceResult:
    """Score every training sample; returns the scores with the report of how they were made.

    Args:
        model: any ``nn.Module`` mapping a batch of inputs to logits; scored in eval mode, restored after.
        train, val: map-style datasets of ``(input, label)`` tuples (``val`` is needed for ``score="paper"``
            only). Dict items (e.g. a HuggingFace ``{"image": ..., "label": ...}`` dataset) are refused
            with an :class:`InputError` naming the wrapper to write: a Dataset whose ``__getitem__(i)``
            returns ``(ds[i]["image"], ds[i]["label"])``; which key holds the input is not guessed.
        score: ``self`` (default): self-influence through the model's final Linear (``head_params``);
            high = likely mislabelled or an outlier. ``paper``: delta_val_loss, the predicted change of the
            summed validation loss when the sample is removed (negative = removing it helps).
        loss_fn: per-sample loss ``loss_fn(logits, labels) -> (batch,)``; default softmax cross-entropy.
        solver: ``cg`` (default), ``lissa`` or ``exact`` (dense; small models only); paper score only.
        damping: λ added to the curvature (paper score); ``head_damping``: relative λ of self-influence.
        batch_size: samples per forward pass.
        device: defaults to CUDA when available.
        classes: score against validation samples of these classes only (paper §4.4); paper score only.
        params: None (all trainable), module names, or an int k (the last k layers); paper score only.
        curvature: ``ggn`` (Gauss-Newton; default) or ``exact`` (Hessian).
        curvature_samples: seeded subsample size for the curvature (None = all of ``train``).
        method: ``jvp`` (fast) or ``grad`` (per-sample gradients; the reference); paper score only.
        head_params: self-influence over the head's ``bias`` (default: its curvature is exact) or the whole
            ``head`` (weight and bias, EK-FAC curvature).

    Returns:
        :class:`InfluenceResult`: ``.scores`` (float64, in the order of ``train``), ``.solve`` (iterations,
        relative residual, converged), ``.harm`` (higher = drop first) and timings; ``np.asarray(result)``
        gives the scores.
    """
    config = InfluenceConfig(
        score=score, solver=solver, curvature=curvature, damping=damping, head_damping=head_damping,
        curvature_samples=curvature_samples, max_iter=max_iter, tol=tol, lissa_scale=lissa_scale,
        batch_size=batch_size, seed=seed, head_params=head_params,
    )
    return compute_influence(model, train, val, config, device=device, classes=classes, params=params, method=method,
                             loss_fn=loss_fn)
