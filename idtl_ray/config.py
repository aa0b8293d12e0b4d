"""Typed configuration of the `score` stage: one dataclass drives the API, the CLI and the metadata
written beside the mask (the style of Kronfluence's arguments).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import InputError
from .influence import InfluenceConfig


def help_of(cls: type, name: str) -> str:
    """The one-line help of a dataclass field (used by the CLI so help text lives in one place)."""
    for f in fields(cls):
        if f.name == name:
            return str(f.metadata.get("help", ""))
    raise KeyError(name)


@dataclass
class ScoreConfig:
    """Settings of `idtl-ray score`: which data and model, how to score, where to write."""

    dataset: str = field(default="digits", metadata={"help": "Target dataset: a registry name, npz:PATH or folder:PATH."})
    model: str = field(default="sample-cnn", metadata={"help": "Model architecture (sample-cnn, vgg16, resnet50, densenet121, resnet18)."})
    weights: str = field(default="none", metadata={"help": "Pre-trained weights: imagenet, a checkpoint/state-dict PATH, or none."})
    data_dir: str | None = field(default=None, metadata={"help": "Where datasets live (default $IDTL_DATA_DIR or ~/.cache/idtl-ray/data)."})
    image_size: int | None = field(default=None, metadata={"help": "Resize folder datasets to this size (default 64)."})
    val_fraction: float = field(default=0.1, metadata={"help": "Validation share carved from train when the dataset ships none (paper: 10%)."})
    target_classes: list[int] | None = field(default=None, metadata={"help": "Score against validation samples of these classes only (paper 4.4)."})
    head: str = field(default="auto", metadata={"help": "auto: fit a new head when class counts differ; new: always; keep: never."})
    head_steps: int = field(default=50, metadata={"help": "L-BFGS steps of the linear probe that fits a new head (backbone frozen)."})
    influence: InfluenceConfig = field(default_factory=InfluenceConfig, metadata={"help": "Solver settings."})
    params: list[str] | None = field(default=None, metadata={"help": "Score with these modules' parameters only (default: all)."})
    drop_threshold: float = field(default=0.0, metadata={"help": "Drop samples whose delta_val_loss is below this (paper: 0)."})
    drop_budget: float | None = field(default=None, metadata={"help": "Drop at most this many samples (int) or this fraction (0-1)."})
    actors: int | None = field(default=None, metadata={"help": "Scoring actors (default: one per GPU, else one per CPU up to 4 CPUs, then CPUs/2)."})
    shard_size: int = field(default=1024, metadata={"help": "Samples per checkpointed shard (what --resume skips)."})
    out: str | None = field(default=None, metadata={"help": "Output directory (default runs/score-<dataset>-<model>)."})
    seed: int = field(default=0, metadata={"help": "Seed of the validation split, the curvature subsample and the head fit."})
    resume: bool = field(default=False, metadata={"help": "Continue an interrupted run in --out without rescoring finished shards."})
    address: str | None = field(default=None, metadata={"help": "Ray cluster to join (default: start an embedded local Ray)."})

    def __post_init__(self) -> None:
        if isinstance(self.influence, dict):
            self.influence = InfluenceConfig(**self.influence)
        if self.head not in ("auto", "new", "keep"):
            raise InputError(f"head must be auto, new or keep, got {self.head!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise InputError(f"val_fraction must be in (0, 1), got {self.val_fraction}: the paper uses 0.1")
        if self.actors is not None and self.actors < 1:
            raise InputError(f"actors must be >= 1, got {self.actors}")

    @property
    def out_dir(self) -> str:
        safe = self.dataset.replace(":", "-").replace("/", "_")
        return self.out or f"runs/score-{safe}-{self.model}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
