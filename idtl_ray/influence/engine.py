"""The engine: g_val, the curvature, s and the per-sample scores, as separate stages the Ray pipeline runs apart."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.utils.data import Dataset, Subset

from ..errors import InputError
from ..layout import model_layout, runs_channels_last
from ..self_influence import LossFn, check_finite_model, cross_entropy, nonfinite_error
from .config import CurvatureKind, ParamSpec
from .inputs import (ParamSpace, as_batches, check_labels, default_device, eval_mode, finite_inputs, label_tensor,
                     select_parameters)
from .solvers import CurvatureOperator, curvature_subsample


def per_sample_checked(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` refusing a result that is not one loss per sample: a mean would divide the validation
    gradient and the curvature by the batch size (silently wrong scores), a (B, 1) shape gives 2-D scores."""

    def checked(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = loss_fn(logits, y)
        if tuple(out.shape) != tuple(y.shape[:1]):
            raise InputError(f"loss_fn returned shape {tuple(out.shape)} for a batch of {y.shape[0]}: it must return "
                             "one loss per sample, shape (batch,) (e.g. cross_entropy(..., reduction='none'))")
        return out

    return checked


class InfluenceEngine:
    """Holds a model and the chosen parameters; computes g_val, the curvature, s and the scores.

    The stages are separate methods because the Ray pipeline runs them in different places
    (g_val as partial sums, s once, scores on an actor pool).
    """

    def __init__(self, model: nn.Module, params: ParamSpec = None, device: str | torch.device | None = None,
                 loss_fn: LossFn | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        # loss_fn(logits, labels) -> per-sample losses; None = softmax cross-entropy (closed-form GGN)
        self.loss_fn: LossFn = per_sample_checked(loss_fn) if loss_fn is not None else cross_entropy
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
        y = torch.as_tensor(y).to(self.device) if self.custom_loss else label_tensor(y).to(self.device)
        return x, y

    def _check(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.num_outputs = logits.shape[-1]
        if not self.custom_loss:
            check_labels(y, self.num_outputs)

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
            for b, (xb, yb) in enumerate(as_batches(val, batch_size, "val")):
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
            if not bool(torch.isfinite(g).all() & finite_inputs(x)):  # one sync; diagnosed only on failure
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
        for xb, yb in as_batches(data, batch_size):
            batches.append(self._prepare(xb, yb))
        # Labels and finiteness once, up front, not inside the solver loop: one forward pass over the
        # (small) curvature sample, so that a NaN input or output is named here instead of being
        # reported by the solver as divergence.
        with eval_mode(self.model), torch.no_grad():
            start = 0
            for x, y in batches:
                logits = self.logits(self.space.params, x)
                self._check(logits, y)
                if not bool(torch.isfinite(self.loss_fn(logits, y)).all() & finite_inputs(x)):
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
            if not bool(torch.isfinite(d).all() & finite_inputs(x)):
                raise self._nonfinite("training", x, y, positions)
        return d.detach().double().cpu() / n_train

    def score_dataset(
        self, train: Dataset, s: torch.Tensor, batch_size: int = 256, method: Literal["jvp", "grad"] = "jvp",
        n_train: int | None = None,
    ) -> np.ndarray:
        """Scores of every sample of ``train``, in its order."""
        n = len(train) if n_train is None else n_train
        out = [self.score_batch(xb, yb, s, n, method, positions=range(b * batch_size, b * batch_size + len(yb)))
               for b, (xb, yb) in enumerate(as_batches(train, batch_size))]
        return torch.cat(out).numpy() if out else np.zeros(0)
