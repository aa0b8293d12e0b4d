"""Typed configuration of the `score` stage: one dataclass drives the API, the CLI and the metadata
written beside the mask (the style of Kronfluence's arguments).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import InputError
from .influence import InfluenceConfig
from .selection import DROP_RULES, budget_count


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
    head: str = field(default="auto", metadata={"help": "auto: keep the weights' head only when they record the target's class names, else fit a new one; new: always; keep: never."})
    head_steps: int = field(default=50, metadata={"help": "L-BFGS steps of the linear probe that fits a new head (backbone frozen)."})
    influence: InfluenceConfig = field(default_factory=InfluenceConfig, metadata={"help": "Solver settings."})
    params: list[str] | None = field(default=None, metadata={"help": "Score with these modules' parameters only (default: all)."})
    drop: str = field(default="auto", metadata={"help": "auto: fine-tune per candidate budget on Ray Tune and keep the best on validation; budget: drop --drop-budget samples, most harmful first; paper: drop every delta_val_loss < --drop-threshold (needs --score paper)."})
    drop_threshold: float = field(default=0.0, metadata={"help": "--drop paper: drop samples whose delta_val_loss is below this (paper: 0)."})
    drop_budget: float | None = field(default=None, metadata={"help": "A fraction below 1 or a whole count >= 1: --drop budget drops exactly this many (default 0.1); --drop paper at most this many."})
    auto_budgets: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3], metadata={"help": "--drop auto: the candidate budgets (fractions or counts; 0 is always tried)."})
    auto_epochs: int = field(default=10, metadata={"help": "--drop auto: fine-tuning epochs of each candidate's trial."})
    actors: int | None = field(default=None, metadata={"help": "Scoring actors (default: one per GPU, else one per CPU up to 4 CPUs, then CPUs/2)."})
    shard_size: int = field(default=1024, metadata={"help": "Samples per checkpointed shard (what --resume skips)."})
    out: str | None = field(default=None, metadata={"help": "Output directory (default runs/score-<dataset>-<model>)."})
    seed: int = field(default=0, metadata={"help": "Seed of the validation split, the curvature subsample, the head fit and the auto trials."})
    resume: bool = field(default=False, metadata={"help": "Continue an interrupted run in --out without rescoring finished shards."})
    address: str | None = field(default=None, metadata={"help": "Ray cluster to join (default: start an embedded local Ray)."})

    def __post_init__(self) -> None:
        if isinstance(self.influence, dict):
            self.influence = InfluenceConfig(**self.influence)
        # One seed: the curvature subsample follows ScoreConfig.seed (a second, silent seed made every
        # seed of a multi-seed table use the same subsample).
        if self.influence.seed not in (0, self.seed):
            raise InputError(f"two seeds given (seed={self.seed}, influence.seed={self.influence.seed}): "
                             "set ScoreConfig.seed only; it seeds the curvature subsample too")
        self.influence = replace(self.influence, seed=self.seed)
        if self.drop not in DROP_RULES:
            raise InputError(f"unknown drop rule {self.drop!r}: use one of {', '.join(DROP_RULES)}")
        if self.drop == "paper" and self.influence.score != "paper":
            raise InputError("--drop paper reads delta_val_loss, which --score self does not compute: "
                             "add --score paper, or use --drop auto / --drop budget")
        if self.drop_budget is not None:
            budget_count(self.drop_budget, 1_000_000)  # checked now, not after the whole scoring
        if self.drop == "auto":
            if not self.auto_budgets:
                raise InputError("--drop auto needs at least one candidate budget (--auto-budgets 0 0.05 0.1 0.2)")
            for b in self.auto_budgets:
                budget_count(b, 1_000_000)
            if self.auto_epochs < 1:
                raise InputError(f"auto_epochs must be >= 1, got {self.auto_epochs}")
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
