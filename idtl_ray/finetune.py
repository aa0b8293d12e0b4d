"""Fine-tuning on Ray Train: from scratch, model-based and instance-based (paper 3.2-3.3, section 4).

Stages of :func:`run_finetune`:
  1. plan      open the prepared dataset (a name is prepared once into the cache) for its manifest and
               labels only, load the split (for ``instance``: the split.json beside the mask), check
               that the mask belongs to both, pick the training sample ids. The driver never holds images.
  2. model     build the adapted model on the driver: Xavier (``scratch``) or pre-trained weights
               (``model``/``instance``), optional hybrid init (Table 4) and freezing (Tables 3, 6)
  3. data      Ray Data reads and decodes the training, validation and test samples into the object
               store (:mod:`idtl_ray.finetune_data`); the initial weights go there once too
  4. train     a TorchTrainer (Train V2): DDP workers read their shard of ``train`` (shuffled per epoch),
               augment and normalise in the worker, Adam with lr x0.1 at ``lr_drop_at`` of the epochs;
               rank 0 evaluates on ``val`` and ``test``; a checkpoint every epoch, restored after a worker
               failure or when the same command runs again (:mod:`idtl_ray.finetune_worker`)
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
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import data as D
from . import models as M
from .data.samples import PreparedTarget
from .errors import IdtlError, InputError, MaskError, WeightsError
from .finetune_data import Rows
from .finetune_progress import Progress, Relay, emitter, epoch_line, say
from .finetune_worker import FAULT_MARKER, _images, ids_hash, lr_at  # noqa: F401  (_images: budget.py uses it)
from .mask import check_mask, read_mask
from .storage import atomic_path, digest, json_digest, save_figure_atomic, write_json_atomic

STRATEGIES = ("scratch", "model", "instance")
STRATEGY_TITLES = {"scratch": "from Scratch", "model": "Model-based TL", "instance": "Instance-based TL"}

# Fields that do not change what is trained: a rerun that differs only in these resumes the same run.
# ``epochs``/``eval_every`` are left out too, so a rerun with more epochs continues from the checkpoint.
_NON_IDENTITY = ("out", "address", "max_failures", "cpus_per_worker", "gpus_per_worker", "gpus", "epochs", "eval_every",
                 "fault_inject_kill_epoch")  # fmt: skip
PRECISIONS = ("auto", "bf16", "fp32")


class TrainingError(IdtlError, RuntimeError):
    """A Ray Train run failed (after its retries) or produced no checkpoint."""


@dataclass
class FinetuneConfig:
    """Settings of `idtl-ray finetune`: data, strategy, recipe, Ray resources and output directory."""

    dataset: str = field(default="digits", metadata={"help": "Target dataset: a registry name, npz:PATH, folder:PATH, or a directory written by `idtl-ray prepare`."})
    model: str = field(default="sample-cnn", metadata={"help": "Model architecture (sample-cnn, vgg16, resnet50, densenet121, resnet18)."})
    strategy: str = field(default="instance", metadata={"help": "scratch (Xavier init), model (all training samples) or instance (the samples the mask keeps)."})
    mask: str | None = field(default=None, metadata={"help": "Mask Parquet file (or its directory) from `idtl-ray score`; required for --strategy instance."})
    weights: str = field(default="none", metadata={"help": "Pre-trained weights for model/instance: imagenet, a checkpoint/state-dict PATH, or none."})
    data_dir: str | None = field(default=None, metadata={"help": "Where datasets live (default $IDTL_DATA_DIR or ~/.cache/idtl-ray/data)."})
    image_size: int | None = field(default=None, metadata={"help": "Resize the images to this size in pixels (default: as the dataset ships them; 64 for folder datasets)."})
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
    gpus: int | None = field(default=None, metadata={"help": "GPUs to train on: N DDP workers with one GPU each, asked of the autoscaler at start on a cluster (instead of --workers and --gpus-per-worker; 0: CPU)."})
    precision: str = field(default="auto", metadata={"choices": ("auto", "bf16", "fp32"), "help": "Training precision: bf16 (autocast), fp32, or auto (bf16 on GPUs, fp32 on CPUs)."})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs per worker (0.5 on a 2-CPU box leaves room for Ray Data)."})
    eval_every: int = field(default=1, metadata={"help": "Evaluate validation accuracy and test error every N epochs (and after the last)."})
    seed: int = field(default=0, metadata={"help": "Seed of the split (when one is made), the init and the shuffling."})
    out: str | None = field(default=None, metadata={"help": "Run directory (default runs/finetune-<dataset>-<model>-<strategy>); rerunning resumes."})
    augment: bool = field(default=True, metadata={"help": "Use the dataset's training augmentation (flip/translate for CIFAR, none for digits)."})
    max_failures: int = field(default=1, metadata={"help": "Worker failures to recover from (restart from the last checkpoint); -1: any number."})
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
            raise InputError(f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}; the paper uses 0.1")
        if not 0.0 < self.lr_drop_at <= 1.0:
            raise InputError(f"--lr-drop-at must be in (0, 1], got {self.lr_drop_at}: the paper uses 0.5, 1 means never")
        for name in ("epochs", "batch_size", "workers", "eval_every"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_failures < -1:
            raise InputError(f"--max-failures must be >= 0, or -1 to recover from any number of failures, got {self.max_failures}")
        if self.lr <= 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise InputError(f"--cpus-per-worker must be > 0 and --gpus-per-worker >= 0, got {self.cpus_per_worker:g} and "
                             f"{self.gpus_per_worker:g}")
        self._declare_gpus()
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if 0 < self.gpus_per_worker < 1 and self.workers > 1:  # DDP would put several ranks on one GPU
            raise InputError(f"--gpus-per-worker {self.gpus_per_worker:g} with {self.workers} workers would share a GPU "
                             "between DDP ranks (NCCL refuses it): use whole GPUs per worker, or one worker")
        if self.freeze is not None and self.freeze < 0 or self.hybrid_init is not None and self.hybrid_init < 0:
            raise InputError("--freeze and --hybrid-init take a layer count >= 0")

    def _declare_gpus(self) -> None:
        """``--gpus N``: N workers with one GPU each (0: no GPU); it replaces --workers/--gpus-per-worker."""
        if self.gpus is not None:
            from .resources import gpu_workers

            self.workers, self.gpus_per_worker = gpu_workers(self.gpus, None if self.workers == 1 else self.workers,
                                                             self.gpus_per_worker or None)  # fmt: skip

    def bundles(self) -> list[dict[str, float]]:
        """What a run asks of a cluster's autoscaler: one bundle per Train worker."""
        from .resources import bundles_of

        return bundles_of(self.workers, self.cpus_per_worker, self.gpus_per_worker)

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


