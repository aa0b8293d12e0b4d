"""The damped curvature (H + λI) as an operator, and the solvers for (H + λI)^-1 g: CG, LiSSA, exact."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.func import grad, jvp, vjp, vmap

from ..errors import InputError, SolverDivergedError
from .config import CurvatureKind, InfluenceConfig, SolveInfo
from .inputs import eval_mode

if TYPE_CHECKING:  # the engine builds these operators
    from .engine import InfluenceEngine


class CurvatureOperator:
    """v ↦ (H + λI) v, with H the GGN or the Hessian of the mean loss over fixed training batches."""

    def __init__(
        self,
        engine: InfluenceEngine,
        batches: list[tuple[torch.Tensor, torch.Tensor]],
        kind: CurvatureKind = "ggn",
        damping: float = 0.0,
    ):
        if kind not in ("ggn", "exact"):
            raise InputError(f"unknown curvature {kind!r}: use ggn or exact")
        self.engine = engine
        self.batches = batches
        self.kind = kind
        self.damping = damping
        self.n = sum(len(y) for _, y in batches)
        if self.n == 0:
            raise InputError("the training set is empty: give at least one training sample")
        self.matvecs = 0

    def batch_product(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Σ over the batch of (per-sample curvature) · v, without damping; flat in, flat out."""
        space = self.engine.space
        p, vd = space.params, space.unflatten(v)
        if self.kind == "ggn":
            def logits_fn(q: dict[str, torch.Tensor]) -> torch.Tensor:
                return self.engine.logits(q, x)

            logits, jv = jvp(logits_fn, (p,), (vd,))
            if self.engine.custom_loss:  # the loss's Hessian w.r.t. the logits, applied to J v (forward over reverse)
                def dloss(z: torch.Tensor) -> torch.Tensor:
                    return grad(lambda zz: self.engine.loss_fn(zz, y).sum())(z)

                _, hjv = jvp(dloss, (logits.detach(),), (jv,))
            else:
                prob = torch.softmax(logits, dim=-1)
                # Hessian of softmax cross-entropy w.r.t. logits: diag(p) - p pᵀ, applied to J v.
                hjv = prob * jv - prob * (prob * jv).sum(dim=-1, keepdim=True)
            _, pullback = vjp(logits_fn, p)
            (out,) = pullback(hjv)
        else:
            def loss_fn(q: dict[str, torch.Tensor]) -> torch.Tensor:
                return self.engine.loss_fn(self.engine.logits(q, x), y).sum()

            _, out = jvp(grad(loss_fn), (p,), (vd,))
        return space.flatten(out)

    def matvec(self, v: torch.Tensor, batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """(H + λI) v with H averaged over ``batches`` (default: all of this operator's batches).

        Products run in the model's dtype; the sum over batches and the result are in ``v``'s dtype
        (the solvers pass float64, so their recurrences do not lose precision in fp32).
        """
        batches = self.batches if batches is None else batches
        n = sum(len(y) for _, y in batches)
        acc = torch.zeros_like(v)
        vm = v.to(self.engine.space.dtype)
        with eval_mode(self.engine.model):
            for x, y in batches:
                acc = acc + self.batch_product(vm, x, y).to(v.dtype)
        self.matvecs += 1
        return acc / n + self.damping * v

    def dense(self, max_dim: int = 20_000) -> torch.Tensor:
        """The full (H + λI) as a dense matrix (exact solver, tests); only for small parameter counts."""
        dim = self.engine.space.dim
        if dim > max_dim:
            raise InputError(
                f"the exact solver needs a dense {dim}x{dim} matrix, too large (limit {max_dim}): "
                "use solver='cg' or 'lissa', or restrict params to fewer layers"
            )
        # float64 columns: matvec runs the products in the model's dtype and sums the batches in this one
        eye = torch.eye(dim, dtype=torch.float64, device=self.engine.device)
        space = self.engine.space
        laid_out, space.channels_last = space.channels_last, False  # vmap cannot change a tensor's layout
        try:
            cols = vmap(self.matvec, chunk_size=min(dim, 256))(eye)
        except Exception:  # some modules do not vmap; fall back to one product per column
            cols = torch.stack([self.matvec(e) for e in eye])
        finally:
            space.channels_last = laid_out
        return 0.5 * (cols + cols.T)  # symmetric up to rounding


# ── solvers ──────────────────────────────────────────────────────────────────────────────────────


def _diverged(solver: str, it: int, why: str, fix: str) -> SolverDivergedError:
    return SolverDivergedError(f"{solver} solver diverged at iteration {it} ({why}): {fix}")


GROWTH_PATIENCE = 20
"""CG's residual is not monotone: it is called diverged only after growing this many iterations in a row."""


def solve_cg(op: CurvatureOperator, g: torch.Tensor, max_iter: int = 100, tol: float = 1e-3) -> tuple[torch.Tensor, SolveInfo]:
    """Conjugate gradient for (H + λI) s = g, from s = 0. Needs a positive definite operator.

    CG's residual may rise for a while before it falls: CG minimises the error in the energy norm, which
    falls at every iteration, not the residual. So the last iterate is returned (the best in that norm)
    with its residual in the report, and the solve stops as diverged only on a non-finite product,
    negative curvature, or a residual that grew ``GROWTH_PATIENCE`` iterations in a row to more than
    100x its best (lost conjugacy, e.g. from noisy fp32 products).
    """
    g_norm = float(g.norm())
    x = torch.zeros_like(g)
    r = g.clone()
    p = r.clone()
    rs = float(r @ r)
    best_rel, rel, it, growing = 1.0, 1.0, 0, 0
    fix = ("raise the damping (e.g. x10) or max_iter" if op.kind == "ggn"
           else "use curvature='ggn' (positive semi-definite) and/or a larger damping")
    for it in range(1, max_iter + 1):
        ap = op.matvec(p)
        pap = float(p @ ap)
        if not math.isfinite(pap):
            raise _diverged("cg", it, "non-finite curvature product: check the model's outputs and the inputs for NaN/inf", fix)
        if pap <= 0:
            raise _diverged("cg", it, f"negative curvature pᵀ(H+λI)p = {pap:.3g}: the matrix is not positive definite", fix)
        alpha = rs / pap
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = float(r @ r)
        prev, rel = rel, math.sqrt(rs_new) / g_norm
        if not math.isfinite(rel):
            raise _diverged("cg", it, "non-finite residual", fix)
        best_rel = min(best_rel, rel)
        growing = growing + 1 if rel > prev else 0
        if growing >= GROWTH_PATIENCE and rel > 100 * best_rel:
            raise _diverged("cg", it, f"residual grew {growing} iterations in a row to {rel:.3g} (best {best_rel:.3g})", fix)
        if rel < tol:
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x, _finish("cg", x, g_norm, it, rel, tol, fix)


def solve_lissa(
    op: CurvatureOperator,
    g: torch.Tensor,
    max_iter: int = 1000,
    tol: float = 1e-3,
    scale: float = 10.0,
    seed: int = 0,
) -> tuple[torch.Tensor, SolveInfo]:
    """LiSSA (Agarwal et al. 2017): h ← g + h - (H_b + λI) h / scale, one curvature batch per step.

    With one batch (batch size >= curvature samples) it is a deterministic Richardson iteration, whose
    residual after k steps is (I - A/scale)^(k+1) g (A = H + λI): it converges when scale exceeds A's
    largest eigenvalue, and the residual can exceed |g| only if an eigenvalue passes 2 x scale, where it
    grows geometrically. So a final relative residual above 1 (measured on all batches) is divergence,
    not a slow solve. One batch stops once the step, which is exactly the residual, is below ``tol``.
    """
    g_norm = float(g.norm())
    h = g.clone()
    rng = np.random.default_rng(seed)
    order: list[int] = []
    fix = "raise lissa_scale (it must exceed the largest curvature eigenvalue) or the damping"
    it = 0
    for it in range(1, max_iter + 1):
        if not order:
            order = list(rng.permutation(len(op.batches)))
        batch = [op.batches[order.pop()]]
        h_new = g + h - op.matvec(h, batch) / scale
        h_norm = float(h_new.norm())
        if not math.isfinite(h_norm) or h_norm > 1e8 * g_norm * scale:
            raise _diverged("lissa", it, f"|h| = {h_norm:.3g}", fix)
        step_rel = float((h_new - h).norm()) / g_norm  # g - (H_b + λI) h/scale: the residual of h/scale on the batch
        h = h_new
        if len(op.batches) == 1 and step_rel < tol:
            break
    x = h / scale
    rel = float((op.matvec(x) - g).norm()) / g_norm
    if rel > 1:
        raise _diverged("lissa", it, f"relative residual {rel:.3g} > 1: the iteration grows", fix)
    return x, _finish("lissa", x, g_norm, it, rel, tol, fix)


def solve_exact(op: CurvatureOperator, g: torch.Tensor) -> tuple[torch.Tensor, SolveInfo]:
    """Dense solve in float64: the reference the iterative solvers are tested against."""
    a = op.dense().double()
    fix = "the curvature is singular: increase the damping"
    try:
        x = torch.linalg.solve(a, g.double())
    except torch.linalg.LinAlgError as e:  # cross-entropy's curvature always is, without damping
        raise _diverged("exact", 1, str(e).strip().splitlines()[0][:120], fix) from None
    rel = float((a @ x - g.double()).norm() / g.double().norm())
    x = x.to(g.dtype)
    return x, _finish("exact", x, float(g.norm()), 1, rel, 1e-6, fix)


def _finish(solver: str, x: torch.Tensor, g_norm: float, it: int, rel: float, tol: float, fix: str) -> SolveInfo:
    if not bool(torch.isfinite(x).all()) or not math.isfinite(rel):
        raise _diverged(solver, it, "non-finite solution", fix)
    converged = rel <= tol
    if not converged:
        warnings.warn(
            f"{solver} stopped at relative residual {rel:.2e} > tol {tol:.0e} after {it} iterations; "
            f"scores are approximate ({'raise max_iter or damping for a tighter solve' if rel < 1 else fix})",
            RuntimeWarning,
            stacklevel=3,
        )
    return SolveInfo(solver, it, rel, converged, g_norm, float(x.norm()))


def solve(op: CurvatureOperator, g: torch.Tensor, config: InfluenceConfig) -> tuple[torch.Tensor, SolveInfo]:
    """s = (H + λI)^-1 g with the solver ``config`` names."""
    if float(g.norm()) == 0.0:
        raise InputError(
            "the validation gradient is exactly zero (every validation sample is fit perfectly or the loss does not "
            "depend on the chosen parameters): choose other parameters or another validation set"
        )
    g64 = g.double()
    if config.solver == "cg":
        s, info = solve_cg(op, g64, config.max_iter, config.tol)
    elif config.solver == "lissa":
        s, info = solve_lissa(op, g64, config.max_iter, config.tol, config.lissa_scale, config.seed)
    else:
        s, info = solve_exact(op, g64)
    return s.to(g.dtype), info


def curvature_subsample(n: int, samples: int | None, seed: int) -> np.ndarray:
    """Sorted positions of the seeded curvature subsample (shared by the in-process and Ray paths)."""
    if samples is None or samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=samples, replace=False))
