"""Fine-tuning on Ray Train: from scratch, model-based and instance-based (paper 3.2-3.3, section 4).

Stages of :func:`run_finetune`:
  1. plan      load the dataset and the split (for ``instance``: the split.json beside the mask), check
               that the mask belongs to both, pick the training sample ids
  2. model     build the adapted model on the driver: Xavier (``scratch``) or pre-trained weights
               (``model``/``instance``), optional hybrid init (Table 4) and freezing (Tables 3, 6)
  3. data      the training samples -> a Ray Data dataset (sample_id, image uint8 NHWC tensor, label);
               validation and test arrays and the initial weights go to the object store once
  4. train     a TorchTrainer (Train V2): DDP workers read their shard, augment and normalise in the
               worker, Adam with lr x0.1 at ``lr_drop_at`` of the epochs; a checkpoint every epoch,
               restored after a worker failure or when the same command runs again
  5. outputs   ``config.json``, ``metrics.json``/``metrics.csv``, ``curves.png``, ``final.json``,
               ``model.pt`` and ``seen_ids.npy`` (the sample ids the workers trained on in epoch 0)

Head policy: when the pre-trained head does not fit the target classes (``load_weights`` reports
``head_replaced``), the ``model`` and ``instance`` strategies start from ``model.pt`` beside the
mask (or beside ``--split``) when that file exists: it is the scoring stage's adapted model whose
new head was fitted by a linear probe, i.e. the very model the influence scores were computed at.
Without that file the new head starts Xavier. ``scratch`` never loads weights.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import data as D
from . import models as M
from .errors import IdtlError, InputError, MaskError, WeightsError
from .mask import check_mask, read_mask, write_mask
from .storage import (atomic_path, digest, ids_digest, json_digest, save_figure_atomic, write_json_atomic,
                      write_text_atomic)

STRATEGIES = ("scratch", "model", "instance")
STRATEGY_TITLES = {"scratch": "from Scratch", "model": "Model-based TL", "instance": "Instance-based TL"}
FAULT_MARKER = ".fault_injected"

# Fields that do not change what is trained: a rerun that differs only in these resumes the same run.
# ``epochs``/``eval_every`` are left out too, so a rerun with more epochs continues from the checkpoint.
_NON_IDENTITY = ("out", "address", "max_failures", "cpus_per_worker", "gpus_per_worker", "epochs", "eval_every",
                 "fault_inject_kill_epoch")  # fmt: skip


class TrainingError(IdtlError, RuntimeError):
    """A Ray Train run failed (after its retries) or produced no checkpoint."""


@dataclass
class FinetuneConfig:
    """Settings of `idtl-ray finetune`: data, strategy, recipe, Ray resources and output directory."""

    dataset: str = field(default="digits", metadata={"help": "Target dataset: a registry name, npz:PATH or folder:PATH."})
    model: str = field(default="sample-cnn", metadata={"help": "Model architecture (sample-cnn, vgg16, resnet50, densenet121, resnet18)."})
    strategy: str = field(default="instance", metadata={"help": "scratch (Xavier init), model (all training samples) or instance (the samples the mask keeps)."})
    mask: str | None = field(default=None, metadata={"help": "Mask Parquet file (or its directory) from `idtl-ray score`; required for --strategy instance."})
    weights: str = field(default="none", metadata={"help": "Pre-trained weights for model/instance: imagenet, a checkpoint/state-dict PATH, or none."})
    data_dir: str | None = field(default=None, metadata={"help": "Where datasets live (default $IDTL_DATA_DIR or ~/.cache/idtl-ray/data)."})
    image_size: int | None = field(default=None, metadata={"help": "Resize folder datasets to this size (default 64)."})
    val_fraction: float = field(default=0.1, metadata={"help": "Validation share carved from train when no split is given (paper: 10%)."})
    split: str | None = field(default=None, metadata={"help": "split.json to use (default: beside the mask for instance, else a new seeded split); 'none' trains on every training sample."})
    epochs: int = field(default=1, metadata={"help": "Training epochs."})
    batch_size: int = field(default=128, metadata={"help": "Mini-batch size per worker (paper: 128; 64 for DenseNet-121; 16 for Table 6)."})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate (paper: 1e-3)."})
    lr_drop_at: float = field(default=0.5, metadata={"help": "Multiply the lr by 0.1 from this fraction of the epochs on (paper: 0.5; 1 = never)."})
    freeze: int | None = field(default=None, metadata={"help": "Freeze the first N layers (conv/FC, with their BNs; paper Table 3)."})
    freeze_conv: bool = field(default=False, metadata={"help": "Train only the fully connected layers (paper Table 6)."})
    hybrid_init: int | None = field(default=None, metadata={"help": "Load only the first K layers from the weights, Xavier the rest (paper Table 4)."})
    workers: int = field(default=1, metadata={"help": "Ray Train workers (DDP ranks)."})
    gpus_per_worker: float = field(default=0.0, metadata={"help": "GPUs per worker (0 = train on CPU)."})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs per worker (0.5 on a 2-CPU box leaves room for Ray Data)."})
    eval_every: int = field(default=1, metadata={"help": "Evaluate validation accuracy and test error every N epochs (and after the last)."})
    seed: int = field(default=0, metadata={"help": "Seed of the split (when one is made), the init and the shuffling."})
    out: str | None = field(default=None, metadata={"help": "Run directory (default runs/finetune-<dataset>-<model>-<strategy>); rerunning resumes."})
    augment: bool = field(default=True, metadata={"help": "Use the dataset's training augmentation (flip/translate for CIFAR, none for digits)."})
    max_failures: int = field(default=1, metadata={"help": "Worker failures to recover from (restart from the last checkpoint)."})
    address: str | None = field(default=None, metadata={"help": "Ray cluster to join (default: start an embedded local Ray)."})
    fault_inject_kill_epoch: int | None = field(default=None, metadata={"help": "TEST ONLY: rank 0 kills its own process once in this epoch (marker file in --out)."})

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InputError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.model not in M.MODELS:
            raise InputError(f"unknown model {self.model!r}; choose one of {', '.join(M.MODELS)}")
        if self.strategy == "instance" and not self.mask:
            raise InputError("--strategy instance needs --mask (the mask.parquet written by `idtl-ray score`)")
        if self.strategy != "scratch" and self.weights in (None, "none"):
            raise InputError(f"--strategy {self.strategy} fine-tunes pre-trained weights; pass --weights imagenet|PATH "
                             f"or use --strategy scratch")  # fmt: skip
        if self.strategy == "scratch" and self.hybrid_init is not None:
            raise InputError("--hybrid-init loads pre-trained layers; use it with --strategy model or instance")
        if self.freeze is not None and self.freeze_conv:
            raise InputError("pass either --freeze N or --freeze-conv, not both")
        if not 0.0 < self.val_fraction < 1.0:
            raise InputError(f"val_fraction must be in (0, 1), got {self.val_fraction}: the paper uses 0.1")
        if not 0.0 < self.lr_drop_at <= 1.0:
            raise InputError(f"lr_drop_at must be in (0, 1], got {self.lr_drop_at}: the paper uses 0.5, 1 means never")
        for name in ("epochs", "batch_size", "workers", "eval_every"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise InputError(f"lr must be positive, got {self.lr}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise InputError("cpus_per_worker must be > 0 and gpus_per_worker >= 0")
        if 0 < self.gpus_per_worker < 1 and self.workers > 1:  # DDP would put several ranks on one GPU
            raise InputError(f"--gpus-per-worker {self.gpus_per_worker:g} with {self.workers} workers would share a GPU "
                             "between DDP ranks (NCCL refuses it): use whole GPUs per worker, or one worker")
        if self.freeze is not None and self.freeze < 0 or self.hybrid_init is not None and self.hybrid_init < 0:
            raise InputError("--freeze and --hybrid-init take a layer count >= 0")

    @property
    def out_dir(self) -> Path:
        """The run directory (``out`` or a default derived from dataset, model and strategy)."""
        safe = self.dataset.replace(":", "-").replace("/", "_")
        return Path(self.out or f"runs/finetune-{safe}-{self.model}-{self.strategy}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that define what is trained (what a resumed run must agree on)."""
        return {k: v for k, v in self.to_dict().items() if k not in _NON_IDENTITY}

    def run_name(self) -> str:
        """Deterministic Ray Train run name: same config -> same name -> Ray Train resumes it."""
        return f"finetune-{self.strategy}-{json_digest(self.identity(), length=12)}"


