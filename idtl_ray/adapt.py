"""The scored model: an architecture from the registry, the weights, and a head for the target's classes.

:func:`prepare_model` keeps the weights' head only when it predicts the target's classes (the same
names in the same order; a matching count is not enough) and otherwise fits a new one (design.md §2:
a linear probe puts the adapted model near a target optimum), saying why in the run's metadata.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import ScoreConfig
from .errors import InputError, WeightsError
from .head import fit_head
from .scoring import Preprocess


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare_model(cfg: ScoreConfig, data: Any, train_x: np.ndarray, train_y: np.ndarray,
                  preprocess: Preprocess, fit: Callable[..., dict[str, float]] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model, load the weights, and give it a head for the target classes.

    ``fit`` fits a new head (default :func:`fit_head`, in this process; ``run_score`` passes
    :func:`fit_head_on_worker`).
    """
    model, info = adapt_model(cfg, data)
    fit_new_head(model, info, train_x, train_y, preprocess, cfg, fit)
    return model, info


def fit_new_head(model: nn.Module, info: dict[str, Any], train_x: Any, train_y: np.ndarray, preprocess: Preprocess,
                 cfg: ScoreConfig, fit: Callable[..., dict[str, float]] | None = None) -> None:
    """Fit the head :func:`adapt_model` decided is new (nothing when it kept the weights' head)."""
    if not info["head"]["new_head"]:
        return
    _log(f"fitting a new {info['head']['num_classes']}-class head on {len(train_y)} target samples (backbone frozen)")
    info["head"].update((fit or fit_head)(model, train_x, train_y, preprocess, steps=cfg.head_steps, seed=cfg.seed))