def _mask_file(mask: str) -> Path:
    p = Path(mask).expanduser()
    return p / "mask.parquet" if p.is_dir() else p


def make_plan(cfg: FinetuneConfig, *, say: Progress | None = None) -> Plan:
    """Open the data's labels, load the split and pick the training samples (every training id, or those
    the mask keeps). A dataset given by name is prepared into the cache first (``say`` hears about it)."""
    from .data.cache import ensure_prepared
    from .data.samples import open_target

    mask_path = _mask_file(cfg.mask) if cfg.mask and cfg.strategy == "instance" else None
    if mask_path is not None and not mask_path.is_file():  # before the data: a typo must cost nothing
        raise MaskError(f"mask {mask_path} not found: pass the mask.parquet (or the directory) that `idtl-ray score` wrote")
    data = open_target(ensure_prepared(cfg.dataset, cfg.data_dir, cfg.image_size, say=say))
    shipped = Rows("val", np.arange(len(data.val), dtype=np.int64)) if data.val is not None else None
    if cfg.split == "none":
        if cfg.strategy == "instance":
            raise InputError("--split none cannot be used with --strategy instance: the mask belongs to a split")
        return Plan(data, None, None, np.arange(len(data.train), dtype=np.int64), shipped)
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


def _load_adapted(model: nn.Module, path: Path, data: PreparedTarget | D.TargetData | None) -> None:
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


