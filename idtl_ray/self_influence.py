"""Self-influence on the classification head, with an EK-FAC curvature (the default score, issue 10).

For a training sample z_i and the head's parameters θ_h = (W, b):

    self_influence_i = (1/n) · ∇θ_h L(z_i)ᵀ (G + λI)^-1 ∇θ_h L(z_i)

the first-order prediction of how much z_i's *own* loss rises when it is removed and the head re-fit
(Koh & Liang 2017 §5.4 rank training points by it to find mislabelled ones). High = the model fits the
sample only by bending towards it: a flipped label, or an outlier. Unlike the validation-loss score it
needs no validation set, so a noisy validation split cannot pull it towards the flipped samples.

By default only the head's bias is used (``head_params="bias"``): its per-sample gradient is δ_i and its
Gauss-Newton matrix is B = E[∂²L/∂z²] exactly, so the score is exact, and on noisy targets it found
flipped labels better than the whole head (benchmarks/bench_selection.py: the weight part adds each
sample's feature leverage, which ranks atypical but correct images high).

Why the head and why EK-FAC: the head's per-sample gradient is an outer product δ_i ⊗ f̃_i (δ = ∂L/∂logits,
f̃ = [features, 1]), and its Gauss-Newton matrix G = E[H_out ⊗ f̃f̃ᵀ] is close to the Kronecker product
B ⊗ A (B = E[H_out], A = E[f̃f̃ᵀ]; K-FAC). In the eigenbases of A and B the per-sample gradients
rotate cheaply, and re-fitting the diagonal there (EK-FAC, George et al. 2018; Grosse et al. 2023)
makes the inverse exact along those directions. Every score is then two small matmuls per batch: no
iterative solve, about the cost of one inference pass. Damping is relative to the curvature's scale,
λ = ``damping`` × mean eigenvalue, as Kronfluence does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, hessian, vmap

from .errors import InputError
from .layout import model_layout, runs_channels_last

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A per-sample loss: ``loss_fn(logits (B, K), labels (B,)) -> losses (B,)``."""


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default per-sample loss: softmax cross-entropy, one value per sample."""
    return F.cross_entropy(logits, y, reduction="none")


# ── non-finite values: name the tensor or the samples, not a solver (issue 11) ──────────────────────


def check_finite_model(model: nn.Module) -> None:
    """Refuse a model whose weights hold NaN or inf, naming the tensor; every score would be NaN.

    Parameters must be finite; buffers must not be NaN (an inf buffer can be deliberate, e.g. an
    attention mask). One pass over the weights, done once when an engine is built.
    """
    bad: list[tuple[str, int, int]] = []
    for kind, tensors in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in tensors:
            if t.is_meta or not t.is_floating_point():
                continue
            wrong = ~torch.isfinite(t) if kind == "parameter" else torch.isnan(t)
            k = int(wrong.sum())
            if k:
                bad.append((f"{kind} {name}", k, t.numel()))
    if bad:
        what, k, n = bad[0]
        more = f" (and {len(bad) - 1} more tensor{'s' if len(bad) > 2 else ''}: {', '.join(b[0] for b in bad[1:4])}" \
               f"{', ...' if len(bad) > 4 else ''})" if len(bad) > 1 else ""
        raise InputError(f"the model's {what} holds NaN or inf ({k} of {n} values){more}: the weights are corrupt or "
                         "come from a diverged training; check the weights file (or the run that wrote it) and load finite weights")


def _rows(bad: torch.Tensor, positions: Sequence[int] | None) -> str:
    """``17, 45 and 3 more``: the flagged rows, as dataset positions when known."""
    idx = bad.nonzero().flatten().tolist()
    names = [int(positions[i]) for i in idx] if positions is not None else idx
    shown = ", ".join(map(str, names[:5]))
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _samples(role: str, bad: torch.Tensor, positions: Sequence[int] | None) -> str:
    if positions is not None:
        return f"{role} samples {_rows(bad, positions)}"
    return f"rows {_rows(bad, None)} of a {role} batch"


def nonfinite_error(role: str, x: torch.Tensor, out: torch.Tensor | None = None,
                    positions: Sequence[int] | None = None) -> InputError:
    """The InputError for a batch that gave a non-finite result: which samples, and whether their inputs
    or only the model's outputs are to blame.

    ``x``: the batch's model inputs; ``out``: per-sample outputs (losses, logits or scores) that are
    non-finite somewhere; ``positions``: the samples' positions in the dataset (named in the message).
    Call it only after a non-finite result: it reads the whole batch.
    """
    if x.is_floating_point():
        bad_in = ~torch.isfinite(x.reshape(len(x), -1)).all(1)
        if bool(bad_in.any()):
            return InputError(f"{_samples(role, bad_in, positions)} hold NaN or inf inputs: check the input data "
                              "(corrupt images, or a normalisation that divides by a zero std)")
    if out is not None and out.numel():
        bad_out = ~torch.isfinite(out.reshape(len(out), -1)).all(1)
        if bool(bad_out.any()):
            return InputError(f"the model's outputs are NaN or inf on {_samples(role, bad_out, positions)} although their "
                              "inputs and the weights are finite (they overflow): check that the inputs are normalised "
                              "as the model expects and that the weights are the intended ones")
    where = f"{role} samples {positions[0]}..{positions[-1]}" if positions is not None and len(positions) else f"a {role} batch"
    return InputError(f"the loss or its gradient is NaN or inf on {where} although inputs, outputs and weights are "
                      "finite: check the loss function, the labels and the input data")


def head_module(model: nn.Module) -> nn.Linear:
    """The model's final Linear (``model.head_name`` for idtl-ray models, else its last Linear)."""
    name = getattr(model, "head_name", None)
    if name:
        return model.get_submodule(name)  # type: ignore[return-value]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise InputError("self-influence needs a final nn.Linear head: the model has none; use score='paper'")
    return linears[-1]


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's input (flattened) and the logits, in eval mode without gradients."""
    head = head_module(model)
    x = model_layout(x, runs_channels_last(model))  # convolutions run up to 2x faster (layout.py)
    got: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inp, out: got.extend((inp[0].detach().flatten(1), out.detach())))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        hook.remove()
    if not got:
        raise InputError("the model's head was not called in forward: self-influence needs the head to produce the logits")
    features, head_out = got[-2], got[-1]
    # the same tensor, or equal values (NaN included: a NaN input is reported by the caller, not as a head error)
    same = head_out.shape == logits.shape and (head_out.data_ptr() == logits.data_ptr()
                                                or torch.allclose(head_out, logits, rtol=0, atol=0, equal_nan=True))
    if not same:
        # e.g. the output layer registered before a hidden one: its features would be paired with the logits' gradient
        raise InputError(f"self-influence takes {type(head).__name__}({head.in_features}, {head.out_features}) as the head "
                         "(the model's last nn.Linear), but the model's output is not that layer's: set model.head_name to "
                         "the output layer's name, or use score='paper'")
    return features, logits


