"""The memory layout the model sees: image batches and convolution weights in channels-last order.

Why: PyTorch's CPU convolutions (oneDNN) and cuDNN's tensor-core kernels work natively in NHWC. On this
project's CPUs the paper's sample-cnn runs inference and self-influence 1.6-2.2x, the paper's JVP
scores 1.3-1.4x and a train step 1.4x faster with channels-last batches and weights (the JVP's tangents
too), and ResNet-18 is within 3% either way: ``benchmarks/bench_layout.py``. Only the strides change:
every tensor keeps its logical NCHW shape, so results are the same up to float rounding (summation
order). Used by the influence engine, self-influence, the head's probe and the fine-tuning workers.

``CHANNELS_LAST = False`` switches it off in this process (the benchmark's "before" arm); Ray workers
keep their own default.
"""

from __future__ import annotations

import torch

CHANNELS_LAST = True


def model_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the layout the model runs fastest in: channels-last for a 4-D tensor (an image batch, a
    convolution's weight or tangent), unchanged otherwise. No copy when it is already laid out so."""
    if CHANNELS_LAST and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t