# ── Stage 1: plan ─────────────────────────────────────────────────────────────────────────────────


@dataclass
class Plan:
    """What a run trains on: the dataset, the split, the training samples and their ids."""

    data: D.TargetData
    split: D.Split | None
    split_path: Path | None
    train: D.ImageArrays
    train_ids: np.ndarray
    val: D.ImageArrays | None
    mask_path: Path | None = None


def _mask_file(mask: str) -> Path:
    p = Path(mask).expanduser()
    return p / "mask.parquet" if p.is_dir() else p


def make_plan(cfg: FinetuneConfig) -> Plan:
    """Load data and split and pick the training samples (every training id, or those the mask keeps)."""
    data = D.load_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size)
    mask_path = _mask_file(cfg.mask) if cfg.mask and cfg.strategy == "instance" else None
    if cfg.split == "none":
        if cfg.strategy == "instance":
            raise InputError("--split none cannot be used with --strategy instance: the mask belongs to a split")
        ids = np.arange(len(data.train), dtype=np.int64)
        return Plan(data, None, None, data.train, ids, data.val)
    if cfg.split:
        split_path = Path(cfg.split).expanduser()
    elif mask_path is not None or cfg.mask and (_mask_file(cfg.mask).parent / "split.json").is_file():
        # the mask was scored on the split saved beside it; model/sweep runs given a mask share it too
        split_path = _mask_file(str(cfg.mask)).parent / "split.json"
        if not split_path.is_file():
            raise MaskError(f"no split.json beside the mask {mask_path}; pass --split (the split the mask was scored on)")
    else:
        split_path = cfg.out_dir / "split.json"
        if not split_path.is_file():  # a rerun reuses the split it made (it is deterministic anyway)
            D.make_split(data, cfg.val_fraction, cfg.seed).save(split_path)
    split = D.Split.load(split_path)
    train, val, ids = D.apply_split(data, split)
    if mask_path is None:
        return Plan(data, split, split_path, train, ids, val)
    mask = read_mask(mask_path)
    check_mask(mask, data.fingerprint(), split.fingerprint(), data.name)
    kept = mask.kept_ids
    outside = np.setdiff1d(kept, ids)
    if outside.size:
        raise MaskError(f"the mask keeps {outside.size} sample ids that are not training samples of the split "
                        f"(e.g. {int(outside[0])}); re-run `idtl-ray score`")  # fmt: skip
    if kept.size == 0:
        raise MaskError(f"the mask {mask_path} keeps no samples; lower --drop-threshold or set --drop-budget when scoring")
    sel = np.flatnonzero(np.isin(ids, kept))
    return Plan(data, split, split_path, train.take(sel), ids[sel], val, mask_path)


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
        dirs.append(_mask_file(cfg.mask).parent)
    if cfg.split and cfg.split != "none":
        dirs.append(Path(cfg.split).expanduser().parent)
    for d in dirs:
        if (d / "model.pt").is_file():
            return d / "model.pt"
    return None


