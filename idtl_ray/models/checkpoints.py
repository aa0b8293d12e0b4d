"""idtl-ray's own checkpoints: the model, its architecture and what it was trained on, in one file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import WeightsError
from ..storage import save_torch_atomic
from .architectures import build_model


CHECKPOINT_FORMAT = "idtl-ray-checkpoint"
CHECKPOINT_VERSION = 1


def read_torch_file(path: Path) -> Any:
    """``torch.load`` of a weights file (tensors only), or a WeightsError that names the fix."""
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


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write a project checkpoint atomically (:func:`~idtl_ray.storage.save_torch_atomic`).

    ``meta`` must be JSON-like (str/int/float/bool/None, lists, dicts) so that it loads with
    ``torch.load(weights_only=True)``.
    """
    cfg = getattr(model, "idtl_config", None)
    if cfg is None:
        raise ValueError("model has no idtl_config; build it with build_model()")
    try:  # through JSON: a numpy float64 passes json.dumps (a float subclass) but not weights_only loading
        meta = json.loads(json.dumps(meta))
    except (TypeError, ValueError) as e:
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
    obj = read_torch_file(p)
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
