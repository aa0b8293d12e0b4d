"""The architectures: sample-cnn, and torchvision's VGG-16, ResNet and DenseNet adapted below 64 px; the head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


MODELS = ("sample-cnn", "vgg16", "resnet50", "densenet121", "resnet18")
LAYER_COUNTS = {"sample-cnn": 6, "vgg16": 16, "resnet18": 21, "resnet50": 54, "densenet121": 121}

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
        elif isinstance(m, _BatchNorm):
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
