"""Influence engine: per-sample predicted change of the summed validation loss (docs/design.md §1-2).

Two scores (``InfluenceConfig.score``): ``self`` (the default: self-influence over the model's head,
:mod:`idtl_ray.self_influence`) and ``paper`` (delta_val_loss, below).

For training samples z_i (i = 1..n) and validation samples v_j, at the model's parameters θ̂:

    g_val = Σ_j ∇θ L(v_j)                        (validation_gradient; optionally chosen classes only)
    s     = (H + λI)^-1 g_val                    (solve; H = curvature of the mean training loss)
    delta_val_loss_i = (1/n) · s · ∇θ L(z_i)     (score_batch; JVP of the per-sample losses along s)

delta_val_loss_i predicts how the summed validation loss changes when z_i is removed and the model
re-fit: negative = removing z_i lowers validation loss (the paper drops those).

Everything runs with the model in eval mode (BatchNorm uses running statistics, dropout is off); the
model's previous mode is restored afterwards. Parameters are handled functionally with
``torch.func.functional_call``, so the user's module is never modified.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import InputError, SolverDivergedError
from .layout import model_layout, runs_channels_last
from .self_influence import (LossFn, check_finite_model, cross_entropy, fit_head_factors, nonfinite_error,
                             self_influence_batch)

Solver = Literal["cg", "lissa", "exact"]
ScoreKind = Literal["self", "paper"]
CurvatureKind = Literal["ggn", "exact"]
ParamSpec = None | int | Sequence[str]

__all__ = [
    "InfluenceConfig",
    "InfluenceResult",
    "InfluenceEngine",
    "CurvatureOperator",
    "SolveInfo",
    "score_samples",
    "solve",
]


@dataclass
class InfluenceConfig:
    """Settings of one influence computation; the same object drives the API, the CLI and the mask metadata."""

    score: ScoreKind = field(default="self", metadata={"help": "self: self-influence on the head (EK-FAC; finds mislabelled samples, no validation set needed); paper: delta_val_loss, the paper's validation-loss influence."})
    head_params: Literal["bias", "head"] = field(default="bias", metadata={"help": "Self-influence over the head's bias (default; exact curvature) or the whole head (weight and bias, EK-FAC)."})
    head_damping: float = field(default=0.1, metadata={"help": "Damping of the self-influence curvature, relative to its mean eigenvalue (Kronfluence's 0.1)."})
    solver: Solver = field(default="cg", metadata={"help": "Inverse-curvature solver: cg, lissa or exact (dense, small models)."})
    curvature: CurvatureKind = field(default="ggn", metadata={"help": "ggn (Gauss-Newton, PSD; default for nets) or exact (true Hessian)."})
    damping: float = field(default=0.1, metadata={"help": "λ in (H + λI)^-1: makes the system well posed; larger = smoother, more biased."})
    curvature_samples: int | None = field(default=512, metadata={"help": "Seeded subsample of training samples for the curvature; None = all."})
    max_iter: int = field(default=30, metadata={"help": "Iterations of cg, or of lissa (recursion depth)."})
    tol: float = field(default=1e-2, metadata={"help": "Stop when the relative residual |(H+λI)s - g| / |g| is below this."})
    lissa_scale: float = field(default=10.0, metadata={"help": "LiSSA scale; must exceed the largest curvature eigenvalue + λ."})
    batch_size: int = field(default=256, metadata={"help": "Samples per forward pass (memory vs speed)."})
    seed: int = field(default=0, metadata={"help": "Seed of the curvature subsample and LiSSA batch order."})

    def __post_init__(self) -> None:
        if self.score not in ("self", "paper"):
            raise InputError(f"unknown score {self.score!r}: use self (self-influence, the default) or paper (delta_val_loss)")
        if self.head_params not in ("bias", "head"):
            raise InputError(f"unknown --head-params {self.head_params!r}: use bias or head")
        if not (self.head_damping > 0 and math.isfinite(self.head_damping)):
            raise InputError(f"--head-damping must be a finite number > 0, got {self.head_damping}")
        if self.solver not in ("cg", "lissa", "exact"):
            raise InputError(f"unknown solver {self.solver!r}: use one of cg, lissa, exact")
        if self.curvature not in ("ggn", "exact"):
            raise InputError(f"unknown curvature {self.curvature!r}: use ggn or exact")
        if not (self.damping >= 0 and math.isfinite(self.damping)):
            raise InputError(f"--damping must be a finite number >= 0, got {self.damping}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_iter < 1:
            raise InputError(f"--max-iter must be >= 1, got {self.max_iter}")
        if self.curvature_samples is not None and self.curvature_samples < 1:
            raise InputError(f"--curvature-samples must be >= 1, or 0 for all of them (None in the API), got {self.curvature_samples}")
        if self.lissa_scale <= 0:
            raise InputError(f"--lissa-scale must be > 0, got {self.lissa_scale}")


@dataclass
class SolveInfo:
    """How a solve went: enough to judge whether the scores can be trusted."""

    solver: str
    iterations: int
    relative_residual: float
    converged: bool
    g_norm: float
    s_norm: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ── helpers ──────────────────────────────────────────────────────────────────────────────────────


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's previous mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was_training in modes:
            m.training = was_training


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _as_batches(data: Dataset, batch_size: int, role: str = "train") -> DataLoader:
    # Map-style dataset of (input, label); order preserved so scores line up with `train`.
    check_pairs(data, role)
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)


_INPUT_KEYS = ("image", "img", "pixel_values", "input", "inputs", "x", "features")
_LABEL_KEYS = ("label", "labels", "target", "targets", "y", "class")


def check_pairs(data: Dataset, role: str = "train") -> None:
    """Refuse a dataset whose items are not ``(input, label)`` pairs, saying how to adapt it.

    Reads ``data[0]`` only. Dict items (HuggingFace-style ``{"image": ..., "label": ...}``) are not
    guessed at: which key is the input is the user's call, so the message shows the wrapper with the
    likeliest keys. Inputs must be tensors or arrays (a PIL image needs a transform first).
    """
    if len(data) == 0:
        return
    item = data[0]
    if isinstance(item, Mapping):
        keys = [str(k) for k in item]
        xk = next((k for k in _INPUT_KEYS if k in keys), keys[0] if keys else "image")
        yk = next((k for k in _LABEL_KEYS if k in keys), next((k for k in keys if k != xk), "label"))
        raise InputError(
            f"{role}[0] is a dict with keys {keys}, but {role} must be a map-style dataset of (input, label) tuples: "
            f"wrap it in a Dataset whose __getitem__(i) returns ({role}[i]['{xk}'], {role}[i]['{yk}']) "
            f"(for a small set, the list [(d['{xk}'], d['{yk}']) for d in {role}] will do)")
    if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
        what = (f"a {type(item).__name__} of length {len(item)}" if isinstance(item, Sequence) and not isinstance(item, (str, bytes))
                else f"a {type(item).__module__.split('.')[0]}.{type(item).__name__}".replace("builtins.", ""))
        raise InputError(f"{role}[0] is {what}, but {role} must be a map-style dataset of (input, label) tuples: "
                         f"return (x, y) from __getitem__ (e.g. torch.utils.data.TensorDataset(x, y))")
    x = item[0]
    if not (torch.is_tensor(x) or isinstance(x, (np.ndarray, np.generic, int, float, list, tuple))):
        raise InputError(f"{role}[0]'s input is a {type(x).__module__}.{type(x).__name__}, not a tensor or array: "
                         "convert it in the dataset (for images, e.g. torchvision.transforms.ToTensor())")


def _finite_inputs(x: torch.Tensor) -> torch.Tensor:
    """Whether a batch's inputs are all finite, as a 0-d tensor (no host sync until the caller reads it)."""
    return torch.isfinite(x).all() if x.is_floating_point() else torch.ones((), dtype=torch.bool, device=x.device)


