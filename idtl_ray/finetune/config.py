"""What a fine-tuning run trains (:class:`FinetuneConfig`): one typed, validated object for the API, the CLI and ``config.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import models as M
from ..errors import IdtlError, InputError
from ..storage import check_local_out, json_digest


STRATEGIES = ("scratch", "model", "instance")
STRATEGY_TITLES = {"scratch": "from Scratch", "model": "Model-based TL", "instance": "Instance-based TL"}

# Fields that do not change what is trained: a rerun that differs only in these resumes the same run.
# ``epochs``/``eval_every`` are left out too, so a rerun with more epochs continues from the checkpoint
# (unless that moves the lr drop over epochs already trained: run._check_epochs refuses it).
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
    split: str | None = field(default=None, metadata={"help": "split.json to use (default: the one beside --mask if there is one, else a new seeded split in --out); 'none' trains on every training sample. A model.pt beside the mask or split (scoring's model) gives a new head its fitted weights."})
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
        check_local_out(self.out)
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
        if self.seed < 0:  # numpy's generators take none
            raise InputError(f"--seed must be >= 0, got {self.seed}")

    def _declare_gpus(self) -> None:
        """``--gpus N``: N workers with one GPU each (0: no GPU); it replaces --workers/--gpus-per-worker."""
        if self.gpus is not None:
            from ..resources import gpu_workers

            self.workers, self.gpus_per_worker = gpu_workers(self.gpus, None if self.workers == 1 else self.workers,
                                                             self.gpus_per_worker or None)  # fmt: skip

    def bundles(self) -> list[dict[str, float]]:
        """What a run asks of a cluster's autoscaler: one bundle per Train worker."""
        from ..resources import bundles_of

        return bundles_of(self.workers, self.cpus_per_worker, self.gpus_per_worker)

    @property
    def out_dir(self) -> Path:
        """The run directory (``out`` or a default derived from dataset, model and strategy)."""
        safe = self.dataset.replace(":", "-").replace("/", "_")
        return Path(self.out or f"runs/finetune-{safe}-{self.model}-{self.strategy}")

    def with_absolute_paths(self) -> FinetuneConfig:
        """The same run with every relative path made absolute: Ray Tune runs each trial in its own directory.

        Paths: ``mask``, ``split``, ``data_dir``, a ``weights`` file, and a ``dataset`` given as
        ``npz:``/``folder:`` PATH or as a prepared directory (registry names and URLs stay as they are).
        """
        from ..data import DATASETS

        def absolute(p: str) -> str:
            return str(Path(p).expanduser().resolve())

        changes: dict[str, Any] = {}
        for name in ("mask", "data_dir"):
            if getattr(self, name):
                changes[name] = absolute(getattr(self, name))
        if self.split and self.split != "none":
            changes["split"] = absolute(self.split)
        if self.weights not in (None, "none", "imagenet"):
            changes["weights"] = absolute(self.weights)
        prefix = next((p for p in ("npz:", "folder:") if self.dataset.startswith(p)), None)
        if prefix:
            changes["dataset"] = prefix + absolute(self.dataset[len(prefix):])
        elif self.dataset not in DATASETS and "://" not in self.dataset and Path(self.dataset).expanduser().exists():
            changes["dataset"] = absolute(self.dataset)
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that define what is trained (what a resumed run must agree on)."""
        return {k: v for k, v in self.to_dict().items() if k not in _NON_IDENTITY}

    def run_name(self) -> str:
        """Deterministic Ray Train run name: same config -> same name -> Ray Train resumes it."""
        return f"finetune-{self.strategy}-{json_digest(self.identity(), length=12)}"


def config_from(base: FinetuneConfig, **changes: Any) -> FinetuneConfig:
    """A copy of ``base`` with ``changes`` (re-validated)."""
    return replace(base, **changes)
