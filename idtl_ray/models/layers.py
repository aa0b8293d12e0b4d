"""Layers as ``--freeze N`` and ``--hybrid-init K`` count them (see the package docstring), and freezing."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass
class Layer:
    """A conv or Linear layer: 1-based ``index``, module path ``name``, ``modules`` (itself + its BNs)."""

    index: int
    name: str
    modules: list[str]
    num_params: int
    kind: str  # "conv" or "linear"


def layers(model: nn.Module) -> list[Layer]:
    """The model's layers in registration (= forward) order; see the module docstring."""
    out: list[Layer] = []
    pending_bn: list[str] = []  # a BN before any conv (not in these models) joins the next layer
    for mname, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
            out.append(Layer(len(out) + 1, mname, [mname, *pending_bn], 0, kind))
            pending_bn = []
        elif isinstance(m, _BatchNorm):
            if out:
                out[-1].modules.append(mname)
            else:
                pending_bn.append(mname)
    for layer in out:
        layer.num_params = sum(p.numel() for mn in layer.modules for p in model.get_submodule(mn).parameters(False))
    return out


def _param_names(model: nn.Module, layer: Layer) -> list[str]:
    return [f"{mn}.{pn}" for mn in layer.modules for pn, _ in model.get_submodule(mn).named_parameters(recurse=False)]


def layer_state_keys(model: nn.Module, layer: Layer) -> list[str]:
    """Parameter and buffer keys (BN running stats included) of a layer."""
    keys = []
    for mn in layer.modules:
        m = model.get_submodule(mn)
        keys += [f"{mn}.{pn}" for pn, _ in m.named_parameters(recurse=False)]
        keys += [f"{mn}.{bn}" for bn, _ in m.named_buffers(recurse=False)]
    return keys


def freeze_first(model: nn.Module, n: int) -> list[str]:
    """Freeze the parameters of layers 1..n (with their BNs); every other parameter becomes trainable.

    ``0 <= n < len(layers(model))`` (freezing every layer would leave nothing to train). Only
    ``requires_grad`` changes: BN running statistics still update in train mode unless the caller
    puts those BN modules in eval mode. Returns the frozen parameter names.
    """
    ls = layers(model)
    if not 0 <= n < len(ls):
        raise ValueError(
            f"cannot freeze {n} layers of a model with {len(ls)} layers; use 0..{len(ls) - 1} "
            f"(freezing all layers would leave nothing to train)"
        )
    for p in model.parameters():
        p.requires_grad_(True)
    frozen = [pn for layer in ls[:n] for pn in _param_names(model, layer)]
    params = dict(model.named_parameters())
    for pn in frozen:
        params[pn].requires_grad_(False)
    return frozen


def freeze_all_but_head(model: nn.Module) -> list[str]:
    """Freeze every parameter outside Linear layers (paper Table 6: only the FC layers train).

    Returns the frozen parameter names.
    """
    frozen = []
    for mname, m in model.named_modules():
        trainable = isinstance(m, nn.Linear)
        for pn, p in m.named_parameters(recurse=False):
            p.requires_grad_(trainable)
            if not trainable:
                frozen.append(f"{mname}.{pn}" if mname else pn)
    return frozen


def last_k_layer_params(model: nn.Module, k: int) -> list[str]:
    """Parameter names of the last ``k`` layers (with their BNs), in registration order."""
    ls = layers(model)
    if not 1 <= k <= len(ls):
        raise ValueError(f"k must be in 1..{len(ls)} for this model, got {k}")
    return [pn for layer in ls[len(ls) - k :] for pn in _param_names(model, layer)]


def describe_layers(model: nn.Module) -> str:
    """A text table of the layers (index, module, kind, weight shape, params, BNs, trainable)."""
    rows = [f"{'#':>4}  {'layer':<44} {'kind':<6} {'weight shape':<20} {'params':>10}  {'bn':>2}  trainable"]
    total = 0
    for layer in layers(model):
        m = model.get_submodule(layer.name)
        ps = [p for mn in layer.modules for p in model.get_submodule(mn).parameters(False)]
        train = all(p.requires_grad for p in ps)
        state = "yes" if train else ("no" if not any(p.requires_grad for p in ps) else "partial")
        rows.append(
            f"{layer.index:>4}  {layer.name:<44} {layer.kind:<6} {str(tuple(m.weight.shape)):<20} "
            f"{layer.num_params:>10,}  {len(layer.modules) - 1:>2}  {state}"
        )
        total += layer.num_params
    name = getattr(model, "idtl_config", {}).get("model_name", type(model).__name__)
    rows.append(f"{name}: {len(rows) - 1} layers, {total:,} parameters; head = {getattr(model, 'head_name', '?')}")
    return "\n".join(rows)