def _labels(y: Any) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise InputError(f"labels must be integers (class indices), got dtype {y.dtype}: convert them with int()")
    return y.long()


def _check_labels(y: torch.Tensor, num_outputs: int) -> None:
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_outputs:
        bad = lo if lo < 0 else hi
        raise InputError(
            f"label {bad} is outside the model's {num_outputs} outputs (valid: 0..{num_outputs - 1}): "
            "give the model a head with as many outputs as the dataset has classes, or fix the labels"
        )


def select_parameters(model: nn.Module, params: ParamSpec = None) -> list[str]:
    """Names of the parameters influence is computed over.

    ``None``: every trainable parameter. A sequence of module names (or parameter names): the
    trainable parameters under those. An int k: the parameters of the last k layers (conv/linear,
    see :func:`idtl_ray.models.layers`).
    """
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise InputError(
            "the model has no trainable parameters (all have requires_grad=False): "
            "unfreeze the layers to score with (p.requires_grad_(True)) or pass params=[module names]"
        )
    if params is None:
        return trainable
    if isinstance(params, int) and not isinstance(params, bool):
        from .models import last_k_layer_params

        names = [n for n in last_k_layer_params(model, params) if n in set(trainable)]
    else:
        if isinstance(params, str):
            params = [params]
        prefixes = list(params)
        # every name must select something: a typo beside a good name would otherwise be dropped silently
        unmatched = [p for p in prefixes if not any(n == p or n.startswith(p + ".") for n in trainable)]
        if unmatched:
            modules = sorted({n.rsplit(".", 1)[0] for n in trainable})
            raise InputError(
                f"params={unmatched} matches no trainable parameter: use module names of the model, e.g. {modules[-3:]}"
            )
        names = [n for n in trainable if any(n == p or n.startswith(p + ".") for p in prefixes)]
    if not names:
        raise InputError(f"params={params!r} selects no trainable parameter: choose other layers")
    return names


