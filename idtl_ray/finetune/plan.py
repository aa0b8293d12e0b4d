"""Stages 1-2 of a run: the plan (which sample ids train, checked against the mask and split) and the model it starts from."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import data as D
from .. import models as M
from ..data.samples import PreparedTarget
from ..errors import InputError, MaskError, WeightsError
from ..mask import check_mask, read_mask
from .config import FinetuneConfig
from .data import Rows
from .progress import Progress, say


@dataclass
class Plan:
    """What a run trains on: the prepared dataset (manifest and labels, no images), the split, the sample ids.

    ``train_ids`` are sample ids of the prepared ``train`` part; ``val`` the validation rows (carved
    ids of ``train``, or the whole shipped ``val`` part; None without a validation set).
    """

    data: PreparedTarget
    split: D.Split | None
    split_path: Path | None
    train_ids: np.ndarray
    val: Rows | None
    mask_path: Path | None = None


def mask_file(mask: str) -> Path:
    p = Path(mask).expanduser()
    return p / "mask.parquet" if p.is_dir() else p


def existing_mask_file(mask: str) -> Path:
    """:func:`mask_file`, refused at once when it does not exist (before the data: a typo must cost nothing)."""
    p = mask_file(mask)
    if not p.is_file():
        raise MaskError(f"mask {p} not found: pass the mask.parquet (or the directory) that `idtl-ray score` wrote")
    return p


def make_plan(cfg: FinetuneConfig, *, say: Progress | None = None, write: bool = True,
              prepared: str | None = None) -> Plan:
    """Open the data's labels, load the split and pick the training samples (every training id, or those
    the mask keeps). A dataset given by name is prepared into the cache first (``say`` hears about it).

    ``write=False`` (a dry run) leaves ``--out`` untouched: a split it has to make stays in memory.
    ``prepared``: where ``cfg.dataset`` was already prepared (a sweep's driver does it for its trials).
    """
    from ..data.cache import ensure_prepared
    from ..data.samples import open_target, split_note

    mask_path = existing_mask_file(cfg.mask) if cfg.mask and cfg.strategy == "instance" else None
    data = open_target(prepared or ensure_prepared(cfg.dataset, cfg.data_dir, cfg.image_size, say=say))
    shipped = Rows("val", np.arange(len(data.val), dtype=np.int64)) if data.val is not None else None
    if cfg.split == "none":
        if cfg.strategy == "instance":
            raise InputError("--split none cannot be used with --strategy instance: the mask belongs to a split")
        return Plan(data, None, None, np.arange(len(data.train), dtype=np.int64), shipped)
    split_path: Path | None = None  # None: this run's own seeded split, in --out
    if cfg.split:
        split_path = Path(cfg.split).expanduser()
    elif mask_path is not None or cfg.mask and (mask_file(cfg.mask).parent / "split.json").is_file():
        # the mask was scored on the split saved beside it; model/sweep runs given a mask share it too
        split_path = mask_file(str(cfg.mask)).parent / "split.json"
        if not split_path.is_file():
            raise MaskError(f"no split.json beside the mask {mask_path}; pass --split (the split the mask was scored on)")
    if split_path is None:
        split_path = cfg.out_dir / "split.json"
        split = _own_split(cfg, data, split_path, write)
        if (note := split_note(data, cfg.val_fraction, cfg.seed)) is not None:
            say(note) if say is not None else warnings.warn(note, stacklevel=2)
    else:
        split = D.Split.load(split_path)
    _, _, ids = D.apply_split(data, split)  # refuses a split of another dataset
    val = shipped if split.val_source == "shipped" else Rows("train", np.asarray(split.val_ids, dtype=np.int64))
    if mask_path is None:
        return Plan(data, split, split_path, ids, val)
    mask = read_mask(mask_path)
    check_mask(mask, data.fingerprint(), split.fingerprint(), data.name)
    kept = mask.kept_ids
    outside = np.setdiff1d(kept, ids)
    if outside.size:
        raise MaskError(f"the mask keeps {outside.size} sample ids that are not training samples of the split "
                        f"(e.g. {int(outside[0])}); re-run `idtl-ray score`")  # fmt: skip
    if kept.size == 0:
        raise MaskError(f"the mask {mask_path} keeps no samples; lower --drop-threshold or set --drop-budget when scoring")
    return Plan(data, split, split_path, ids[np.isin(ids, kept)], val, mask_path)


def _own_split(cfg: FinetuneConfig, data: PreparedTarget, path: Path, write: bool) -> D.Split:
    """The seeded split of ``--seed``/``--val-fraction``, saved at ``path``; a rerun's saved one must be the same.

    A split left in ``--out`` by a run that stopped before its config.json (or by an older dry run) would
    otherwise be reused with other settings, and train on another split than config.json records.
    """
    split = D.make_split(data, cfg.val_fraction, cfg.seed)
    if path.is_file():
        old = D.Split.load(path)
        if old.fingerprint() != split.fingerprint():
            other = ", of another dataset" if old.dataset_fingerprint != split.dataset_fingerprint else ""
            raise InputError(f"{path} holds another split (--seed {old.seed} --val-fraction {old.val_fraction}{other}) "
                             f"than this run makes (--seed {cfg.seed} --val-fraction {cfg.val_fraction}): use another "
                             "--out, or delete that directory to start over")
        return old
    if write:
        split.save(path)
    return split


# ── Stage 2: model ────────────────────────────────────────────────────────────────────────────────


def apply_freeze(model: nn.Module, cfg: FinetuneConfig) -> list[str]:
    """Apply ``--freeze N`` (layers 1..N) or ``--freeze-conv`` (only Linear layers train); returns frozen names.

    The driver (for ``dry_run`` and the initial weights) and every Train worker call this same function.
    """
    if cfg.freeze_conv:
        return M.freeze_all_but_head(model)
    if cfg.freeze is not None:
        try:
            return M.freeze_first(model, cfg.freeze)
        except ValueError as e:
            raise InputError(f"--freeze {cfg.freeze}: {e}") from e
    for p in model.parameters():
        p.requires_grad_(True)
    return []


def _adapted_model_path(cfg: FinetuneConfig) -> Path | None:
    """``model.pt`` (scoring's adapted model, fitted head) beside the mask or the split, if present."""
    dirs = []
    if cfg.mask:
        dirs.append(mask_file(cfg.mask).parent)
    if cfg.split and cfg.split != "none":
        dirs.append(Path(cfg.split).expanduser().parent)
    for d in dirs:
        if (d / "model.pt").is_file():
            return d / "model.pt"
    return None


def _load_adapted(model: nn.Module, path: Path, data: PreparedTarget | D.TargetData | None,
                  loaded: list[str], weights: str) -> None:
    """Start from scoring's adapted model (its fitted head) when it was adapted from these very weights.

    ``loaded``: the tensors ``--weights`` just put into ``model``. Each must equal model.pt's, or the head
    was fitted on another backbone's features (other weights, or a file re-trained since scoring).
    """
    adapted, meta = M.load_checkpoint(path)
    want = {k: model.idtl_config[k] for k in ("model_name", "num_classes", "in_channels", "image_size")}
    have = {k: adapted.idtl_config[k] for k in want}
    if want != have:
        raise WeightsError(f"{path} is a {have} model but this run needs {want}; delete or move it, or match --model")
    fp = meta.get("dataset_fingerprint")
    if data is not None and fp is not None and fp != data.fingerprint():
        raise WeightsError(f"{path} was adapted to another dataset (fingerprint {fp}); delete or move it")
    ours, theirs = model.state_dict(), adapted.state_dict()
    differ = [k for k in loaded if not torch.equal(ours[k], theirs[k])]
    if differ:
        raise WeightsError(
            f"{path} (the model the mask was scored with, head fitted) was adapted from other weights "
            f"({meta.get('weights_arg', 'unknown')}) than --weights {weights}: {len(differ)} backbone tensors differ, "
            f"e.g. {differ[0]}. Pass the --weights the mask was scored with, or move model.pt away to start "
            "from a Xavier head")
    model.load_state_dict(theirs)


def build_finetune_model(
    cfg: FinetuneConfig, num_classes: int, in_channels: int, image_size: int,
    data: PreparedTarget | D.TargetData | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a run starts from: strategy init, then hybrid init, then freezing.

    - scratch: ``build_model`` with Xavier init (seeded by ``cfg.seed``); weights are ignored.
    - model/instance: ``load_weights``; a head with another class count starts from the adapted
      ``model.pt`` beside the mask/split when present (see the module docstring), else Xavier.
    - ``hybrid_init=K``: a fresh Xavier model whose layers 1..K are copied bitwise from the loaded one.
    - ``freeze``/``freeze_conv``: :func:`apply_freeze`.

    Returns ``(model, info)`` with info keys ``weights``, ``head``, ``hybrid_copied``, ``frozen``.
    """
    torch.manual_seed(cfg.seed)  # same Xavier draw on every call: driver, tests and reruns agree
    try:
        model = M.build_model(cfg.model, num_classes, in_channels, image_size)
    except ValueError as e:  # the message names the model
        raise InputError(str(e)) from e
    info: dict[str, Any] = {"weights": "none", "head": "xavier", "hybrid_copied": 0, "frozen": []}
    if cfg.strategy != "scratch":
        source = model if cfg.hybrid_init is None else M.build_model(cfg.model, num_classes, in_channels, image_size)
        report = M.load_weights(source, cfg.model, cfg.weights)
        info["weights"] = report["source"]
        info["head"] = "xavier" if report["head_replaced"] else "loaded"
        adapted = _adapted_model_path(cfg) if report["head_replaced"] else None
        if adapted is not None:
            _load_adapted(source, adapted, data, report["loaded"], cfg.weights)
            info["head"] = f"adapted:{adapted}"
        if cfg.hybrid_init is not None:
            try:
                info["hybrid_copied"] = len(M.hybrid_init(model, source.state_dict(), cfg.hybrid_init))
            except ValueError as e:
                raise InputError(f"--hybrid-init {cfg.hybrid_init}: {e}") from e
            if cfg.hybrid_init < len(M.layers(model)):
                info["head"] = "xavier"
    info["frozen"] = apply_freeze(model, cfg)
    return model, info


def trainable_params(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def arch_of(data: PreparedTarget | D.TargetData) -> tuple[int, int, int]:
    h, _, c = data.image_shape
    return data.num_classes, c, h


def dry_run(cfg: FinetuneConfig) -> str:
    """The layer table after hybrid init and freezing, trainable params, and the training sample count."""
    plan = make_plan(cfg, say=say, write=False)
    model, info = build_finetune_model(cfg, *arch_of(plan.data), data=plan.data)
    total = sum(p.numel() for p in model.parameters())
    lines = [
        M.describe_layers(model),
        f"strategy: {cfg.strategy}; weights: {info['weights']}; head: {info['head']}; "
        f"hybrid-init copied {info['hybrid_copied']} tensors; frozen {len(info['frozen'])} tensors",
        f"trainable parameters: {trainable_params(model):,} of {total:,}",
        f"training samples: {len(plan.train_ids):,} of {len(plan.data.train):,}"
        + (f" (mask {plan.mask_path})" if plan.mask_path else ""),
    ]
    return "\n".join(lines)