def _load_adapted(model: nn.Module, path: Path, data: D.TargetData | None) -> None:
    adapted, meta = M.load_checkpoint(path)
    want = {k: model.idtl_config[k] for k in ("model_name", "num_classes", "in_channels", "image_size")}
    have = {k: adapted.idtl_config[k] for k in want}
    if want != have:
        raise WeightsError(f"{path} is a {have} model but this run needs {want}; delete or move it, or match --model")
    fp = meta.get("dataset_fingerprint")
    if data is not None and fp is not None and fp != data.fingerprint():
        raise WeightsError(f"{path} was adapted to another dataset (fingerprint {fp}); delete or move it")
    model.load_state_dict(adapted.state_dict())


def build_finetune_model(
    cfg: FinetuneConfig, num_classes: int, in_channels: int, image_size: int, data: D.TargetData | None = None
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
    except ValueError as e:
        raise InputError(f"{cfg.model}: {e}") from e
    info: dict[str, Any] = {"weights": "none", "head": "xavier", "hybrid_copied": 0, "frozen": []}
    if cfg.strategy != "scratch":
        source = model if cfg.hybrid_init is None else M.build_model(cfg.model, num_classes, in_channels, image_size)
        report = M.load_weights(source, cfg.model, cfg.weights)
        info["weights"] = report["source"]
        info["head"] = "xavier" if report["head_replaced"] else "loaded"
        adapted = _adapted_model_path(cfg) if report["head_replaced"] else None
        if adapted is not None:
            _load_adapted(source, adapted, data)
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


def _arch(data: D.TargetData) -> tuple[int, int, int]:
    h, _, c = data.image_shape
    return data.num_classes, c, h


def dry_run(cfg: FinetuneConfig) -> str:
    """The layer table after hybrid init and freezing, trainable params, and the training sample count."""
    plan = make_plan(cfg)
    model, info = build_finetune_model(cfg, *_arch(plan.data), data=plan.data)
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


# ── Stage 3: data ─────────────────────────────────────────────────────────────────────────────────


def to_ray_dataset(x: np.ndarray, y: np.ndarray, ids: np.ndarray, blocks: int = 16) -> Any:
    """Columns sample_id (int64), image (ArrowTensorArray uint8 NHWC), label (int64), in ``blocks`` blocks.

    Several blocks let ``streaming_split`` hand work to every worker.
    """
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    n = len(ids)
    step = max(1, math.ceil(n / max(1, blocks)))
    tables = [
        pa.table({
            "sample_id": pa.array(np.asarray(ids[i : i + step], dtype=np.int64)),
            "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(x[i : i + step])),
            "label": pa.array(np.asarray(y[i : i + step], dtype=np.int64)),
        })
        for i in range(0, n, step)
    ]  # fmt: skip
    return ray.data.from_arrow(tables)


def _exact_split_config() -> Any:
    """A DataConfig whose split keeps every row.

    Ray's default ``streaming_split(equal=True)`` drops up to ``workers - 1`` rows to even the shards,
    so instance training would silently lose kept samples; the uneven shards this leaves are handled
    by DDP's ``join()`` in the worker.
    """
    import ray.train

    class ExactSplitDataConfig(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):  # type: ignore[no-untyped-def]
            out: list[dict[str, Any]] = [{} for _ in range(world_size)]
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self.default_ingest_options()
                for i, it in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    out[i][name] = it
            return out

    return ExactSplitDataConfig()


# ── Stage 4: train (runs in every Ray Train worker) ───────────────────────────────────────────────


def lr_at(cfg: FinetuneConfig, epoch: int) -> float:
    """Learning rate of ``epoch``: ``lr``, x0.1 from epoch ``max(1, round(lr_drop_at * epochs))`` on."""
    drop = max(1, int(round(cfg.lr_drop_at * cfg.epochs)))
    return cfg.lr * (0.1 if cfg.lr_drop_at < 1.0 and epoch >= drop else 1.0)


def _images(x: np.ndarray, aug: Callable[[torch.Tensor], torch.Tensor] | None, mean: Any, std: Any) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW; augmentation per sample on [0, 1] CHW tensors (as ImageDataset)."""
    if aug is None:
        return D.to_tensor(x, mean, std)
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0)
    t = torch.stack([aug(s) for s in t])
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (t - m) / s


@torch.no_grad()
def _accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, mean: Any, std: Any, device: torch.device) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), 512):
        logits = model(D.to_tensor(x[i : i + 512], mean, std).to(device))
        correct += int((logits.argmax(1).cpu() == torch.as_tensor(y[i : i + 512])).sum())
    return correct / max(1, len(y))


def _frozen_bn_eval(model: nn.Module) -> None:
    """Keep BatchNorms of frozen layers in eval mode, so their running statistics stay pre-trained too."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and not m.weight.requires_grad:
            m.eval()


# 16-hex sha256 of the sorted int64 ids (order-free fingerprint of a multiset of sample ids)
ids_hash = ids_digest


def _train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop (every rank): restore, train, evaluate on rank 0, checkpoint, report."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg = FinetuneConfig(**config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # the driver's model object itself: unpickling needs no torchvision import for sample-cnn (slow to start)
    model = ray.get(config["init_model"])
    apply_freeze(model, cfg)
    start, history, attempts, seen = 0, [], [], None
    opt_state = None
    if ckpt := ray.train.get_checkpoint():
        with ckpt.as_directory() as d:
            st = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
            seen = np.load(Path(d) / "seen_ids.npy")
        model.load_state_dict(st["model"])
        opt_state, start = st["optimizer"], int(st["epoch"]) + 1
        history, attempts = list(st["history"]), list(st["attempts"])
    attempts.append(start)  # where this worker group began: 0 for a fresh run, k+1 after a restore
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model)
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    torch.manual_seed(cfg.seed * 1000 + rank + 7919 * start)
    evals = ray.get(config["eval"]) if rank == 0 else None  # only rank 0 evaluates
    mean, std = config["mean"], config["std"]
    aug = config["augment"]
    shard = ray.train.get_dataset_shard("train")
    loss_fn = nn.CrossEntropyLoss(reduction="sum")

    def save_and_report(epoch: int, row: dict[str, Any]) -> None:
        metrics = {k: v for k, v in row.items() if v is not None}
        metrics.update(start_epoch=start, n_seen_epoch0=len(seen), seen_hash=ids_hash(seen))
        with tempfile.TemporaryDirectory() as d:
            ck = None
            if rank == 0:  # one copy of the state; every rank still calls report (V2 barrier)
                torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                            "history": history, "attempts": attempts}, Path(d) / "state.pt")  # fmt: skip
                np.save(Path(d) / "seen_ids.npy", seen)
                ck = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ck, checkpoint_dir_name=f"checkpoint_epoch={epoch:05d}")

    for epoch in range(start, cfg.epochs):
        lr = lr_at(cfg, epoch)
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        _frozen_bn_eval(net)
        loss_sum, count, epoch_ids = 0.0, 0, []
        # DDP.join(): shards may differ by a few rows (no row is dropped), so ranks run unequal step counts
        join = model.join() if isinstance(model, nn.parallel.DistributedDataParallel) else nullcontext()
        with join:
            batches = shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy",
                                         local_shuffle_buffer_size=max(cfg.batch_size, min(4096, config["n_train"])),
                                         local_shuffle_seed=cfg.seed + 1000 * epoch + rank)  # fmt: skip
            for b, batch in enumerate(batches):
                if cfg.fault_inject_kill_epoch == epoch and rank == 0 and b == 1:
                    marker = Path(cfg.out_dir) / FAULT_MARKER
                    if not marker.exists():
                        # the controller collects reports asynchronously: wait until the last
                        # checkpoint is registered, so the test knows which one the restart must use
                        ray.train.get_all_reported_checkpoints(timeout_s=120)
                        marker.parent.mkdir(parents=True, exist_ok=True)
                        marker.write_text(f"killed pid {os.getpid()} in epoch {epoch}\n")
                        os.kill(os.getpid(), signal.SIGKILL)
                xb = _images(batch["image"], aug, mean, std).to(device)
                yb = torch.as_tensor(batch["label"], dtype=torch.long).to(device)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                (loss / len(yb)).backward()
                opt.step()
                loss_sum += float(loss.detach())
                count += len(yb)
                if epoch == 0:
                    epoch_ids.append(np.asarray(batch["sample_id"], dtype=np.int64))
        totals = torch.tensor([loss_sum, float(count)], dtype=torch.float64, device=device)  # NCCL needs device tensors
        if epoch == 0:
            mine = np.concatenate(epoch_ids) if epoch_ids else np.zeros(0, np.int64)
            parts = [mine]
            if world > 1 and dist.is_initialized():
                parts = [None] * world
                dist.all_gather_object(parts, mine)
            seen = np.concatenate(parts).astype(np.int64)
        if world > 1 and dist.is_initialized():
            dist.all_reduce(totals)
        totals = totals.cpu()
        row: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_loss": float(totals[0] / max(1.0, float(totals[1]))),
                               "val_acc": None, "test_error": None}  # fmt: skip
        if rank == 0 and ((epoch + 1) % cfg.eval_every == 0 or epoch == cfg.epochs - 1):
            if evals["val_x"] is not None and len(evals["val_y"]):
                row["val_acc"] = 100.0 * _accuracy(net, evals["val_x"], evals["val_y"], mean, std, device)
            row["test_error"] = 100.0 * (1.0 - _accuracy(net, evals["test_x"], evals["test_y"], mean, std, device))
        history.append(row)
        save_and_report(epoch, row)
    if start >= cfg.epochs and history:
        # a finished run started again: hand its final state back as this run's checkpoint (0 more epochs)
        save_and_report(start - 1, history[-1])


