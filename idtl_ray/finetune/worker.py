"""The Ray Train worker loop of :func:`idtl_ray.finetune.run_finetune` (runs in every rank).

Each rank restores the last checkpoint (if any), trains every epoch on its shard of ``train``
(``ray.train.get_dataset_shard``, shuffled per epoch by a local buffer seeded by the epoch); rank 0
evaluates by reading the whole ``val`` and ``test`` sets and writes the checkpoint every rank reports.

At GPU speed the host must only feed the device: each uint8 batch is copied (pinned, without
blocking) to the worker's device, and converted, augmented (:class:`idtl_ray.data.BatchAugment`, one
batched op) and normalised there; the loss is summed on the device and read once per epoch; forward
and loss run under bf16 autocast when ``precision`` asks for it (``auto``: on GPUs only).
"""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import data as D
from ..budget import lr_drop_epoch
from ..data.augment import BatchAugment
from ..layout import model_layout, runs_channels_last
from ..scoring.common import Preprocess, fast_cuda_math, to_device
from ..storage import ids_digest
from .data import SHUFFLE_BUFFER_ROWS

FAULT_MARKER = ".fault_injected"
EVAL_BATCH = 512

# 16-hex sha256 of the sorted int64 ids (order-free fingerprint of a multiset of sample ids)
ids_hash = ids_digest


def lr_at(cfg: Any, epoch: int) -> float:
    """Learning rate of ``epoch``: ``lr``, x0.1 from :func:`~idtl_ray.budget.lr_drop_epoch` on (never with
    ``lr_drop_at`` 1)."""
    drop = lr_drop_epoch(cfg.lr_drop_at, cfg.epochs)
    return cfg.lr * (0.1 if cfg.lr_drop_at < 1.0 and epoch >= drop else 1.0)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--precision`` on ``device``: bf16, or None for plain fp32.

    ``auto`` is bf16 on a GPU (tensor cores, half the activation memory, no loss scaling needed) and
    fp32 on a CPU, where bf16 kernels are rarely faster and results should match earlier runs.
    """
    if precision == "bf16" or precision == "auto" and device.type == "cuda":
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """bf16 autocast on ``device``, or nothing (fp32: the exact ops of a run without autocast)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _images(x: np.ndarray, aug: Callable[[torch.Tensor], torch.Tensor] | None, mean: Any, std: Any) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW on the CPU, augmenting per sample with a torchvision transform.

    Not the Train worker's path (that augments per batch on its device); ``budget.fine_tune``'s
    in-process trials use it, with :func:`idtl_ray.data.augmentation`'s transforms.
    """
    if aug is None:
        return D.to_tensor(x, mean, std)
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0)
    t = torch.stack([aug(s) for s in t])
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (t - m) / s


@torch.no_grad()
def _accuracy(run: _Run, samples: Any) -> float | None:
    """Accuracy on a Ray Data iterator of ``x``/``label`` batches (None when it is empty)."""
    run.net.eval()
    correct = torch.zeros((), dtype=torch.int64, device=run.device)  # read once at the end: no sync per batch
    n, laid_out = 0, runs_channels_last(run.net)
    for batch in samples.iter_batches(batch_size=EVAL_BATCH, batch_format="numpy"):
        xb = model_layout(run.prep(batch["x"], run.device), laid_out)  # data.to_tensor's values
        with _autocast(run.device, run.amp):
            logits = run.net(xb)
        correct += (logits.argmax(1) == _labels(batch, run.device)).sum()
        n += len(batch["label"])
    return int(correct) / n if n else None


def _labels(batch: dict[str, np.ndarray], device: torch.device) -> torch.Tensor:
    """A batch's labels as int64 on ``device`` (copied without blocking on a GPU)."""
    return to_device(torch.as_tensor(batch["label"], dtype=torch.long), device)


def _frozen_bn_eval(model: nn.Module) -> None:
    """Keep BatchNorms of frozen layers in eval mode, so their running statistics stay pre-trained too."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and not m.weight.requires_grad:
            m.eval()


@dataclass
class _Run:
    """One rank's training state, carried from epoch to epoch."""

    cfg: Any
    rank: int
    world: int
    device: torch.device
    model: nn.Module  # DDP-wrapped with several workers
    net: nn.Module  # the bare model: state dicts and evaluation
    opt: torch.optim.Optimizer
    prep: Preprocess  # uint8 batch -> device tensor, normalised there
    amp: torch.dtype | None = None  # autocast dtype (None: fp32)
    start: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    seen: np.ndarray | None = None