def _output_grads(logits: torch.Tensor, y: torch.Tensor, loss_fn: LossFn | None) -> tuple[torch.Tensor, torch.Tensor]:
    """δ = ∂L_i/∂logits_i and the per-sample output Hessians ∂²L_i/∂logits_i² (B, K, K)."""
    logits = logits.double()
    if loss_fn is None:  # softmax cross-entropy in closed form
        from .influence.inputs import check_labels  # late: influence imports this module

        check_labels(y, logits.shape[-1])  # a label of -1 would index the last class
        p = torch.softmax(logits, dim=-1)
        delta = p.clone()
        delta[torch.arange(len(y)), y] -= 1.0
        return delta, torch.diag_embed(p) - p[:, :, None] * p[:, None, :]

    def one(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return loss_fn(z[None], t[None]).sum()

    return vmap(grad(one))(logits, y), vmap(hessian(one))(logits, y)


def _inputs(f: torch.Tensor, head: nn.Linear, params: str) -> torch.Tensor:
    """f̃: what the head's per-sample gradient is δ ⊗ f̃ of: [features, 1] for the whole head, [1] for its bias."""
    ones = torch.ones(len(f), 1, dtype=torch.float64, device=f.device)
    if params == "bias":
        if head.bias is None:
            raise InputError("the head has no bias: use head_params='head' (self-influence over the whole head)")
        return ones
    return torch.cat([f.double(), ones], 1) if head.bias is not None else f.double()


@dataclass
class HeadFactors:
    """EK-FAC of the head's damped Gauss-Newton matrix: eigenbases and the inverse corrected eigenvalues."""

    ua: torch.Tensor      # (D', D') eigenvectors of A = E[f̃ f̃ᵀ]
    ub: torch.Tensor      # (K, K)  eigenvectors of B = E[∂²L/∂z²]
    inv: torch.Tensor     # (K, D') 1 / (Λ + λ), Λ the corrected eigenvalues
    damping: float        # λ actually used (absolute)
    n_samples: int
    params: str = "bias"  # bias: the head's bias only; head: its weight and bias

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Plain arrays (what goes into the object store)."""
        return {"ua": self.ua.cpu().numpy(), "ub": self.ub.cpu().numpy(), "inv": self.inv.cpu().numpy(),
                "damping": np.array(self.damping), "n_samples": np.array(self.n_samples), "params": np.array(self.params)}

    @classmethod
    def from_numpy(cls, d: dict[str, np.ndarray], device: torch.device | str = "cpu") -> HeadFactors:
        t = {k: torch.as_tensor(np.asarray(d[k]), device=device) for k in ("ua", "ub", "inv")}
        return cls(t["ua"], t["ub"], t["inv"], float(d["damping"]), int(d["n_samples"]), str(d["params"]))


def fit_head_factors(model: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]],
                     damping: float = 0.1, loss_fn: LossFn | None = None, params: str = "bias") -> HeadFactors:
    """EK-FAC factors of the head's curvature on ``batches`` of (model input, label).

    Two passes: the Kronecker factors A and B (and their eigenbases), then the eigenvalues re-fitted in
    those bases (the Gauss-Newton matrix's diagonal there). ``damping`` is relative to their mean.
    ``params="bias"`` (default) scores through the head's bias only: then A = [1] and the curvature is
    exactly B, so the inverse is exact; ``"head"`` uses the whole head (weight and bias).
    A batch may carry a third element, the samples' positions in the dataset, named when one of them
    gives NaN or inf (weights are checked first, see :func:`check_finite_model`).
    """
    if params not in ("bias", "head"):
        raise InputError(f"unknown head_params {params!r}: use bias or head")
    if not damping > 0:
        raise InputError(f"the self-influence damping must be > 0 (relative to the mean eigenvalue), got {damping}")
    from .influence import eval_mode  # late: influence imports this module

    check_finite_model(model)
    head = head_module(model)
    with eval_mode(model):
        cached = []
        a = b = None
        n = 0
        for batch in batches:
            x, y = batch[0], batch[1]
            f, logits = features_and_logits(model, x)
            # name the samples: a NaN here is no curvature problem (inputs too: an inf may saturate to finite outputs)
            if not bool(torch.isfinite(logits).all() & (torch.isfinite(x).all() if x.is_floating_point() else True)):
                raise nonfinite_error("training (curvature sample)", x, logits, batch[2] if len(batch) > 2 else None)
            f1 = _inputs(f, head, params)
            delta, h_out = _output_grads(logits, y, loss_fn)
            a = f1.T @ f1 if a is None else a + f1.T @ f1
            b = h_out.sum(0) if b is None else b + h_out.sum(0)
            n += len(y)
            cached.append((f1, h_out))
        if n == 0:
            raise InputError("the training set is empty: give at least one training sample")
        _, ua = torch.linalg.eigh(a / n)
        _, ub = torch.linalg.eigh(b / n)
        # Λ_ab = E_i[(u_bᵀ H_out,i u_b) (v_aᵀ f̃_i)²]: the Gauss-Newton matrix's diagonal in the Kronecker
        # eigenbasis, in closed form (Kronfluence estimates the same by sampling labels from the model).
        lam = sum(torch.einsum("nkl,kb,lb->nb", h, ub, ub).T @ ((f1 @ ua) ** 2) for f1, h in cached) / n  # type: ignore[union-attr]
    # >= 0 for a convex loss; a custom non-convex one (e.g. Brier on softmax) can give negative entries, and
    # with a small damping lam + λ then crosses zero: negative "self-influence", unbounded near the crossing
    lam = lam.clamp_min(0.0)
    lam_abs = damping * float(lam.mean())
    if not np.isfinite(lam_abs) or lam_abs <= 0:
        raise InputError("the head's curvature is zero or non-finite on the curvature sample: check the model's "
                         "outputs for NaN/inf, or fit the head first (--head new)")
    return HeadFactors(ua, ub, 1.0 / (lam + lam_abs), lam_abs, n, params)


def self_influence_batch(model: nn.Module, factors: HeadFactors, x: torch.Tensor, y: torch.Tensor, n_train: int,
                         loss_fn: LossFn | None = None, positions: Sequence[int] | None = None) -> np.ndarray:
    """(1/n_train) ∇L(z_i)ᵀ (G + λI)^-1 ∇L(z_i) over the head, for one batch; float64.

    A non-finite score raises :class:`InputError` naming the samples (``positions``: their places in
    the dataset, else their rows in the batch) and whether their inputs or the model's outputs are at fault.
    """
    from .influence import eval_mode

    head = head_module(model)
    with eval_mode(model):
        f, logits = features_and_logits(model, x)
    f1 = _inputs(f, head, factors.params).to(factors.ua.device)
    delta, _ = _output_grads(logits, y.to(logits.device), loss_fn)
    rb = (delta.to(factors.ub.device) @ factors.ub) ** 2          # (B, K)
    ra = (f1 @ factors.ua) ** 2                                  # (B, D')
    scores = ((rb @ factors.inv) * ra).sum(1) / n_train
    if not bool(torch.isfinite(scores).all() & (torch.isfinite(x).all() if x.is_floating_point() else True)):
        raise nonfinite_error("training", x, torch.cat([f.flatten(1), logits], 1), positions)
    return scores.cpu().numpy()
