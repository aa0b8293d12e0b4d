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

Modules: ``architectures`` (:func:`build_model`, the head), ``layers`` (counting and freezing),
``weights`` (ImageNet's or a file's, hybrid init) and ``checkpoints`` (idtl-ray's own files).
"""

from __future__ import annotations

from .architectures import (
    LAYER_COUNTS,
    MODELS,
    SMALL_IMAGE_PX,
    DenseNetSmall,
    SampleCNN,
    VGG16Small,
    build_model,
    head_module,
    replace_head,
    xavier_init_,
)
from .checkpoints import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint, read_torch_file, save_checkpoint
from .layers import Layer, describe_layers, freeze_all_but_head, freeze_first, last_k_layer_params, layers
from .weights import (
    check_weights_file,
    extract_state,
    hybrid_init,
    imagenet_enum,
    imagenet_file_name,
    imagenet_state_dict,
    load_weights,
    normalise_keys,
)

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "LAYER_COUNTS", "MODELS", "SMALL_IMAGE_PX", "DenseNetSmall", "Layer",
    "SampleCNN", "VGG16Small", "build_model", "check_weights_file", "describe_layers", "extract_state",
    "freeze_all_but_head", "freeze_first", "head_module", "hybrid_init", "imagenet_enum", "imagenet_file_name", "imagenet_state_dict",
    "last_k_layer_params", "layers", "load_checkpoint", "load_weights", "normalise_keys", "read_torch_file",
    "replace_head", "save_checkpoint", "xavier_init_",
]  # fmt: skip