def adapt_model(cfg: ScoreConfig, data: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The model with its weights loaded and the head decided (a new one is still to be fitted when
    ``info["head"]["new_head"]``); every weights error surfaces here, before Ray starts."""
    from .models import head_module, replace_head

    model, report, source, source_classes = _load_source(cfg, data)
    n = data.num_classes
    head_out = head_module(model).out_features
    fits = head_out == n and not report["head_replaced"] and source_classes == n
    same, why = _head_match(cfg, data, source, source_classes, fits, head_module(model).in_features)
    head_info: dict[str, Any] = {"mode": cfg.head}
    new_head, reason = _head_decision(cfg, data, same, why, fits, source["num_classes"] is None, source_classes,
                                      head_info)
    if cfg.weights in (None, "none"):
        head_info["warning"] = (f"--weights none: {cfg.model} is randomly initialised, so the scores describe an "
                                "untrained model; pass --weights (a pre-trained checkpoint, or imagenet) for transfer learning")
        _log(f"warning: {head_info['warning']}")
    if new_head and head_out != n:
        replace_head(model, n)
    head_info.update(new_head=bool(new_head), source_classes=int(source_classes), num_classes=int(n),
                     source_dataset=source["dataset"], classes_match=same)
    if reason:
        head_info.update(reason=reason, why=why)
    return model, {"weights": report["source"], "loaded_tensors": len(report["loaded"]), "head": head_info}


def _load_source(cfg: ScoreConfig, data: Any) -> tuple[nn.Module, dict[str, Any], dict[str, Any], int]:
    """The model built at the weights' class count (so their head loads when it fits) with the weights loaded:
    (model, load report, what the weights say of their classes, their class count)."""
    from .models import build_model, load_weights

    h, _, c = data.image_shape
    torch.manual_seed(cfg.seed)  # layers not loaded from weights are Xavier-initialised: make that reproducible
    try:
        model = build_model(cfg.model, data.num_classes, in_channels=c, image_size=h)
    except ValueError as e:
        raise InputError(str(e)) from e
    source_classes = data.num_classes
    source: dict[str, Any] = {"num_classes": None, "classes": None, "dataset": None, "kind": "none"}
    weights_path = Path(cfg.weights).expanduser() if cfg.weights not in (None, "none", "imagenet") else None
    if weights_path is not None:
        source = _checkpoint_classes(weights_path, model.head_name)
        source_classes = source["num_classes"] or data.num_classes
        if source["kind"] == "checkpoint" and source_classes != data.num_classes:
            model = build_model(cfg.model, source_classes, in_channels=c, image_size=h)
    report = load_weights(model, cfg.model, cfg.weights)
    if cfg.weights == "imagenet":
        source_classes = 1000
    return model, report, source, source_classes


def _head_match(cfg: ScoreConfig, data: Any, source: dict[str, Any], source_classes: int,
                fits: bool, model_in: int | None = None) -> tuple[bool | None, str]:
    """Whether the weights' head predicts the target's classes (same names, same order: a count is not
    enough), None when unknown, and why in words."""
    n = data.num_classes
    if cfg.weights in (None, "none"):
        return None, ""
    if cfg.weights == "imagenet":
        return False, f"ImageNet weights have 1000 classes, {data.name} has {n}"
    if not fits and source["num_classes"] is None:
        return False, f"the weights hold no {cfg.model} head"
    if not fits and source.get("head_in") not in (None, model_in):  # same classes, another feature width
        made = f" (the checkpoint was made at {source['image_size']} px)" if source.get("image_size") else ""
        return False, (f"the weights' head takes {source['head_in']} features but {cfg.model} at "
                       f"{data.image_shape[0]} px gives {model_in}{made}: pass the --image-size the weights were "
                       "made at, or let a new head be fitted")
    if not fits:
        return False, f"the weights' head has {source_classes} classes, {data.name} has {n}"
    if source["classes"] is None:
        return None, ("the weights' classes are unknown (" + ("a plain state dict" if source["kind"] == "state_dict"
                      else "the checkpoint records no class names") + ")")
    if list(source["classes"]) == list(data.classes):
        return True, f"the weights' classes are {_poss(data.name)} ({_class_names(data.classes)})"
    if sorted(source["classes"]) == sorted(data.classes):
        return False, f"the weights' classes are {_poss(data.name)} in another order"
    return False, (f"the weights' classes differ: {_poss(source['dataset'] or 'the weights')} "
                   f"{_class_names(source['classes'])} vs {_poss(data.name)} {_class_names(data.classes)}")


def _head_decision(cfg: ScoreConfig, data: Any, same: bool | None, why: str, fits: bool, no_source_head: bool,
                   source_classes: int, head_info: dict[str, Any]) -> tuple[bool, str]:
    """(fit a new head?, the reason the summary prints) under ``--head``; refuses ``keep`` of a head that
    cannot fit, and records a warning in ``head_info`` when ``keep`` keeps a head of other classes."""
    if cfg.head == "keep" and not fits:
        no_head = no_source_head and cfg.weights != "imagenet"
        if not no_head and source_classes == data.num_classes:  # the count fits: why names what does not
            raise WeightsError(f"--head keep: {why}")
        what = why if no_head else f"the weights' head has {source_classes} classes"
        raise WeightsError(
            f"{what} but {data.name} has {data.num_classes}: "
            "drop --head keep so that a new head is fitted on the target data"
        )
    if cfg.weights in (None, "none"):
        new_head = cfg.head == "new"
        return new_head, ("--head new: a new head was fitted" if new_head else "")
    if cfg.head == "new":
        return True, f"--head new: a new head was fitted ({why})"
    if cfg.head == "keep":
        if not same:
            head_info["warning"] = (f"{why}, yet --head keep kept the weights' head: its outputs may not mean "
                                    f"{data.name}'s classes; use --head auto to fit a new head")
            _log(f"warning: {head_info['warning']}")
        return False, f"--head keep: the weights' head was kept ({why})"
    if same:
        return False, f"{why}: the weights' head was kept"
    return True, f"{why}: a new head was fitted"


def _poss(name: str) -> str:
    """``digits'`` / ``fashion-mnist's``."""
    return name + ("'" if name.endswith("s") else "'s")


def _class_names(names: Sequence[str], show: int = 2) -> str:
    """Short form of a class list: ``0..9`` for 0..n-1, else the first few names and ``...``."""
    names = [str(x) for x in names]
    if names == [str(i) for i in range(len(names))]:
        return f"0..{len(names) - 1}"
    return ", ".join(names) if len(names) <= show + 1 else ", ".join(names[:show]) + ", ..."


def _checkpoint_classes(path: Path, head_name: str | None = None) -> dict[str, Any]:
    """What the weights file says about its classes: ``num_classes``, ``classes`` (names), ``dataset``, ``kind``.

    A project checkpoint gives its class count and, when its meta records them (``pretrain``,
    ``finetune``), the source dataset and class names. A plain state dict gives only the count,
    read from the head's weight (``head_name``); its names are unknown (None).
    """
    from .models import extract_state, normalise_keys, read_torch_file

    state, header = extract_state(read_torch_file(path), path)
    out: dict[str, Any] = {"num_classes": None, "classes": None, "dataset": None, "kind": "state_dict",
                           "head_in": None, "image_size": None}
    w = normalise_keys(state).get(f"{head_name}.weight") if head_name else None
    if torch.is_tensor(w) and w.ndim == 2:
        out["head_in"] = int(w.shape[1])
        if header is None:  # a plain state dict: the count read from its head
            out["num_classes"] = int(w.shape[0])
    if header is None:
        return out
    out["kind"] = "checkpoint"
    out["image_size"] = header.get("image_size")
    if header.get("num_classes"):
        out["num_classes"] = int(header["num_classes"])
    meta = header.get("meta") if isinstance(header.get("meta"), dict) else {}
    if isinstance(meta.get("dataset"), str):
        out["dataset"] = meta["dataset"]
    names = meta.get("classes")
    if (isinstance(names, list) and names and all(isinstance(x, str) for x in names)
            and (out["num_classes"] is None or len(names) == out["num_classes"])):
        out["classes"] = list(names)
    return out