def _setup(config: dict[str, Any]) -> _Run:
    """The model (restored from the last checkpoint, if any), wrapped for DDP, and its optimizer."""
    import ray
    import ray.train
    import ray.train.torch

    from .config import FinetuneConfig  # here, not at the top: the package imports this module
    from .plan import apply_freeze

    cfg = FinetuneConfig(**config["cfg"])
    ctx = ray.train.get_context()
    # the driver's model object itself: unpickling needs no torchvision import for sample-cnn (slow to start)
    model = ray.get(config["init_model"])
    apply_freeze(model, cfg)
    st = None
    if ckpt := ray.train.get_checkpoint():
        with ckpt.as_directory() as d:
            st = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
            seen = np.load(Path(d) / "seen_ids.npy")
        model.load_state_dict(st["model"])
    if runs_channels_last(model):  # weights channels-last, as the batches (layout.py): a train step 1.1-1.4x faster
        model = model.to(memory_format=torch.channels_last)
    wrapped = ray.train.torch.prepare_model(model)
    net = wrapped.module if isinstance(wrapped, nn.parallel.DistributedDataParallel) else wrapped
    opt = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=cfg.lr)
    device = ray.train.torch.get_device()
    fast_cuda_math(device)  # scoring's GPU settings; the torch thread count stays Ray Train's
    run = _Run(cfg, ctx.get_world_rank(), ctx.get_world_size(), device, wrapped, net, opt,
               Preprocess(tuple(config["mean"]), tuple(config["std"])), resolve_precision(cfg.precision, device))
    if st is not None:
        opt.load_state_dict(st["optimizer"])
        run.start, run.seen = int(st["epoch"]) + 1, seen
        run.history, run.attempts = list(st["history"]), list(st["attempts"])
    run.attempts.append(run.start)  # where this worker group began: 0 for a fresh run, k+1 after a restore
    torch.manual_seed(cfg.seed * 1000 + run.rank + 7919 * run.start)
    return run


def _maybe_die(cfg: Any, epoch: int, rank: int, step: int) -> None:
    """TEST ONLY (``fault_inject_kill_epoch``): rank 0 SIGKILLs itself once, at the second step of that epoch."""
    import ray.train

    if cfg.fault_inject_kill_epoch != epoch or rank != 0 or step != 1:
        return
    marker = Path(cfg.out_dir) / FAULT_MARKER
    if marker.exists():
        return
    # the controller collects reports asynchronously: wait until the last checkpoint is registered,
    # so the test knows which one the restart must use
    ray.train.get_all_reported_checkpoints(timeout_s=120)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"killed pid {os.getpid()} in epoch {epoch}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def _augmenter(run: _Run, aug: BatchAugment | None, epoch: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The epoch's augmentation on the device, from a generator seeded by (seed, rank, epoch): a restart
    from a checkpoint draws what an uninterrupted run would have drawn in that epoch."""
    if aug is None:
        return lambda t: t
    g = torch.Generator(device=run.device)
    g.manual_seed((run.cfg.seed * 1_000_003 + run.rank) * 10_007 + epoch)
    return lambda t: aug(t, g)


def _train_epoch(run: _Run, shard: Any, epoch: int,
                 config: dict[str, Any]) -> tuple[torch.Tensor, int, list[np.ndarray]]:  # fmt: skip
    """One epoch over this rank's shard: (summed loss on the device, samples, the sample ids seen in epoch 0)."""
    cfg, augment = run.cfg, _augmenter(run, config["augment"], epoch)
    laid_out = runs_channels_last(run.net)
    run.model.train()
    _frozen_bn_eval(run.net)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    # float64 on the device: read once per epoch (a float() per step would wait for the device every step)
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    count, ids, steps = 0, [], 0
    # DDP.join(): shards may differ by up to a block (no row is dropped), so ranks run unequal step counts
    join = run.model.join() if isinstance(run.model, nn.parallel.DistributedDataParallel) else nullcontext()
    with join:
        batches = shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy",
                                     local_shuffle_buffer_size=max(cfg.batch_size, min(SHUFFLE_BUFFER_ROWS, config["n_train"])),
                                     local_shuffle_seed=cfg.seed + 1000 * epoch + run.rank)  # fmt: skip
        for step, batch in enumerate(batches):
            _maybe_die(cfg, epoch, run.rank, step)
            xb = model_layout(run.prep.normalise(augment(run.prep.unit(batch["x"], run.device))), laid_out)
            yb = _labels(batch, run.device)
            run.opt.zero_grad(set_to_none=True)
            with _autocast(run.device, run.amp):
                loss = loss_fn(run.model(xb), yb)
            (loss / len(yb)).backward()
            run.opt.step()
            loss_sum += loss.detach()
            count, steps = count + len(yb), steps + 1
            if epoch == 0:
                ids.append(np.asarray(batch["sample_id"], dtype=np.int64))
    if isinstance(run.model, nn.parallel.DistributedDataParallel):
        sync_optimizer(run.opt, steps, run.rank, run.world, run.device)
    return loss_sum, count, ids