def _arch(data: PreparedTarget | D.TargetData) -> tuple[int, int, int]:
    h, _, c = data.image_shape
    return data.num_classes, c, h


def dry_run(cfg: FinetuneConfig) -> str:
    """The layer table after hybrid init and freezing, trainable params, and the training sample count."""
    plan = make_plan(cfg, say=say)
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


# ── Stages 3-4: the run on Ray (data: idtl_ray.finetune_data; training: idtl_ray.finetune_worker) ──


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
    """Refuse up front what would otherwise hang on the embedded local Ray: workers that can never be
    scheduled. A cluster is never refused for what it has now: it scales up for the request."""
    import ray

    from .resources import joined_cluster

    if joined_cluster():
        return
    res = ray.cluster_resources()
    need_cpu = cfg.workers * cfg.cpus_per_worker
    if need_cpu > res.get("CPU", 0.0):
        raise InputError(f"{cfg.workers} workers x {cfg.cpus_per_worker} CPUs need {need_cpu:g} CPUs but the local Ray "
                         f"has {res.get('CPU', 0.0):g}; lower --workers or --cpus-per-worker (e.g. 0.5)")  # fmt: skip
    need_gpu = cfg.workers * cfg.gpus_per_worker
    if need_gpu > res.get("GPU", 0.0):
        raise InputError(f"{cfg.workers} workers x {cfg.gpus_per_worker:g} GPUs need {need_gpu:g} GPUs but the local Ray "
                         f"has {res.get('GPU', 0.0):g}; pass --gpus 0 or join a GPU cluster with --address")  # fmt: skip


def _finished_run(cfg: FinetuneConfig, out: Path, plan: Plan, emit: Progress | None) -> tuple[str, dict[str, Any] | None]:
    """The digest of the training ids, and the saved result when ``out`` already holds this run, finished.

    The config names the mask by its path; what it keeps can change (a re-scored mask). A run trained
    on other samples must not be resumed or returned as if it were this one.
    """
    ids_sha = digest(np.asarray(plan.train_ids, dtype=np.int64))  # in plan order (unlike ids_hash)
    prev = out / "config.json"
    if prev.is_file():
        old_sha = json.loads(prev.read_text(encoding="utf-8")).get("train_ids_sha")
        if old_sha is not None and old_sha != ids_sha:
            raise InputError(f"{out} holds a run trained on other samples (the mask changed since; it now keeps "
                             f"{len(plan.train_ids)}): choose another --out, or remove that directory to retrain")
    final_path = out / "final.json"
    if final_path.is_file():
        final = json.loads(final_path.read_text(encoding="utf-8"))
        if final.get("epochs") == cfg.epochs and (out / "model.pt").is_file():
            if emit:
                emit(f"{out} already holds the finished run ({cfg.epochs} epochs): nothing to train")
            return ids_sha, final
    return ids_sha, None


def _trainer(cfg: FinetuneConfig, out: Path, plan: Plan, model: nn.Module, name: str, callbacks: list[Any]) -> Any:
    """The TorchTrainer of a run: the samples as Ray Datasets (read now), the model once in the object store."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from .finetune_data import exact_split_config, train_datasets
    from .finetune_worker import train_worker

    datasets = train_datasets(plan.data, plan.train_ids, plan.val, cfg.workers)
    loop_config = {
        "cfg": replace(cfg, out=str(out)).to_dict(),  # absolute: Ray Train changes the workers' cwd
        "init_model": ray.put(model),  # once in the object store instead of once per worker config
        "augment": D.batch_augmentation(cfg.dataset) if cfg.augment else None,  # applied on the worker's device
        "eval_sets": sorted(set(datasets) - {"train"}),
        "mean": plan.data.mean,
        "std": plan.data.std,
        "n_train": int(len(plan.train_ids)),
    }
    resources: dict[str, float] = {"CPU": cfg.cpus_per_worker}
    if cfg.gpus_per_worker > 0:
        resources["GPU"] = cfg.gpus_per_worker
    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0,
                                               resources_per_worker=resources),  # fmt: skip
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(out / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None,
        ),
        datasets=datasets,
        dataset_config=exact_split_config(),
    )


def _fit(trainer: Any, name: str, out: Path, relay: Relay | None) -> tuple[dict[str, Any], np.ndarray]:
    """Run the trainer; the final checkpoint's state and the sample ids seen in epoch 0, or one-line errors."""
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
    return state, seen


