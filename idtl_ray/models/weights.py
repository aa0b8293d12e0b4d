"""Weights: ImageNet's from torchvision, or a user's file, matched to the model key by key; hybrid init."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import WeightsError
from .architectures import head_module, replace_head, xavier_init_
from .checkpoints import CHECKPOINT_FORMAT, read_torch_file
from .layers import layer_state_keys, layers


# torchvision's legacy DenseNet checkpoints name dense-layer modules "norm.1", "conv.2", ...
_DENSE_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def normalise_keys(state: dict[str, Any]) -> dict[str, Any]:
    """Map legacy DenseNet keys (``norm.1`` -> ``norm1``) and strip DataParallel ``module.`` prefixes."""
    out = {}
    for k, v in state.items():
        k = k[7:] if k.startswith("module.") else k
        m = _DENSE_OLD_KEY.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


# The models with torchvision ImageNet weights: model name -> torchvision's weights enum.
IMAGENET_WEIGHTS = {"resnet50": "ResNet50_Weights", "resnet18": "ResNet18_Weights",
                    "densenet121": "DenseNet121_Weights", "vgg16": "VGG16_Weights"}


def imagenet_enum(name: str) -> Any:
    import torchvision.models as tvm

    if name not in IMAGENET_WEIGHTS:
        raise WeightsError(
            f"{name} has no ImageNet weights; pass --weights PATH (e.g. a checkpoint of this model "
            f"trained on emnist-letters) or --weights none"
        )
    return getattr(tvm, IMAGENET_WEIGHTS[name]).IMAGENET1K_V1


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet state dict for ``name`` (cache or download); WeightsError offline."""
    w = imagenet_enum(name)
    fname = imagenet_file_name(name)
    try:
        state = w.get_state_dict(progress=False)
    except Exception as e:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        if (cache / fname).is_file():  # there, but unreadable: asking to put it there would not help
            raise WeightsError(f"ImageNet weights for {name}: {cache / fname} cannot be read ({type(e).__name__}; a "
                               f"partial or corrupt download): delete it and put a fresh copy of {w.url} there") from e
        raise WeightsError(
            f"ImageNet weights for {name} could not be loaded ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:100] if str(e).strip() else 'no detail'}); "
            f"put {fname} (from {w.url}) into {cache}/ ($TORCH_HOME/hub/checkpoints, see "
            f"torch.hub.get_dir()), or pass that file as --weights PATH"
        ) from e
    return normalise_keys(dict(state))


def imagenet_file_name(name: str) -> str:
    """torchvision's file name of ``name``'s ImageNet weights (e.g. resnet18-f37072fd.pth); WeightsError if none."""
    return os.path.basename(urlparse(imagenet_enum(name).url).path)


def extract_state(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state_dict, project-checkpoint header or None) from a loaded torch object."""
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return obj["state_dict"], obj
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        return obj, None
    raise WeightsError(
        f"{path} holds no state dict; pass a checkpoint written by idtl-ray or a file saved with "
        f"torch.save(model.state_dict(), path)"
    )


def _module_of(key: str) -> str:
    return key.rpartition(".")[0]


def _fitted(key: str, src: torch.Tensor, target: torch.Tensor, source: str, *, imagenet: bool,
            first_conv: bool) -> torch.Tensor | None:
    """``src`` as it loads into ``target``: as is when the shapes agree; ImageNet's RGB first convolution
    summed for a grey model; None for any other ImageNet mismatch; else a WeightsError naming the fix."""
    if src.shape == target.shape:
        return src
    if (imagenet and first_conv and src.ndim == 4 and src.shape[1] == 3 and target.shape[1] == 1
            and src.shape[0] == target.shape[0] and src.shape[2:] == target.shape[2:]):  # fmt: skip
        return src.sum(dim=1, keepdim=True)  # grey input = R = G = B: summing keeps responses
    if imagenet:
        return None
    raise WeightsError(
        f"{source}: tensor {key} has shape {tuple(src.shape)} but the model needs "
        f"{tuple(target.shape)}; the weights belong to another architecture, channel count or "
        f"image size; pass matching --model/--image-size or another weights file"
    )


def _refuse_partial(source: str, missing: list[str], unexpected: list[str]) -> None:
    """A user's file must fit the model whole: partial loads hide architecture mix-ups (old files may
    lack BatchNorm's num_batches_tracked, which is allowed)."""
    real_missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if real_missing or unexpected:
        first = f"missing {real_missing[0]}" if real_missing else f"unexpected {unexpected[0]}"
        raise WeightsError(
            f"{source}: the weights do not fit this model ({first}; {len(real_missing)} missing, "
            f"{len(unexpected)} unexpected keys); pass the --model they were trained with or another file"
        )