class ParamSpace:
    """The selected parameters as a dict (for torch.func) and as one flat vector (for solvers)."""

    def __init__(self, model: nn.Module, names: list[str], device: torch.device, channels_last: bool = False):
        named = dict(model.named_parameters())
        self.channels_last = channels_last  # layout.py: conv weights and tangents NHWC-strided, same values
        self.names = names
        self.shapes = [named[n].shape for n in names]
        self.sizes = [named[n].numel() for n in names]
        self.dim = sum(self.sizes)
        # channels-last copies of convolution weights; other tensors still share the model's memory
        self.params = {n: model_layout(named[n].detach().to(device), channels_last) for n in names}
        # Everything else (frozen/unselected parameters and buffers) is held fixed.
        chosen = set(names)
        self.fixed = {n: model_layout(p.detach().to(device), channels_last)
                      for n, p in model.named_parameters() if n not in chosen}
        self.fixed.update({n: b.to(device) for n, b in model.named_buffers()})
        self.dtype = next(iter(self.params.values())).dtype

    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """``v`` as a dict of parameter-shaped tensors, in the parameters' layout (a tangent's convolution
        parts are copied to channels-last, where the JVP is faster than with NCHW views)."""
        return {n: model_layout(t.view(shape), self.channels_last)
                for n, t, shape in zip(self.names, v.split(self.sizes), self.shapes)}

    def flatten(self, d: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([d[n].reshape(-1) for n in self.names])


# ── curvature ────────────────────────────────────────────────────────────────────────────────────


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
        eye = torch.eye(dim, dtype=self.engine.space.dtype, device=self.engine.device)
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

    With one batch (batch size >= curvature samples) it is a deterministic Richardson iteration.
    Converges when scale > largest eigenvalue of H + λI; the final residual is measured on all batches.
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
        step = float((h_new - h).norm()) / max(h_norm, 1e-300)
        h = h_new
        if len(op.batches) == 1 and step < tol * 1e-2:
            break
    x = h / scale
    rel = float((op.matvec(x) - g).norm()) / g_norm
    return x, _finish("lissa", x, g_norm, it, rel, tol, fix)


def solve_exact(op: CurvatureOperator, g: torch.Tensor) -> tuple[torch.Tensor, SolveInfo]:
    """Dense solve in float64: the reference the iterative solvers are tested against."""
    a = op.dense().double()
    x = torch.linalg.solve(a, g.double())
    rel = float((a @ x - g.double()).norm() / g.double().norm())
    x = x.to(g.dtype)
    fix = "the curvature is singular: increase the damping"
    return x, _finish("exact", x, float(g.norm()), 1, rel, 1e-6, fix)


def _finish(solver: str, x: torch.Tensor, g_norm: float, it: int, rel: float, tol: float, fix: str) -> SolveInfo:
    if not bool(torch.isfinite(x).all()) or not math.isfinite(rel):
        raise _diverged(solver, it, "non-finite solution", fix)
    converged = rel <= tol
    if not converged:
        warnings.warn(
            f"{solver} stopped at relative residual {rel:.2e} > tol {tol:.0e} after {it} iterations; "
            "scores are approximate (raise max_iter or damping for a tighter solve)",
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


# ── the engine ───────────────────────────────────────────────────────────────────────────────────


class InfluenceEngine:
    """Holds a model and the chosen parameters; computes g_val, the curvature, s and the scores.

    The stages are separate methods because the Ray pipeline runs them in different places
    (g_val as partial sums, s once, scores on an actor pool).
    """

    def __init__(self, model: nn.Module, params: ParamSpec = None, device: str | torch.device | None = None,
                 loss_fn: LossFn | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        # loss_fn(logits, labels) -> per-sample losses; None = softmax cross-entropy (closed-form GGN)
        self.loss_fn: LossFn = loss_fn or cross_entropy
        self.custom_loss = loss_fn is not None
        self.model = model.to(self.device)
        # NaN weights would surface as a "diverged" solver, which no damping can fix: name the tensor now
        check_finite_model(self.model)
        # layout.py: channels-last for idtl-ray's own architectures only
        self.space = ParamSpace(model, select_parameters(model, params), self.device, runs_channels_last(model))
        self.num_outputs: int | None = None

    @property
    def channels_last(self) -> bool:
        """Whether batches (and the weight copies and tangents) are laid out channels-last (layout.py)."""
        return self.space.channels_last

    # the model as a pure function of the selected parameters
    def logits(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.model, {**self.space.fixed, **params}, (x,))
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise InputError("the model must return logits of shape (batch, classes): wrap it so forward returns a tensor")
        return out

    def _prepare(self, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = model_layout(torch.as_tensor(x).to(self.device, dtype=self.space.dtype), self.channels_last)
        # a custom loss may take any targets (regression values, soft labels); cross-entropy needs class indices
        y = torch.as_tensor(y).to(self.device) if self.custom_loss else _labels(y).to(self.device)
        return x, y

    def _check(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.num_outputs = logits.shape[-1]
        if not self.custom_loss:
            _check_labels(y, self.num_outputs)

    def validation_gradient(
        self, val: Dataset, classes: Sequence[int] | None = None, batch_size: int = 256
    ) -> tuple[torch.Tensor, int]:
        """Σ_j ∇θ L(v_j) over the validation set (only samples of ``classes`` when given).

        Returns the flat float64 gradient and the number of samples it sums over. A sum, so partial sums
        from several workers add up to the same vector.
        """
        if len(val) == 0:
            raise InputError("the validation set is empty: pass a validation set with at least one sample")
        wanted = None if classes is None else torch.as_tensor(list(classes), dtype=torch.long, device=self.device)
        # float64 accumulator: the sum must not depend on how the set is split into batches or workers.
        total = torch.zeros(self.space.dim, dtype=torch.float64, device=self.device)
        count = 0
        with eval_mode(self.model):
            for b, (xb, yb) in enumerate(_as_batches(val, batch_size, "val")):
                x, y = self._prepare(xb, yb)
                pos = np.arange(b * batch_size, b * batch_size + len(y))
                if wanted is not None:
                    keep = torch.isin(y, wanted)
                    x, y, pos = x[keep], y[keep], pos[keep.cpu().numpy()]
                    if len(y) == 0:
                        continue
                g, n = self.gradient_sum(x, y, positions=pos)
                total += g.double()
                count += n
        if count == 0:
            raise InputError(
                f"no validation sample belongs to classes {list(classes or [])}: choose classes present in the validation set"
            )
        return total, count

    def gradient_sum(self, x: torch.Tensor, y: torch.Tensor, *,
                     positions: Sequence[int] | None = None) -> tuple[torch.Tensor, int]:
        """Σ over one batch of ∇θ L; the partial sum a Ray worker returns.

        A non-finite sum raises :class:`InputError` naming the validation samples (``positions``: their
        places in the validation set, else their rows in the batch) and whether inputs or outputs are at fault.
        """
        x = model_layout(x, self.channels_last)

        def loss_fn(q: dict[str, torch.Tensor]) -> torch.Tensor:
            logits = self.logits(q, x)
            self._check(logits, y)
            return self.loss_fn(logits, y).sum()

        with eval_mode(self.model):
            g = self.space.flatten(grad(loss_fn)(self.space.params))
            # inputs too: an inf input can give finite outputs (a saturated tanh) and still be a data error
            if not bool(torch.isfinite(g).all() & _finite_inputs(x)):  # one sync; diagnosed only on failure
                raise self._nonfinite("validation", x, y, positions)
        return g, len(y)

    def _nonfinite(self, role: str, x: torch.Tensor, y: torch.Tensor, positions: Sequence[int] | None) -> InputError:
        """The error for a batch with a non-finite result: names its samples and what is at fault."""
        with torch.no_grad():
            out = self.logits(self.space.params, x) if bool(torch.isfinite(x).all()) else None
            if out is not None and bool(torch.isfinite(out).all()):
                out = self.loss_fn(out, y)  # finite logits: is it the loss?
        return nonfinite_error(role, x, out, positions)

    def curvature(
        self,
        train: Dataset,
        kind: CurvatureKind = "ggn",
        damping: float = 0.1,
        samples: int | None = 512,
        seed: int = 0,
        batch_size: int = 256,
    ) -> CurvatureOperator:
        """The damped curvature on ``train`` or a seeded subsample of ``samples`` of it, batches held in memory."""
        if len(train) == 0:
            raise InputError("the training set is empty: give at least one training sample")
        data: Dataset = train
        positions = np.arange(len(train))  # of the curvature samples in `train`: named when one is not finite
        if samples is not None and samples < len(train):
            positions = curvature_subsample(len(train), samples, seed)
            data = Subset(train, positions.tolist())
        batches = []
        for xb, yb in _as_batches(data, batch_size):
            batches.append(self._prepare(xb, yb))
        # Labels and finiteness once, up front, not inside the solver loop: one forward pass over the
        # (small) curvature sample, so that a NaN input or output is named here instead of being
        # reported by the solver as divergence.
        with eval_mode(self.model), torch.no_grad():
            start = 0
            for x, y in batches:
                logits = self.logits(self.space.params, x)
                self._check(logits, y)
                if not bool(torch.isfinite(self.loss_fn(logits, y)).all() & _finite_inputs(x)):
                    raise self._nonfinite("training (curvature sample)", x, y, positions[start:start + len(y)])
                start += len(y)
        return CurvatureOperator(self, batches, kind, damping)

    def score_batch(
        self, x: Any, y: Any, s: torch.Tensor, n_train: int, method: Literal["jvp", "grad"] = "jvp", *,
        positions: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """delta_val_loss for one batch: (1/n_train) ∇θ L(z_i)·s, float64 on the CPU.

        ``jvp``: the directional derivative of the per-sample losses along s, in one forward-mode pass
        (about 3x inference, no per-sample gradient stored). ``grad``: per-sample gradients with
        vmap(grad) dotted with s, the slow exact reference. A non-finite score raises
        :class:`InputError` naming the samples (``positions`` in the training set, else rows of the batch).
        """
        x, y = self._prepare(x, y)
        sd = self.space.unflatten(s.to(self.device, self.space.dtype))
        with eval_mode(self.model), torch.no_grad():
            if method == "jvp":
                def losses(q: dict[str, torch.Tensor]) -> torch.Tensor:
                    logits = self.logits(q, x)
                    self._check(logits, y)
                    return self.loss_fn(logits, y)

                _, d = jvp(losses, (self.space.params,), (sd,))
            elif method == "grad":
                with torch.no_grad():
                    self._check(self.logits(self.space.params, x[:1]), y)

                def loss1(q: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
                    return self.loss_fn(self.logits(q, xi[None]), yi[None]).sum()

                gs = vmap(grad(loss1), in_dims=(None, 0, 0))(self.space.params, x, y)
                d = sum((gs[n].flatten(1) @ sd[n].reshape(-1)) for n in self.space.names)
            else:
                raise InputError(f"unknown scoring method {method!r}: use jvp or grad")
            if not bool(torch.isfinite(d).all() & _finite_inputs(x)):
                raise self._nonfinite("training", x, y, positions)
        return d.detach().double().cpu() / n_train

    def score_dataset(
        self, train: Dataset, s: torch.Tensor, batch_size: int = 256, method: Literal["jvp", "grad"] = "jvp",
        n_train: int | None = None,
    ) -> np.ndarray:
        """Scores of every sample of ``train``, in its order."""
        n = len(train) if n_train is None else n_train
        out = [self.score_batch(xb, yb, s, n, method, positions=range(b * batch_size, b * batch_size + len(yb)))
               for b, (xb, yb) in enumerate(_as_batches(train, batch_size))]
        return torch.cat(out).numpy() if out else np.zeros(0)


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
    import time

    config = config or InfluenceConfig()
    if len(train) == 0:
        raise InputError("the training set is empty: give at least one training sample")
    if config.score == "self":
        if params is not None:  # silently scoring other parameters than asked would mislead
            raise InputError("params chooses the parameters of score='paper'; self-influence always uses the model's "
                             "head (head_params='bias' or 'head'): pass score='paper' or leave params out")
        return _self_influence(model, train, config, device, loss_fn)
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
        for b, (xb, yb) in enumerate(_as_batches(data, bs)):
            yield (torch.as_tensor(xb).to(dev, dtype), (torch.as_tensor(yb) if loss_fn else _labels(yb)).to(dev),
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
) -> InfluenceResult:
    """Score every training sample; returns the scores with the report of how they were made.

    Args:
        model: any ``nn.Module`` mapping a batch of inputs to logits; scored in eval mode, restored after.
        train, val: map-style datasets of ``(input, label)`` tuples (``val`` is needed for ``score="paper"``
            only). Dict items (e.g. a HuggingFace ``{"image": ..., "label": ...}`` dataset) are refused
            with an :class:`InputError` naming the wrapper to write: a Dataset whose ``__getitem__(i)``
            returns ``(ds[i]["image"], ds[i]["label"])``; which key holds the input is not guessed.
        score: ``self`` (default): self-influence on the model's final Linear with an EK-FAC curvature;
            high = likely mislabelled or an outlier. ``paper``: delta_val_loss, the predicted change of the
            summed validation loss when the sample is removed (negative = removing it helps).
        loss_fn: per-sample loss ``loss_fn(logits, labels) -> (batch,)``; default softmax cross-entropy.
        solver: ``cg`` (default), ``lissa`` or ``exact`` (dense; small models only); paper score only.
        damping: λ added to the curvature (paper score); ``head_damping``: relative λ of self-influence.
        batch_size: samples per forward pass.
        device: defaults to CUDA when available.
        classes: score against validation samples of these classes only (paper §4.4).
        params: None (all trainable), module names, or an int k (the last k layers); paper score only.
        curvature: ``ggn`` (Gauss-Newton; default) or ``exact`` (Hessian).
        curvature_samples: seeded subsample size for the curvature (None = all of ``train``).
        method: ``jvp`` (fast) or ``grad`` (per-sample gradients; the reference).

    Returns:
        :class:`InfluenceResult`: ``.scores`` (float64, in the order of ``train``), ``.solve`` (iterations,
        relative residual, converged), ``.harm`` (higher = drop first) and timings; ``np.asarray(result)``
        gives the scores.
    """
    config = InfluenceConfig(
        score=score, solver=solver, curvature=curvature, damping=damping, head_damping=head_damping,
        curvature_samples=curvature_samples, max_iter=max_iter, tol=tol, lissa_scale=lissa_scale,
        batch_size=batch_size, seed=seed,
    )
    return compute_influence(model, train, val, config, device=device, classes=classes, params=params, method=method,
                             loss_fn=loss_fn)
