"""The paper's models, adapted to small images, with weight loading, checkpoints and layer tools.

Models (:data:`MODELS`): ``sample-cnn`` (paper 4.1), torchvision ``vgg16``, ``resnet50``,
``densenet121`` (paper 4.2) and ``resnet18`` (tests and benchmarks). Adaptation to small images,
below :data:`SMALL_IMAGE_PX` pixels only (paper 4.2: "remove the pooling layers outside the blocks");
at that size and above the torchvision architectures are kept as they are, global pooling included
(so ImageNet's classifier shapes fit, and a 224-pixel ResNet-50 head sees 2048 features, not 100,352):

- ResNet: ``maxpool`` -> Identity, global ``avgpool`` -> Flatten; ``fc`` sees C * (H/16)^2 features
  (ResNet-50 at 32x32: 2048 * 2 * 2 = 8192).
- DenseNet: ``features.pool0`` -> Identity, the final global average pooling -> flatten
  (DenseNet-121 at 32x32: 1024 * 2 * 2 = 4096 features into ``classifier``).
- VGG-16 (no batch norm, as the paper's Keras model): the five block pools stay, ``avgpool`` ->
  Identity, classifier = Linear(flat, 4096)-ReLU-Dropout-Linear(4096, 4096)-ReLU-Dropout-
  Linear(4096, K) under torchvision's key names (at 32x32, flat = 512); ImageNet weights therefore
  fit ``classifier.3`` but not ``classifier.0``.
- With ``in_channels != 3`` the first convolution is rebuilt; loading ImageNet weights into a
  1-channel model sums the RGB filters.

Every model carries ``model.head_name`` (module path of the final classifier Linear: ``fc``,
``classifier``, ``classifier.6`` or ``fc2``) and ``model.idtl_config`` (model_name, num_classes,
in_channels, image_size). Random initialisation is Xavier-uniform (paper: Xavier for scratch models
and for every layer that is not loaded).

Layers (used by ``--freeze N`` and ``--hybrid-init K``): a *layer* is a convolution (``nn.Conv2d``)
or fully-connected (``nn.Linear``) module, counted in module registration order, which is the
forward order for these models (ResNet shortcut ``downsample`` convolutions count as layers and
come after the block's ``conv3``). Each BatchNorm belongs to the most recent convolution registered
before it (for DenseNet's pre-activation layers this means ``denselayerJ.norm1`` belongs to the
convolution preceding that dense layer). Layers are numbered from 1; "the first n layers" are
layers 1..n. Layer counts (:data:`LAYER_COUNTS`, independent of image size and class count):

- sample-cnn: 6 (4 conv + 2 FC)
- vgg16: 16 (13 conv + 3 FC)
- resnet18: 21 (1 stem conv + 16 block convs + 3 shortcut convs + 1 FC)
- resnet50: 54 (1 stem conv + 48 block convs + 4 shortcut convs + 1 FC)
- densenet121: 121 (1 stem conv + 116 dense-layer convs + 3 transition convs + 1 FC)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from .errors import WeightsError
from .storage import save_torch_atomic

MODELS = ("sample-cnn", "vgg16", "resnet50", "densenet121", "resnet18")
LAYER_COUNTS = {"sample-cnn": 6, "vgg16": 16, "resnet18": 21, "resnet50": 54, "densenet121": 121}
CHECKPOINT_FORMAT = "idtl-ray-checkpoint"
CHECKPOINT_VERSION = 1

_BN = nn.modules.batchnorm._BatchNorm
_VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


# --------------------------------------------------------------------------------------------------
# Architectures


class SampleCNN(nn.Module):
    """Paper 4.1: 4 conv3x3 (32, 32, 64, 64; ReLU), 2 max-pools, FC 128, FC K (softmax in the loss)."""

    def __init__(self, num_classes: int, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"sample-cnn needs image_size >= 4 (two 2x2 pools), got {image_size}")
        # padding=1 keeps the size through the convs, so 8x8 digits survive both pools (8 -> 4 -> 2)
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        side = image_size // 4
        self.fc1 = nn.Linear(64 * side * side, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = F.max_pool2d(F.relu(self.conv4(F.relu(self.conv3(x)))), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class VGG16Small(nn.Module):
    """torchvision VGG-16 layout and key names, without the adaptive pool (block pools kept)."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        c = in_channels
        for v in _VGG16_CFG:
            if v == "M":
                mods.append(nn.MaxPool2d(2, 2))
            else:
                mods += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*mods)
        self.avgpool = nn.Identity()
        if image_size < 32:
            raise ValueError(f"vgg16 needs image_size >= 32 (five 2x2 pools), got {image_size}")
        flat = 512 * (image_size // 32) ** 2
        self.classifier = nn.Sequential(
            nn.Linear(flat, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class DenseNetSmall(nn.Module):
    """torchvision DenseNet ``features``/``classifier`` (same key names); small images are flattened
    instead of pooled, large ones pooled globally as torchvision does."""

    def __init__(self, features: nn.Module, classifier: nn.Module, global_pool: bool = False) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.global_pool = global_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.features(x))
        if self.global_pool:
            h = F.adaptive_avg_pool2d(h, 1)
        return self.classifier(torch.flatten(h, 1))


def _flat_dim(body: nn.Module, in_channels: int, image_size: int, name: str) -> int:
    """Feature width after flatten, measured with one dummy forward (head set to Identity)."""
    was_training = body.training
    body.eval()
    try:
        with torch.no_grad():
            return int(body(torch.zeros(1, in_channels, image_size, image_size)).shape[1])
    except RuntimeError:  # a feature map shrank to nothing: name the smallest size that works
        fits = next((s for s in (16, 32, 64, 128, 224) if s > image_size and _forward_ok(body, in_channels, s)), None)
        need = f"--image-size {fits} or more" if fits else "larger images"
        raise ValueError(f"{name} cannot take {image_size}px images (a feature map shrinks to nothing): "
                         f"pass {need}") from None
    finally:
        body.train(was_training)


def _forward_ok(body: nn.Module, in_channels: int, image_size: int) -> bool:
    try:
        with torch.no_grad():
            body(torch.zeros(1, in_channels, image_size, image_size))
        return True
    except RuntimeError:
        return False


def xavier_init_(module: nn.Module) -> nn.Module:
    """Xavier-uniform conv/linear weights, zero biases; BatchNorm weight 1, bias 0, stats reset."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _BN):
            m.reset_running_stats()
            if m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    return module


SMALL_IMAGE_PX = 64  # below this, the paper's small-image changes; at and above, torchvision's own pooling


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build an adapted model with Xavier random init (see the module docstring for adaptations)."""
    import torchvision.models as tvm

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if num_classes < 1 or in_channels < 1 or image_size < 1:
        raise ValueError(f"num_classes, in_channels, image_size must be positive, got {num_classes}, "
                         f"{in_channels}, {image_size}")  # fmt: skip
    model: nn.Module
    small = image_size < SMALL_IMAGE_PX
    if name == "sample-cnn":
        model, head = SampleCNN(num_classes, in_channels, image_size), "fc2"
    elif name == "vgg16":
        model, head = VGG16Small(num_classes, in_channels, image_size), "classifier.6"
        if not small:  # torchvision's 7x7 adaptive pool: classifier.0 takes ImageNet's 25,088 features
            model.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            model.classifier[0] = nn.Linear(512 * 7 * 7, 4096)
    elif name in ("resnet50", "resnet18"):
        model = getattr(tvm, name)(weights=None)
        if in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        if small:
            model.maxpool = nn.Identity()
            model.avgpool = nn.Flatten()  # ResNet.forward flattens again: a no-op
        model.fc = nn.Identity()
        model.fc = nn.Linear(_flat_dim(model, in_channels, image_size, name), num_classes)
        head = "fc"
    else:  # densenet121
        tv = tvm.densenet121(weights=None)
        if in_channels != 3:
            tv.features.conv0 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        if small:
            tv.features.pool0 = nn.Identity()
        model = DenseNetSmall(tv.features, nn.Identity(), global_pool=not small)
        model.classifier = nn.Linear(_flat_dim(model, in_channels, image_size, name), num_classes)
        head = "classifier"
    xavier_init_(model)
    model.head_name = head
    model.idtl_config = {
        "model_name": name,
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "image_size": int(image_size),
    }
    return model


def head_module(model: nn.Module) -> nn.Linear:
    """The final classifier Linear named by ``model.head_name``."""
    return model.get_submodule(model.head_name)


def replace_head(model: nn.Module, num_classes: int) -> nn.Linear:
    """Replace the final classifier with a new Xavier-initialised Linear with ``num_classes`` outputs."""
    old = head_module(model)
    new = nn.Linear(old.in_features, num_classes).to(device=old.weight.device, dtype=old.weight.dtype)
    xavier_init_(new)
    parent_name, _, attr = model.head_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    if hasattr(model, "idtl_config"):
        model.idtl_config["num_classes"] = int(num_classes)
    return new


# --------------------------------------------------------------------------------------------------
# Layers


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
        elif isinstance(m, _BN):
            if out:
                out[-1].modules.append(mname)
            else:
                pending_bn.append(mname)
    for layer in out:
        layer.num_params = sum(p.numel() for mn in layer.modules for p in model.get_submodule(mn).parameters(False))
    return out


def _param_names(model: nn.Module, layer: Layer) -> list[str]:
    return [f"{mn}.{pn}" for mn in layer.modules for pn, _ in model.get_submodule(mn).named_parameters(recurse=False)]


def _state_keys(model: nn.Module, layer: Layer) -> list[str]:
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


# --------------------------------------------------------------------------------------------------
# Weights


# torchvision's legacy DenseNet checkpoints name dense-layer modules "norm.1", "conv.2", ...
_DENSE_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _normalise_keys(state: dict[str, Any]) -> dict[str, Any]:
    """Map legacy DenseNet keys (``norm.1`` -> ``norm1``) and strip DataParallel ``module.`` prefixes."""
    out = {}
    for k, v in state.items():
        k = k[7:] if k.startswith("module.") else k
        m = _DENSE_OLD_KEY.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


def _imagenet_enum(name: str) -> Any:
    import torchvision.models as tvm

    enums = {
        "resnet50": tvm.ResNet50_Weights,
        "resnet18": tvm.ResNet18_Weights,
        "densenet121": tvm.DenseNet121_Weights,
        "vgg16": tvm.VGG16_Weights,
    }
    if name not in enums:
        raise WeightsError(
            f"{name} has no ImageNet weights; pass --weights PATH (e.g. a checkpoint of this model "
            f"trained on emnist-letters) or --weights none"
        )
    return enums[name].IMAGENET1K_V1


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet state dict for ``name`` (cache or download); WeightsError offline."""
    w = _imagenet_enum(name)
    fname = os.path.basename(urlparse(w.url).path)
    try:
        state = w.get_state_dict(progress=False)
    except Exception as e:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise WeightsError(
            f"ImageNet weights for {name} could not be loaded ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:100] if str(e).strip() else 'no detail'}); "
            f"put {fname} (from {w.url}) into {cache}/ ($TORCH_HOME/hub/checkpoints, see "
            f"torch.hub.get_dir()), or pass --weights PATH"
        ) from e
    return _normalise_keys(dict(state))


def _read_torch_file(path: Path) -> Any:
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found; pass an existing checkpoint or state-dict file, "
                           f"or --weights imagenet|none")  # fmt: skip
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(
            f"{path} is not a readable torch weights file ({type(e).__name__}); pass a checkpoint written "
            f"by idtl-ray or a state dict saved with torch.save(model.state_dict(), path)"
        ) from e


def _extract_state(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
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


def _load_state(
    model: nn.Module, state: dict[str, torch.Tensor], *, source: str, imagenet: bool
) -> dict[str, Any]:
    """Copy matching tensors into ``model`` and report; see :func:`load_weights` for the rules."""
    state = _normalise_keys(state)
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
        src = state[key]
        if src.shape != t.shape:
            if (imagenet and key == first_conv and src.ndim == 4 and src.shape[1] == 3 and t.shape[1] == 1
                    and src.shape[0] == t.shape[0] and src.shape[2:] == t.shape[2:]):  # fmt: skip
                src = src.sum(dim=1, keepdim=True)  # grey input = R = G = B: summing keeps responses
            elif imagenet:
                skipped.append(key)
                reinit.add(_module_of(key))
                continue
            else:
                raise WeightsError(
                    f"{source}: tensor {key} has shape {tuple(src.shape)} but the model needs "
                    f"{tuple(t.shape)}; the weights belong to another architecture, channel count or "
                    f"image size; pass matching --model/--image-size or another weights file"
                )
        copies.append((key, src))
    unexpected = [k for k in state if k not in target and not k.startswith(head)]
    if not imagenet:
        # partial loads hide architecture mix-ups; old files may lack BN's num_batches_tracked
        real_missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if real_missing or unexpected:
            first = f"missing {real_missing[0]}" if real_missing else f"unexpected {unexpected[0]}"
            raise WeightsError(
                f"{source}: the weights do not fit this model ({first}; {len(real_missing)} missing, "
                f"{len(unexpected)} unexpected keys); pass the --model they were trained with or another file"
            )
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
    state, header = _extract_state(_read_torch_file(path), path)
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
    for key, t in _normalise_keys(state).items():
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
    state = _normalise_keys(pretrained_state)
    target = model.state_dict()
    keys = [key for layer in ls[:k] for key in _state_keys(model, layer)]
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


# --------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write a project checkpoint atomically (:func:`~idtl_ray.storage.save_torch_atomic`).

    ``meta`` must be JSON-like (str/int/float/bool/None, lists, dicts) so that it loads with
    ``torch.load(weights_only=True)``.
    """
    cfg = getattr(model, "idtl_config", None)
    if cfg is None:
        raise ValueError("model has no idtl_config; build it with build_model()")
    try:
        json.dumps(meta)
    except TypeError as e:
        raise ValueError(f"checkpoint meta must be JSON-like: {e}") from e
    obj = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        **{k: cfg[k] for k in ("model_name", "num_classes", "in_channels", "image_size")},
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": meta,
    }
    save_torch_atomic(obj, path)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved by :func:`save_checkpoint`; returns (model, meta)."""
    p = Path(path).expanduser()
    obj = _read_torch_file(p)
    if not (isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT):
        raise WeightsError(
            f"{p} is not an idtl-ray checkpoint (a plain state dict has no architecture); build the "
            f"model with build_model() and use load_weights(model, name, path)"
        )
    if obj.get("version") != CHECKPOINT_VERSION:
        raise WeightsError(f"{p} has checkpoint version {obj.get('version')}, this idtl-ray reads "
                           f"{CHECKPOINT_VERSION}; re-create it with this version")  # fmt: skip
    try:
        model = build_model(obj["model_name"], obj["num_classes"], obj["in_channels"], obj["image_size"])
        model.load_state_dict(obj["state_dict"], strict=True)
    except (KeyError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{p} is a damaged idtl-ray checkpoint ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:120]}); re-create it")  # fmt: skip
    return model, dict(obj.get("meta") or {})