def _load_state(
    model: nn.Module, state: dict[str, torch.Tensor], *, source: str, imagenet: bool
) -> dict[str, Any]:
    """Copy matching tensors into ``model`` and report; see :func:`load_weights` for the rules."""
    state = normalise_keys(state)
    target = model.state_dict()
    head = model.head_name + "."
    first_conv = layers(model)[0].name + ".weight"
    head_keys = [k for k in target if k.startswith(head)]
    # the head is skipped as a whole: always for ImageNet (1000 classes, other input width), else
    # when any of its tensors is absent or does not fit (another class count)
    head_replaced = imagenet or any(k not in state or state[k].shape != target[k].shape for k in head_keys)
    loaded: list[str] = []
    skipped: list[str] = []
    missing: list[str] = []
    reinit: set[str] = set()
    copies: list[tuple[str, torch.Tensor]] = []
    for key, t in target.items():
        if key.startswith(head) and head_replaced:
            if key in state:
                skipped.append(key)
            continue
        if key not in state:
            missing.append(key)
            continue
        src = _fitted(key, state[key], t, source, imagenet=imagenet, first_conv=key == first_conv)
        if src is None:  # an ImageNet tensor of another shape: its module is re-initialised
            skipped.append(key)
            reinit.add(_module_of(key))
        else:
            copies.append((key, src))
    unexpected = [k for k in state if k not in target and not k.startswith(head)]
    # a module re-initialised for one tensor that did not fit is re-initialised whole: its other tensors
    # (VGG's classifier.0 bias below 64 px) are not loaded, and not reported as loaded
    skipped += [k for k, _ in copies if _module_of(k) in reinit]
    copies = [(k, s) for k, s in copies if _module_of(k) not in reinit]
    if not imagenet:
        _refuse_partial(source, missing, unexpected)
    with torch.no_grad():
        for key, src in copies:
            target[key].copy_(src)
            loaded.append(key)
        for mname in sorted(reinit):
            xavier_init_(model.get_submodule(mname))  # not loaded -> Xavier, as the paper does
    if head_replaced:
        replace_head(model, head_module(model).out_features)
    return {
        "source": source,
        "loaded": loaded,
        "skipped": skipped,
        "missing": missing,
        "unexpected": unexpected,
        "head_replaced": bool(head_replaced),
    }


def check_weights_file(weights: str | None) -> None:
    """Refuse a ``--weights`` PATH that does not exist, at once (imagenet and none need no file)."""
    if weights not in (None, "none", "imagenet") and not Path(weights).expanduser().is_file():
        raise WeightsError(f"weights file {Path(weights).expanduser()} not found: pass an existing checkpoint or "
                           "state-dict file, or --weights imagenet|none")


