"""Influence engine: per-sample predicted change of the summed validation loss (docs/design.md §1-2).

Two scores (``InfluenceConfig.score``): ``self`` (the default: self-influence over the model's head,
:mod:`idtl_ray.self_influence`) and ``paper`` (delta_val_loss, :class:`InfluenceEngine`).

For training samples z_i (i = 1..n) and validation samples v_j, at the model's parameters θ̂:

    g_val = Σ_j ∇θ L(v_j)                        (validation_gradient; optionally chosen classes only)
    s     = (H + λI)^-1 g_val                    (solve; H = curvature of the mean training loss)
    delta_val_loss_i = (1/n) · s · ∇θ L(z_i)     (score_batch; JVP of the per-sample losses along s)

delta_val_loss_i predicts how the summed validation loss changes when z_i is removed and the model
re-fit: negative = removing z_i lowers validation loss (the paper drops those).

Everything runs with the model in eval mode (BatchNorm uses running statistics, dropout is off); the
model's previous mode is restored afterwards. Parameters are handled functionally with
``torch.func.functional_call``, so the user's module is never modified.

Modules: ``config`` (:class:`InfluenceConfig`, :class:`SolveInfo`), ``inputs`` (batches, labels, the chosen
parameters), ``solvers`` (the damped curvature operator; CG, LiSSA, exact), ``engine``
(:class:`InfluenceEngine`: the stages) and ``api`` (:func:`score_samples`, :func:`compute_influence`).
"""

from __future__ import annotations

from .api import InfluenceResult, compute_influence, head_solve_info, score_samples
from .config import CurvatureKind, InfluenceConfig, ParamSpec, ScoreKind, SolveInfo, Solver
from .engine import InfluenceEngine
from .inputs import ParamSpace, check_pairs, default_device, eval_mode, select_parameters
from .solvers import CurvatureOperator, curvature_subsample, solve, solve_cg, solve_exact, solve_lissa

__all__ = [
    "CurvatureKind", "CurvatureOperator", "InfluenceConfig", "InfluenceEngine", "InfluenceResult", "ParamSpace",
    "ParamSpec", "ScoreKind", "SolveInfo", "Solver", "check_pairs", "compute_influence", "curvature_subsample",
    "default_device", "eval_mode", "head_solve_info", "score_samples", "select_parameters", "solve", "solve_cg",
    "solve_exact", "solve_lissa",
]  # fmt: skip