def sync_optimizer(opt: torch.optim.Optimizer, steps: int, rank: int, world: int, device: torch.device) -> None:
    """After an epoch of unequal step counts, give every rank the optimizer state of the rank that ran the
    most steps (ties: the highest rank), the rank whose weights DDP's ``join()`` made everyone's.

    ``join()`` re-syncs the weights but not Adam's moments and step counts: without this, the replicas'
    weights drift apart from the next step on, and the checkpoint keeps rank 0's state, maybe the lagging one.
    """
    import torch.distributed as dist

    if world < 2 or not dist.is_initialized():
        return
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([steps], dtype=torch.int64, device=device))
    by_rank = [int(c.item()) for c in counts]
    if len(set(by_rank)) == 1:
        return
    src = max(range(world), key=lambda r: (by_rank[r], r))
    # a CPU copy: a pickled CUDA tensor is rebuilt on the sender's device index, which on another node may
    # not exist (or is another rank's GPU); load_state_dict moves the state to each parameter's device
    box = [_to_cpu(opt.state_dict()) if rank == src else None]
    dist.broadcast_object_list(box, src=src, device=device if device.type == "cuda" else None)
    if rank != src:
        opt.load_state_dict(box[0])


def _to_cpu(obj: Any) -> Any:
    """``obj`` (a state dict: nested dicts and lists of tensors) with every tensor copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _epoch_row(run: _Run, epoch: int, lr: float, loss_sum: torch.Tensor, count: int,
               ids: list[np.ndarray]) -> dict[str, Any]:  # fmt: skip
    """The epoch's row from every rank's loss; in epoch 0 also every rank's sample ids (``run.seen``)."""
    import torch.distributed as dist

    distributed = run.world > 1 and dist.is_initialized()
    # on the device already (NCCL needs device tensors): the epoch's one read of the loss is below
    totals = torch.stack([loss_sum, torch.tensor(float(count), dtype=torch.float64, device=run.device)])
    if epoch == 0:
        parts: list[Any] = [np.concatenate(ids) if ids else np.zeros(0, np.int64)]
        if distributed:
            mine, parts = parts[0], [None] * run.world
            dist.all_gather_object(parts, mine)
        run.seen = np.concatenate(parts).astype(np.int64)
    if distributed:
        dist.all_reduce(totals)
    totals = totals.cpu()
    return {"epoch": epoch, "lr": lr, "train_loss": float(totals[0] / max(1.0, float(totals[1]))), "val_acc": None,
            "test_error": None, "precision": "bf16" if run.amp is not None else "fp32"}  # fmt: skip


def _evaluate(run: _Run, evals: dict[str, Any]) -> dict[str, float]:
    """Rank 0: validation accuracy and test error (%), each read from its whole Ray Data set."""
    out: dict[str, float] = {}
    for name, key in (("val", "val_acc"), ("test", "test_error")):
        acc = _accuracy(run, evals[name]) if name in evals else None
        if acc is not None:
            out[key] = 100.0 * (acc if name == "val" else 1.0 - acc)
    return out


def _save_and_report(run: _Run, epoch: int, row: dict[str, Any]) -> None:
    """Report the epoch's metrics from every rank (a V2 barrier), with rank 0's checkpoint."""
    import ray.train

    metrics = {k: v for k, v in row.items() if v is not None}
    metrics.update(start_epoch=run.start, n_seen_epoch0=len(run.seen), seen_hash=ids_hash(run.seen))
    with tempfile.TemporaryDirectory() as d:
        ck = None
        if run.rank == 0:  # one copy of the state
            torch.save({"model": run.net.state_dict(), "optimizer": run.opt.state_dict(), "epoch": epoch,
                        "history": run.history, "attempts": run.attempts}, Path(d) / "state.pt")  # fmt: skip
            np.save(Path(d) / "seen_ids.npy", run.seen)
            ck = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=ck, checkpoint_dir_name=f"checkpoint_epoch={epoch:05d}")


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop (every rank): restore, train, evaluate on rank 0, checkpoint, report."""
    import ray.train

    run = _setup(config)
    cfg = run.cfg
    shard = ray.train.get_dataset_shard("train")
    evals = {name: ray.train.get_dataset_shard(name) for name in config["eval_sets"]} if run.rank == 0 else {}
    for epoch in range(run.start, cfg.epochs):
        lr = lr_at(cfg, epoch)
        for g in run.opt.param_groups:
            g["lr"] = lr
        row = _epoch_row(run, epoch, lr, *_train_epoch(run, shard, epoch, config))
        if run.rank == 0 and ((epoch + 1) % cfg.eval_every == 0 or epoch == cfg.epochs - 1):
            row.update(_evaluate(run, evals))
        run.history.append(row)
        _save_and_report(run, epoch, row)