def run_finetune(cfg: FinetuneConfig, *, callbacks: list[Any] | None = None, run_name: str | None = None,
                 progress: bool | Progress = False, claim: bool = True) -> dict[str, Any]:
    """Train one strategy with Ray Train and write the run directory; returns the ``final.json`` dict.

    Running it again with the same ``out`` and config resumes: a finished run returns its saved
    results at once, an interrupted one continues from its last checkpoint. ``callbacks`` (Ray Train
    ``UserCallback``s, e.g. Tune's ``TuneReportCallback``) and ``run_name`` are for :mod:`idtl_ray.sweep`.
    ``progress``: ``True`` prints a line per epoch on stderr (loss, validation accuracy, test error,
    elapsed time), a callable receives those lines instead; off by default (Tune trials, tests).
    The images never enter this process: Ray Data reads them into the object store for the workers.
    On a cluster (``--address``, ``RAY_ADDRESS``) the paths workers use must be shared storage, and the
    workers' resources are asked of the autoscaler at start (``claim``; a sweep asks for its trials).
    """
    from .resources import claim_cluster, release

    out = _check_out_dir(cfg)
    claimed = claim and claim_cluster(cfg.address, out, cfg.dataset, cfg.bundles)
    try:
        return _run(cfg, out, callbacks, run_name, emitter(progress))
    finally:
        if claimed:
            release()


def _run(cfg: FinetuneConfig, out: Path, callbacks: list[Any] | None, run_name: str | None,
         emit: Progress | None) -> dict[str, Any]:  # fmt: skip
    """:func:`run_finetune` once the cluster is claimed."""
    plan = make_plan(cfg, say=emit)
    ids_sha, final = _finished_run(cfg, out, plan, emit)
    if final is not None:
        return final
    model, info = build_finetune_model(cfg, *_arch(plan.data), data=plan.data)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic({**cfg.to_dict(), "train_ids_sha": ids_sha}, out / "config.json")
    from .scoring import ensure_ray

    ensure_ray(cfg.address)
    _check_resources(cfg)
    name = run_name or cfg.run_name()
    relay = Relay(emit, cfg.epochs) if emit else None
    if emit:
        emit(f"training {cfg.model} on {len(plan.train_ids)} samples of {cfg.dataset} for {cfg.epochs} epoch"
             f"{'s' if cfg.epochs > 1 else ''} on {cfg.workers} Ray Train worker{'s' if cfg.workers > 1 else ''}")
    trainer = _trainer(cfg, out, plan, model, name, [*(callbacks or []), *([relay.callback] if relay else [])])
    state, seen = _fit(trainer, name, out, relay)
    model.load_state_dict(state["model"])
    return _write_outputs(cfg, plan, out, model, state, seen, info, name)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:200] if s else type(e).__name__


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
        "precision": last.get("precision", "fp32"),  # what --precision resolved to on the workers' device
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


def config_from(base: FinetuneConfig, **changes: Any) -> FinetuneConfig:
    """A copy of ``base`` with ``changes`` (re-validated)."""
    return replace(base, **changes)


_COMPARE = ("pretrain", "run_compare", "compare_table")


def __getattr__(name: str) -> Any:
    """``pretrain``, ``run_compare`` and ``compare_table`` live in :mod:`idtl_ray.compare` (which imports
    this module), and are found here too: loaded on first use, so neither module imports the other first."""
    if name in _COMPARE:
        from . import compare

        return getattr(compare, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FAULT_MARKER", "FinetuneConfig", "Plan", "TrainingError", "apply_freeze", "build_finetune_model", "compare_table",
    "config_from", "dry_run", "epoch_line", "ids_hash", "lr_at", "make_plan", "plot_curves", "pretrain", "run_compare",
    "run_finetune", "say", "trainable_params",
]  # fmt: skip