# ── Stage 5: outputs ──────────────────────────────────────────────────────────────────────────────


def _write_csv(rows: list[dict[str, Any]], path: Path, columns: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def plot_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Validation accuracy and test error vs epoch (the paper's Figure 2), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in ((a1, "val_acc", "validation accuracy (%)"), (a2, "test_error", "test error (%)")):
        pts = [(r["epoch"] + 1, r[key]) for r in history if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def _check_out_dir(cfg: FinetuneConfig) -> Path:
    out = cfg.out_dir.expanduser().resolve()
    prev = out / "config.json"
    if prev.is_file():
        old = json.loads(prev.read_text(encoding="utf-8"))
        diff = sorted(k for k, v in cfg.identity().items() if k in old and old[k] != v)
        if diff:
            raise InputError(f"{out} holds a run with another config (differs in {', '.join(diff)}); "
                             f"pass another --out or delete that directory")  # fmt: skip
    return out


def _check_resources(cfg: FinetuneConfig) -> None:
    """Refuse up front what would otherwise hang: workers that can never be scheduled."""
    import ray

    res = ray.cluster_resources()
    need_cpu = cfg.workers * cfg.cpus_per_worker
    if cfg.address is None and need_cpu > res.get("CPU", 0.0):
        raise InputError(f"{cfg.workers} workers x {cfg.cpus_per_worker} CPUs need {need_cpu:g} CPUs but the local Ray "
                         f"has {res.get('CPU', 0.0):g}; lower --workers or --cpus-per-worker (e.g. 0.5)")  # fmt: skip
    need_gpu = cfg.workers * cfg.gpus_per_worker
    if cfg.address is None and need_gpu > res.get("GPU", 0.0):
        raise InputError(f"{cfg.workers} workers x {cfg.gpus_per_worker} GPUs need {need_gpu:g} GPUs but the local Ray "
                         f"has {res.get('GPU', 0.0):g}; pass --gpus-per-worker 0 or join a GPU cluster with --address")  # fmt: skip


# ── Progress: epochs as Ray Train reports them, printed by the driver ─────────────────────────────

Progress = Callable[[str], None]


def say(msg: str) -> None:
    """A progress line on stderr (as `score` prints them), flushed at once."""
    print(msg, file=sys.stderr, flush=True)


def _emitter(progress: bool | Progress | None, prefix: str = "") -> Progress | None:
    """``True`` -> lines on stderr; a callable receives the lines; ``False``/``None`` -> silent."""
    if not progress:
        return None
    emit = say if progress is True else progress
    return (lambda msg: emit(prefix + msg)) if prefix else emit


def epoch_line(row: dict[str, Any], epochs: int, elapsed_s: float) -> str:
    """``epoch 2/10: train loss 0.4123, val acc 91.20%, test error 8.35% (63 s)``."""
    parts = [f"epoch {int(row['epoch']) + 1}/{epochs}: train loss {row['train_loss']:.4f}"]
    if row.get("val_acc") is not None:
        parts.append(f"val acc {row['val_acc']:.2f}%")
    if row.get("test_error") is not None:
        parts.append(f"test error {row['test_error']:.2f}%")
    return ", ".join(parts) + f" ({elapsed_s:.0f} s)"


class _ProgressBoard:
    """A mailbox actor: Ray Train's controller posts each epoch's metrics, the driver takes them.

    The controller (where callbacks run) is an actor of its own, and the workers too: with
    ``log_to_driver=False`` none of their prints reach the user, so the driver prints instead.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def put(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def take(self) -> list[dict[str, Any]]:
        rows, self.rows = self.rows, []
        return rows


def _epoch_callback(board: Any) -> Any:
    """A Ray Train ``UserCallback`` that posts rank 0's metrics of every report to ``board``."""
    from ray.train import UserCallback

    class EpochReporter(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics and "epoch" in metrics[0]:
                board.put.remote(dict(metrics[0]))

    return EpochReporter()


class _Relay:
    """While ``trainer.fit()`` blocks the driver, a thread prints the epochs the board receives."""

    def __init__(self, emit: Progress, epochs: int, poll_s: float = 0.5):
        import ray

        self.emit, self.epochs, self.poll_s = emit, epochs, poll_s
        self.board = ray.remote(_ProgressBoard).options(num_cpus=0).remote()  # needs no CPU: never blocks a worker
        self.callback = _epoch_callback(self.board)
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="idtl-train-progress", daemon=True)

    def __enter__(self) -> _Relay:
        self._thread.start()
        return self

    def _drain(self) -> None:
        import ray

        for row in ray.get(self.board.take.remote(), timeout=10):
            # a finished run started again re-reports its last epoch (start_epoch is past it): not news
            if int(row["epoch"]) >= int(row.get("start_epoch", 0)):
                self.emit(epoch_line(row, self.epochs, time.monotonic() - self.t0))

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._drain()
            except Exception:  # progress must never break training (e.g. Ray shutting down)
                return

    def __exit__(self, *exc: Any) -> None:
        import ray

        self._stop.set()
        self._thread.join(timeout=15)
        try:
            self._drain()  # the last epoch's row, reported just before fit() returned
        except Exception:
            pass
        ray.kill(self.board)


def run_finetune(cfg: FinetuneConfig, *, callbacks: list[Any] | None = None, run_name: str | None = None,
                 progress: bool | Progress = False) -> dict[str, Any]:
    """Train one strategy with Ray Train and write the run directory; returns the ``final.json`` dict.

    Running it again with the same ``out`` and config resumes: a finished run returns its saved
    results at once, an interrupted one continues from its last checkpoint. ``callbacks`` (Ray Train
    ``UserCallback``s, e.g. Tune's ``TuneReportCallback``) and ``run_name`` are for :mod:`idtl_ray.sweep`.
    ``progress``: ``True`` prints a line per epoch on stderr (loss, validation accuracy, test error,
    elapsed time), a callable receives those lines instead; off by default (Tune trials, tests).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    out = _check_out_dir(cfg)
    plan = make_plan(cfg)
    # The config names the mask by its path; what it keeps can change (a re-scored mask). A run trained
    # on other samples must not be resumed or returned as if it were this one.
    ids_sha = digest(np.asarray(plan.train_ids, dtype=np.int64))  # in plan order (unlike ids_hash)
    prev = out / "config.json"
    if prev.is_file():
        old_sha = json.loads(prev.read_text(encoding="utf-8")).get("train_ids_sha")
        if old_sha is not None and old_sha != ids_sha:
            raise InputError(f"{out} holds a run trained on other samples (the mask changed since; it now keeps "
                             f"{len(plan.train_ids)}): choose another --out, or remove that directory to retrain")
    emit = _emitter(progress)
    final_path = out / "final.json"
    if final_path.is_file():
        final = json.loads(final_path.read_text(encoding="utf-8"))
        if final.get("epochs") == cfg.epochs and (out / "model.pt").is_file():
            if emit:
                emit(f"{out} already holds the finished run ({cfg.epochs} epochs): nothing to train")
            return final
    model, info = build_finetune_model(cfg, *_arch(plan.data), data=plan.data)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic({**cfg.to_dict(), "train_ids_sha": ids_sha}, out / "config.json")
    from .scoring import ensure_ray

    ensure_ray(cfg.address)
    _check_resources(cfg)

    import ray

    test = plan.data.test
    evals = {"val_x": plan.val.x if plan.val is not None else None, "val_y": plan.val.y if plan.val is not None else None,
             "test_x": test.x, "test_y": test.y}  # fmt: skip
    loop_config = {
        "cfg": replace(cfg, out=str(out)).to_dict(),  # absolute: Ray Train changes the workers' cwd
        "init_model": ray.put(model),  # once in the object store instead of once per worker config
        "augment": D.augmentation(cfg.dataset) if cfg.augment else None,
        "eval": ray.put(evals),
        "mean": plan.data.mean,
        "std": plan.data.std,
        "n_train": int(len(plan.train_ids)),
    }
    resources: dict[str, float] = {"CPU": cfg.cpus_per_worker}
    if cfg.gpus_per_worker > 0:
        resources["GPU"] = cfg.gpus_per_worker
    name = run_name or cfg.run_name()
    relay = _Relay(emit, cfg.epochs) if emit else None
    if emit:
        emit(f"training {cfg.model} on {len(plan.train_ids)} samples of {cfg.dataset} for {cfg.epochs} epoch"
             f"{'s' if cfg.epochs > 1 else ''} on {cfg.workers} Ray Train worker{'s' if cfg.workers > 1 else ''}")
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0,
                                               resources_per_worker=resources),  # fmt: skip
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(out / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[*(callbacks or []), *([relay.callback] if relay else [])] or None,
        ),
        datasets={"train": to_ray_dataset(plan.train.x, plan.train.y, plan.train_ids, blocks=8 * cfg.workers)},
        dataset_config=_exact_split_config(),
    )
    try:
        with relay or nullcontext():
            result = trainer.fit()
    except Exception as e:  # V2 raises TrainingFailedError (wrapping the worker's error) after retries
        raise TrainingError(f"training run {name} failed ({type(e).__name__}: {_first_line(e)}); "
                            f"fix the cause and run the same command again to resume from the last checkpoint") from e
    if getattr(result, "error", None) is not None:
        raise TrainingError(f"training run {name} failed ({_first_line(result.error)}); rerun the same command to resume")
    if result.checkpoint is None:
        raise TrainingError(f"training run {name} reported no checkpoint; delete {out / 'ray'} and run again")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
        seen = np.load(Path(d) / "seen_ids.npy")
    model.load_state_dict(state["model"])
    return _write_outputs(cfg, plan, out, model, state, seen, info, name)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:200] if s else type(e).__name__


def _write_outputs(cfg: FinetuneConfig, plan: Plan, out: Path, model: nn.Module, state: dict[str, Any],
                   seen: np.ndarray, info: dict[str, Any], name: str) -> dict[str, Any]:  # fmt: skip
    history = list(state["history"])
    last = history[-1]
    columns = ["epoch", "lr", "train_loss", "val_acc", "test_error"]
    write_json_atomic(history, out / "metrics.json")
    _write_csv(history, out / "metrics.csv", columns)
    plot_curves(history, out / "curves.png", f"{cfg.strategy}: {cfg.model} on {cfg.dataset}")
    with atomic_path(out / "seen_ids.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.sort(seen))
    final = {
        "strategy": cfg.strategy,
        "dataset": cfg.dataset,
        "model": cfg.model,
        "epochs": len(history),
        "test_error": last["test_error"],
        "val_acc": last["val_acc"],
        "train_loss": last["train_loss"],
        "n_train_samples": int(len(plan.train_ids)),
        "n_seen_epoch0": int(len(seen)),
        "seen_ids_hash": ids_hash(seen),
        "start_epochs": list(state["attempts"]),
        "weights": info["weights"],
        "head": info["head"],
        "trainable_params": trainable_params(model),
        "dataset_fingerprint": plan.data.fingerprint(),
        "split_fingerprint": plan.split.fingerprint() if plan.split is not None else None,
        "mask": str(plan.mask_path) if plan.mask_path else None,
        "run_name": name,
    }
    # classes: the head's class names (`score --head auto` keeps this head only for a target with these)
    M.save_checkpoint(out / "model.pt", model, {**{k: final[k] for k in (
        "strategy", "dataset", "dataset_fingerprint", "split_fingerprint", "epochs", "test_error", "n_train_samples")},
        "classes": list(plan.data.classes)})  # fmt: skip
    write_json_atomic(final, out / "final.json")  # last: its presence means the run is complete
    return final


# ── Pre-training and the three-way comparison ─────────────────────────────────────────────────────


def pretrain(dataset: str, model: str, epochs: int, out: str | Path, batch_size: int = 128, lr: float = 1e-3,
             seed: int = 0, data_dir: str | None = None, image_size: int | None = None, *, workers: int = 1,
             cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, address: str | None = None,
             progress: bool | Progress = True) -> dict[str, Any]:  # fmt: skip
    """Train a source model (paper Table 1: Xavier, Adam 1e-3, batch 128) on every training sample.

    Uses the same TorchTrainer path (strategy scratch, ``split="none"``, no lr drop); the run lives in
    ``<out>.run/`` and the project checkpoint is written at ``out`` with meta {dataset, classes,
    dataset_fingerprint, epochs, test_error} (``classes``: the head's class names, which
    ``score --head auto`` compares with the target's). Returns that meta plus ``path``.
    ``progress``: lines ``pretrain: epoch k/n: ...`` on stderr (a callable receives them; False: silent).
    """
    path = Path(out).expanduser().resolve()
    cfg = FinetuneConfig(dataset=dataset, model=model, strategy="scratch", split="none", epochs=epochs,
                         batch_size=batch_size, lr=lr, lr_drop_at=1.0, seed=seed, data_dir=data_dir,
                         image_size=image_size, workers=workers, cpus_per_worker=cpus_per_worker,
                         gpus_per_worker=gpus_per_worker, address=address, out=str(path) + ".run")  # fmt: skip
    final = run_finetune(cfg, progress=_emitter(progress, "pretrain: ") or False)
    trained, run_meta = M.load_checkpoint(Path(cfg.out_dir) / "model.pt")
    classes = run_meta.get("classes") or list(D.load_dataset(dataset, data_dir, image_size=image_size).classes)
    meta = {"dataset": dataset, "classes": list(classes), "dataset_fingerprint": final["dataset_fingerprint"],
            "epochs": final["epochs"], "test_error": final["test_error"]}  # fmt: skip
    M.save_checkpoint(path, trained, meta)
    if emit := _emitter(progress, "pretrain: "):
        emit(f"wrote {path} (test error {final['test_error']:.2f}%)")
    return {**meta, "path": str(path)}


def _resolve_mask(out: Path, mask: str | None, score_fn: Callable[[str], str] | None) -> Path:
    if mask:
        p = _mask_file(mask)
        if not p.is_file():
            raise MaskError(f"mask {p} not found; run `idtl-ray score` first or leave --mask out to score now")
        return p
    p = out / "score" / "mask.parquet"
    if p.is_file():
        return p
    if score_fn is None:
        raise MaskError(f"no mask given and none at {p}; pass --mask or a score_fn that writes one")
    return _mask_file(str(score_fn(str(out / "score"))))


def compare_table(rows: list[dict[str, Any]], dataset: str) -> str:
    """The paper-style table: strategy, model, test error (%) on ``dataset``, training samples, epochs."""
    lines = [f"| Strategy | Model | {dataset} test error (%) | training samples | epochs |", "|---|---|---|---|---|"]
    for r in rows:
        err = "-" if r["test_error"] is None else f"{r['test_error']:.2f}"
        title = r.get("label") or STRATEGY_TITLES[r["strategy"]]
        lines.append(f"| {title} | {r['model']} | {err} | {r['n_train_samples']} | {r['epochs']} |")
    return "\n".join(lines) + "\n"


def _baseline_mask_files(root: Path, mask_path: Path, split_path: Path, names: tuple[str, ...], dataset: str,
                         data_dir: str | None, image_size: int | None, seed: int) -> list[tuple[str, Path, int]]:  # fmt: skip
    """Write ``<root>/mask-<name>.parquet`` for each baseline: the instance mask's k drops, chosen by ``name``.

    The baselines rank the split's training samples with the scored model beside the mask
    (``model.pt``). Each file carries the instance mask's metadata (so its fingerprints match) plus
    ``baseline``; a file made from the same mask, model and seed is reused, so a rerun resumes.
    """
    from .baselines import baseline_masks

    mask = read_mask(mask_path)
    k = int((~mask.keep).sum())
    model_path = mask_path.parent / "model.pt"
    if not model_path.is_file():
        raise MaskError(f"--baselines ranks samples with the scored model, but there is no {model_path}; "
                        f"re-run `idtl-ray score` (it saves model.pt beside the mask) or leave --baselines out")  # fmt: skip
    data = D.load_dataset(dataset, data_dir, image_size=image_size)
    split = D.Split.load(split_path)
    check_mask(mask, data.fingerprint(), split.fingerprint(), data.name)
    train, _, ids = D.apply_split(data, split)
    order = np.argsort(mask.sample_id, kind="stable")
    if len(mask) != len(ids) or not np.array_equal(mask.sample_id[order], np.sort(ids)):
        raise MaskError(f"the mask {mask_path} does not list exactly the split's {len(ids)} training samples, so "
                        f"the baselines cannot match it; re-run `idtl-ray score`")  # fmt: skip
    pos = order[np.searchsorted(mask.sample_id[order], ids)]  # mask row of each training sample
    model_sha = bytes.fromhex(digest(model_path.read_bytes(), length=None))
    source = digest(np.asarray(mask.sample_id, dtype=np.int64), mask.keep, model_sha, f"|{seed}")
    paths = {name: root / f"mask-{name}.parquet" for name in names}

    def current(p: Path) -> bool:
        try:
            return p.is_file() and read_mask(p).meta.get("baseline_source") == source
        except MaskError:
            return False

    todo = [name for name in names if not current(paths[name])]
    if todo:
        scored, meta = M.load_checkpoint(model_path)
        if meta.get("dataset_fingerprint") not in (None, data.fingerprint()):
            raise WeightsError(f"{model_path} was scored on another dataset; re-run `idtl-ray score` for {data.name}")
        print(f"baselines: ranking {len(ids)} training samples for {', '.join(todo)} (dropping {k} each)", flush=True)
        keeps = baseline_masks(scored, train.x, train.y, data.mean, data.std, k, todo, seed=seed)
        for name, keep in keeps.items():
            write_mask(paths[name], ids, train.y, mask.scores[pos], keep,
                       {**mask.meta, "baseline": name, "baseline_source": source, "n_dropped": k,
                        "drop_rule": {"baseline": name, "k": k, "seed": seed}}, mask.score_name)  # fmt: skip
    return [(name, paths[name], k) for name in names]


def run_compare(dataset: str, model: str, weights: str, epochs: int, *, out: str | Path, mask: str | None = None,
                score_fn: Callable[[str], str] | None = None, scratch_epochs: int | None = None,
                baselines: Sequence[str] | str | None = None, progress: bool | Progress = True,
                **finetune_kw: Any) -> dict[str, Any]:  # fmt: skip
    """Train scratch, model-based and instance-based on the same split; print and save the table.

    The split is the split.json beside the mask. Without ``mask``, ``<out>/score/mask.parquet`` is
    used, or ``score_fn(<out>/score) -> mask path`` makes one (the CLI runs the scoring stage).
    ``scratch_epochs`` (default ``epochs``; the paper trains scratch longer) and ``finetune_kw``
    (any other :class:`FinetuneConfig` field) apply to all three runs. ``baselines`` (names from
    :data:`idtl_ray.baselines.METHODS`) adds one ``instance`` run per baseline on a mask that drops as
    many samples as the instance mask (``<out>/mask-<name>.parquet``, run in ``<out>/baseline-<name>``).
    Writes ``compare.md`` and ``compare.json`` in ``out``; returns ``{"rows": [...final dicts...],
    "table": str, "mask": path, "baselines": {name: mask path}}``. ``progress``: which run is training
    and its epochs, as lines ``compare <run>: ...`` on stderr (a callable receives them; False: silent).
    """
    from .baselines import parse_methods, row_label

    names = parse_methods(baselines)  # before any work
    root = Path(out).expanduser().resolve()
    bad = {"dataset", "model", "weights", "epochs", "strategy", "mask", "split", "out"} & set(finetune_kw)
    if bad:
        raise InputError(f"run_compare sets {', '.join(sorted(bad))} itself; pass them as its own arguments")
    mask_path = _resolve_mask(root, mask, score_fn)
    split = mask_path.parent / "split.json"
    if not split.is_file():
        raise MaskError(f"no split.json beside the mask {mask_path}; the comparison needs the split the mask was scored on")
    extra = _baseline_mask_files(root, mask_path, split, names, dataset, finetune_kw.get("data_dir"),
                                 finetune_kw.get("image_size"), int(finetune_kw.get("seed", 0))) if names else []  # fmt: skip
    rows = []
    runs = len(STRATEGIES) + len(extra)

    def announce(i: int, name: str, title: str, cfg: FinetuneConfig) -> bool | Progress:
        """Say which run starts; the run's own lines get its name as prefix."""
        if emit := _emitter(progress):
            emit(f"compare: run {i} of {runs}, {name} ({title}, {cfg.epochs} epoch{'s' if cfg.epochs > 1 else ''})")
        return _emitter(progress, f"compare {name}: ") or False

    for i, strategy in enumerate(STRATEGIES, 1):
        cfg = FinetuneConfig(dataset=dataset, model=model, weights=weights, strategy=strategy,
                             epochs=(scratch_epochs or epochs) if strategy == "scratch" else epochs,
                             mask=str(mask_path) if strategy == "instance" else None, split=str(split),
                             out=str(root / strategy), **finetune_kw)  # fmt: skip
        rows.append(run_finetune(cfg, progress=announce(i, strategy, STRATEGY_TITLES[strategy], cfg)))
        print(f"{strategy}: test error {rows[-1]['test_error']:.2f}% on {rows[-1]['n_train_samples']} samples", flush=True)
    for i, (name, bmask, k) in enumerate(extra, len(STRATEGIES) + 1):  # the instance arm's run, on the baseline's mask
        cfg = FinetuneConfig(dataset=dataset, model=model, weights=weights, strategy="instance", epochs=epochs,
                             mask=str(bmask), split=str(split), out=str(root / f"baseline-{name}"), **finetune_kw)  # fmt: skip
        rows.append({**run_finetune(cfg, progress=announce(i, f"baseline-{name}", row_label(name, k), cfg)),
                     "baseline": name, "label": row_label(name, k)})
        print(f"{rows[-1]['label']}: test error {rows[-1]['test_error']:.2f}% on {rows[-1]['n_train_samples']} samples", flush=True)
    table = compare_table(rows, dataset)
    print(table, end="")
    write_text_atomic(table, root / "compare.md")
    result = {"rows": rows, "table": table, "mask": str(mask_path), "baselines": {n: str(p) for n, p, _ in extra}}
    write_json_atomic(result, root / "compare.json")
    return result


def config_from(base: FinetuneConfig, **changes: Any) -> FinetuneConfig:
    """A copy of ``base`` with ``changes`` (re-validated)."""
    return replace(base, **changes)


__all__ = [
    "FinetuneConfig", "Plan", "TrainingError", "apply_freeze", "build_finetune_model", "compare_table", "config_from",
    "dry_run", "ids_hash", "lr_at", "make_plan", "plot_curves", "pretrain", "run_compare", "run_finetune",
    "to_ray_dataset", "trainable_params",
]  # fmt: skip