def load_weights(model: nn.Module, name: str, weights: str | None) -> dict[str, Any]:
    """Load ``weights`` (None/"none", "imagenet", or a file path) into an adapted ``model``.

    - ImageNet: torchvision's state dict, copied by hand: every tensor whose key and shape match;
      the head and tensors that no longer fit (e.g. VGG's first FC after flatten) are skipped and
      Xavier-initialised; a 1-channel first conv gets the summed RGB filters.
    - A path: a checkpoint of :func:`save_checkpoint` or a plain state dict. Every backbone tensor
      must be present and fit, else WeightsError naming the first mismatching key. A head with
      another class count is skipped (``head_replaced=True``; a new head is fitted later).

    Returns ``{"source", "loaded", "skipped", "missing", "unexpected", "head_replaced"}``.
    """
    if weights is None or weights == "none":
        return {"source": "none", "loaded": [], "skipped": [], "missing": [], "unexpected": [], "head_replaced": False}
    if weights == "imagenet":
        return _load_state(model, imagenet_state_dict(name), source=f"imagenet:{name}", imagenet=True)
    path = Path(weights).expanduser()
    state, header = extract_state(read_torch_file(path), path)
    if header is None and name in IMAGENET_WEIGHTS and path.name == imagenet_file_name(name):  # torchvision's own file
        _check_finite_state(state, model, path)
        return _load_state(model, state, source=f"imagenet:{name} ({path})", imagenet=True)
    if header is not None and header.get("model_name") not in (None, name):
        raise WeightsError(
            f"{path} is a {header.get('model_name')} checkpoint but the model is {name}; "
            f"pass --model {header.get('model_name')} or a {name} checkpoint"
        )
    _check_finite_state(state, model, path)
    return _load_state(model, state, source=str(path), imagenet=False)


def _check_finite_state(state: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    """Refuse a weights file with NaN (or inf in a parameter), naming the tensor.

    Caught here, at load time, rather than later as NaN scores or a "diverged" solver. Buffers may
    hold inf on purpose (masks), never NaN.
    """
    params = {n for n, _ in model.named_parameters()}
    for key, t in normalise_keys(state).items():
        if not torch.is_tensor(t) or not t.is_floating_point():
            continue
        bad = ~torch.isfinite(t) if key in params else torch.isnan(t)
        k = int(bad.sum())
        if k:
            raise WeightsError(f"{path}: tensor {key} holds NaN or inf ({k} of {t.numel()} values): the file is corrupt "
                               "or was saved from a diverged training; use another weights file, or retrain")


def hybrid_init(model: nn.Module, pretrained_state: dict[str, torch.Tensor], k: int) -> list[str]:
    """Copy layers 1..k (params and BN buffers) bitwise from ``pretrained_state``; Xavier the rest.

    ``pretrained_state`` uses this model's key names (e.g. ``imagenet_state_dict(name)`` or the
    ``state_dict()`` of a loaded model); a 3-channel first conv is summed into a 1-channel one.
    Everything after layer k is Xavier-initialised (BN weight 1, bias 0, running stats reset).
    Returns the copied keys.
    """
    ls = layers(model)
    if not 0 <= k <= len(ls):
        raise ValueError(f"k must be in 0..{len(ls)} for this model, got {k}")
    state = normalise_keys(pretrained_state)
    target = model.state_dict()
    keys = [key for layer in ls[:k] for key in layer_state_keys(model, layer)]
    srcs = []
    for key in keys:
        if key not in state:
            if key.endswith("num_batches_tracked"):
                continue
            raise WeightsError(f"pretrained weights lack {key} (layer within the first {k}); pass a state "
                               f"dict of the same architecture or a smaller k")  # fmt: skip
        src = state[key]
        if src.shape != target[key].shape:
            t = target[key]
            if key == ls[0].name + ".weight" and src.ndim == 4 and src.shape[1] == 3 and t.shape[1] == 1:
                src = src.sum(dim=1, keepdim=True)
            else:
                raise WeightsError(f"pretrained tensor {key} has shape {tuple(src.shape)}, the model needs "
                                   f"{tuple(t.shape)}; pass weights of the same architecture")  # fmt: skip
        srcs.append((key, src))
    xavier_init_(model)
    copied = []
    with torch.no_grad():
        for key, src in srcs:
            target[key].copy_(src)
            copied.append(key)
    return copied
