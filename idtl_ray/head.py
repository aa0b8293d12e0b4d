"""The new head of a pre-trained model: a probe fitted on the target data with the backbone frozen.

Runs where the model runs: in-process (tests, the API), or as a Ray task on a GPU worker when
``idtl-ray score`` fits it (:func:`fit_head_task`), since on a head node's CPU it can take most of a
scoring run's time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .influence.inputs import eval_mode
from .layout import model_layout, runs_channels_last
from .scoring.common import Preprocess, setup_worker


def fit_head(model: nn.Module, x: np.ndarray, y: np.ndarray, preprocess: Preprocess, steps: int = 30,
             seed: int = 0, batch_size: int = 256, weight_decay: float = 1e-4,
             device: torch.device | None = None) -> dict[str, float]:
    """Fit the model's final Linear on the target data with everything else frozen (full-batch L-BFGS).

    Features are computed once in eval mode (a forward hook on the head), so this costs one inference
    pass plus a small convex problem. ``device``: where the model is (default the CPU). Returns the
    probe's training accuracy and loss.
    """
    from .models import head_module

    head = head_module(model)
    feats: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0].detach().flatten(1)))
    laid_out = runs_channels_last(model)  # channels-last batches (layout.py)
    try:
        # eval_mode restores each submodule's own mode (model.train(flag) would set a frozen BatchNorm training)
        with eval_mode(model), torch.inference_mode():
            for i in range(0, len(y), batch_size):
                model(model_layout(preprocess(x[i:i + batch_size], device), laid_out))
    finally:
        hook.remove()
    f = torch.cat(feats).clone()
    t = torch.as_tensor(y, dtype=torch.long).to(f.device)
    torch.manual_seed(seed)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(f), t) + weight_decay / 2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    head.zero_grad(set_to_none=True)  # the caller's model carries no gradients of the fit
    with torch.no_grad():
        logits = head(f)
        return {"probe_train_accuracy": float((logits.argmax(1) == t).float().mean()),
                "probe_train_loss": float(torch.nn.functional.cross_entropy(logits, t))}


def fit_head_task(model: nn.Module, x: Any, y: np.ndarray, preprocess: Preprocess, steps: int, seed: int,
                  threads: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """:func:`fit_head` in a Ray worker (on its GPU when it has one); returns the head's state (CPU) and the fit's report.

    ``x``: the images, or :class:`~idtl_ray.data.samples.RaySamples` gathered here from Ray Data.
    """
    from .models import head_module

    device = setup_worker(threads)
    if hasattr(x, "gather"):
        x, y = x.gather()
    info = fit_head(model.to(device), x, y, preprocess, steps=steps, seed=seed, device=device)
    return {k: v.cpu() for k, v in head_module(model).state_dict().items()}, info
