"""Inputs of the engine: batches and labels checked, parameters chosen, and their flat vector space."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import InputError
from ..layout import model_layout
from .config import ParamSpec


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


def as_batches(data: Dataset, batch_size: int, role: str = "train") -> DataLoader:
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


def finite_inputs(x: torch.Tensor) -> torch.Tensor:
    """Whether a batch's inputs are all finite, as a 0-d tensor (no host sync until the caller reads it)."""
    return torch.isfinite(x).all() if x.is_floating_point() else torch.ones((), dtype=torch.bool, device=x.device)


def label_tensor(y: Any) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise InputError(f"labels must be integers (class indices), got dtype {y.dtype}: convert them with int()")
    return y.long()


def check_labels(y: torch.Tensor, num_outputs: int) -> None:
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
        from ..models import last_k_layer_params

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
