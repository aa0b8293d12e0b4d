"""The memory layout the model sees: image batches (and the engine's convolution weights) in channels-last order.

Why: PyTorch's CPU convolutions (oneDNN) and cuDNN's tensor-core kernels work natively in NHWC. On this
project's CPUs the paper's sample-cnn runs inference and self-influence 1.6-2.2x, the paper's JVP
scores 1.3-1.4x and a train step 1.4x faster with channels-last batches and weights (the JVP's tangents
too), and ResNet-18 is within 3% either way: ``benchmarks/bench_layout.py``. Only the strides change:
every tensor keeps its logical NCHW shape, so results are the same up to float rounding (summation
order). Used by the influence engine, self-influence, the head's probe and the fine-tuning workers.

Only idtl-ray's own architectures (:func:`idtl_ray.models.build_model`) run this way. A user's module
stays NCHW: one that calls ``.view`` on a convolution's output would fail on channels-last strides.
``CHANNELS_LAST = False`` switches it off in this process (the benchmark's "before" arm); Ray workers
keep their own default.
"""

from __future__ import annotations

import torch
from torch import nn

CHANNELS_LAST = True


def runs_channels_last(model: nn.Module) -> bool:
    """Whether ``model`` gets channels-last batches: one built by :func:`idtl_ray.models.build_model`
    (it carries ``idtl_config``, and its layers flatten with ``torch.flatten``, which any layout allows)."""
    return CHANNELS_LAST and getattr(model, "idtl_config", None) is not None


def model_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t`` channels-last when ``channels_last`` and it is 4-D (an image batch, a convolution's weight
    or tangent), else unchanged. No copy when it is already laid out so."""
    if channels_last and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t
