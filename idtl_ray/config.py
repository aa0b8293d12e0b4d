"""Typed configuration of the `score` stage: one dataclass drives the API, the CLI and the metadata
written beside the mask (the style of Kronfluence's arguments).

Each field's ``metadata`` holds its one-line help and, where the command line differs from the field,
its option names (``flags``) and allowed values (``choices``); :mod:`idtl_ray.cli_options` generates the
``idtl-ray score`` options from them, so a new field is a new option.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, replace
from typing import Any

from .errors import InputError
from .influence import InfluenceConfig
from .selection import DROP_RULES, budget_count
from .storage import check_local_out


def check_params(model: str, params: list[str], score: str = "paper") -> None:
    """Refuse ``--param`` names that select nothing, before any data loads.

    The names are checked against the registry model's structure, built on PyTorch's meta device (no
    memory, no weights): parameter names do not depend on the class count, channels or image size.
    ``--param`` chooses the parameters of ``--score paper``; self-influence always uses the head.
    """
    if score != "paper":
        raise InputError("--param chooses the parameters of --score paper; --score self always scores through the "
                         "model's head (choose with --head-params bias|head): add --score paper or drop --param")
    import torch

    from .models import build_model

    with torch.device("meta"):
        net = build_model(model, 2, 3, 32)
    names = [n for n, _ in net.named_parameters()]
    bad = [p for p in params if not any(n == p or n.startswith(p + ".") for n in names)]
    if bad:  # each name must select something: a typo beside a good name would be dropped silently
        top = sorted({n.split(".")[0] for n in names}, key=[n.split(".")[0] for n in names].index)
        raise InputError(f"--param {' '.join(bad)}: {model} has no such module; give module or parameter names "
                         f"such as {', '.join(top)}{_deep_example(names)}")


def _deep_example(names: list[str]) -> str:
    """`` (or deeper ones, e.g. layer4.2.bn3)``: the module of the model's last nested parameter, if any."""
    deep = [m for m in (n.rpartition(".")[0] for n in names) if "." in m]
    return f" (or deeper ones, e.g. {deep[-1]})" if deep else ""


def _default(f: Field[Any]) -> Any:
    """A dataclass field's default value (a fresh one for a default factory)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


@dataclass
class ScoreConfig:
    """Settings of `idtl-ray score`: which data and model, how to score, where to write."""

    dataset: str = field(default="digits", metadata={"help": "Target dataset: a registry name, npz:PATH, folder:PATH, or a directory written by `idtl-ray prepare`."})
    model: str = field(default="sample-cnn", metadata={"help": "Model architecture (sample-cnn, vgg16, resnet50, densenet121, resnet18)."})
    weights: str = field(default="none", metadata={"help": "Pre-trained weights: imagenet, a checkpoint/state-dict PATH, or none."})
    data_dir: str | None = field(default=None, metadata={"help": "Where datasets live (default $IDTL_DATA_DIR or ~/.cache/idtl-ray/data)."})
    image_size: int | None = field(default=None, metadata={"help": "Resize the images to this size in pixels (default: as the dataset ships them; 64 for folder datasets)."})
    val_fraction: float = field(default=0.1, metadata={"help": "Validation share carved from train when the dataset ships none (paper: 10%)."})
    target_classes: list[int] | None = field(default=None, metadata={"help": "With --score paper: score against validation samples of these classes only (paper 4.4).", "flags": ("--target-class",)})
    head: str = field(default="auto", metadata={"help": "auto: keep the weights' head only when they record the target's class names, else fit a new one; new: always; keep: never.", "choices": ("auto", "new", "keep")})
    head_steps: int = field(default=50, metadata={"help": "L-BFGS steps of the linear probe that fits a new head (backbone frozen)."})
    influence: InfluenceConfig = field(default_factory=InfluenceConfig, metadata={"help": "Solver settings."})
    params: list[str] | None = field(default=None, metadata={"help": "Score with these modules' parameters only (--score paper; default: all).", "flags": ("--param",)})
    drop: str = field(default="auto", metadata={"help": "auto: fine-tune per candidate budget on Ray Tune and keep the smallest within one paired standard error of the best validation error; budget: drop --drop-budget samples, most harmful first; paper: drop every delta_val_loss < --drop-threshold (needs --score paper).", "choices": DROP_RULES})
    drop_threshold: float = field(default=0.0, metadata={"help": "--drop paper: drop samples whose delta_val_loss is below this (paper: 0)."})
    drop_budget: float | None = field(default=None, metadata={"help": "A fraction below 1 or a whole count >= 1: --drop budget drops exactly this many (default 0.1); --drop paper at most this many."})
    auto_budgets: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3], metadata={"help": "--drop auto: the candidate budgets (fractions or counts; 0 is always tried).", "flags": ("--auto-budget",)})
    auto_epochs: int = field(default=10, metadata={"help": "--drop auto: fine-tuning epochs of each candidate's trial."})
    gpus: int = field(default=0, metadata={"help": "GPUs to score on: one scoring actor per GPU (num_gpus=1), the pre-scoring worker on one; the autoscaler is asked for them at start. Default 0: the local machine's GPUs, or CPUs."})
    cpus: int | None = field(default=None, metadata={"help": "CPUs to score on when --gpus is 0 (default: the local machine's). On a cluster that scales from zero, declare --gpus or --cpus."})
    actors: int | None = field(default=None, metadata={"help": "Scoring actors (default: one per GPU, else one per CPU up to 4 CPUs, then CPUs/2)."})
    shard_size: int = field(default=1024, metadata={"help": "Samples per checkpointed shard (what --resume skips)."})
    out: str | None = field(default=None, metadata={"help": "Output directory (default runs/score-<dataset>-<model>)."})
    seed: int = field(default=0, metadata={"help": "Seed of the validation split, the curvature subsample, the head fit and the auto trials."})
    resume: bool = field(default=False, metadata={"help": "Continue an interrupted run in --out without rescoring finished shards."})
    address: str | None = field(default=None, metadata={"help": "Ray cluster to join (default: start an embedded local Ray)."})

    def __post_init__(self) -> None:
        check_local_out(self.out)
        if isinstance(self.influence, dict):
            self.influence = InfluenceConfig(**self.influence)
        if self.seed < 0:  # numpy's generators take none
            raise InputError(f"--seed must be >= 0, got {self.seed}")
        # One seed: the curvature subsample follows ScoreConfig.seed (a second, silent seed made every
        # seed of a multi-seed table use the same subsample).
        if self.influence.seed not in (0, self.seed):
            raise InputError(f"two seeds given (seed={self.seed}, influence.seed={self.influence.seed}): "
                             "set ScoreConfig.seed only; it seeds the curvature subsample too")
        self.influence = replace(self.influence, seed=self.seed)
        # Everything that can be checked without the data is checked here, before any data loads or Ray
        # starts: a typo must not cost a whole scoring run.
        self._check_drop()
        self._check_sizes()
        self._check_model()

    def _check_drop(self) -> None:
        """The drop rule and its options agree (--drop, --drop-budget, --drop-threshold, --auto-*)."""
        if self.drop not in DROP_RULES:
            raise InputError(f"unknown drop rule {self.drop!r}: use one of {', '.join(DROP_RULES)}")
        if self.drop == "paper" and self.influence.score != "paper":
            raise InputError("--drop paper reads delta_val_loss, which --score self does not compute: "
                             "add --score paper, or use --drop auto / --drop budget")
        if self.target_classes and self.influence.score != "paper":  # it picks g_val's samples; self has no g_val
            raise InputError("--target-class picks the validation samples the paper's score measures against; "
                             "--score self (the default) uses no validation set: add --score paper")
        if self.drop_budget is not None:
            if self.drop == "auto":  # auto picks the budget itself; a given one would be silently ignored
                raise InputError("--drop-budget applies to --drop budget and --drop paper; --drop auto (the default) "
                                 "chooses among --auto-budget values: add --drop budget, or pass the value as --auto-budget")
            budget_count(self.drop_budget, 1_000_000)
        if not math.isfinite(self.drop_threshold):
            raise InputError(f"--drop-threshold must be a finite number, got {self.drop_threshold} (the paper uses 0)")
        if self.drop_threshold != 0.0 and self.drop != "paper":
            raise InputError(f"--drop-threshold applies to --drop paper only, not --drop {self.drop}: "
                             "add --drop paper --score paper, or leave --drop-threshold out")
        if self.drop != "auto":  # --auto-* apply to --drop auto only: refused rather than silently ignored
            flags = {"auto_budgets": "--auto-budget", "auto_epochs": "--auto-epochs"}
            given = [flags[f.name] for f in fields(self) if f.name in flags and getattr(self, f.name) != _default(f)]
            if given:
                raise InputError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} to --drop auto "
                                 f"only, not --drop {self.drop}: leave {'them' if len(given) > 1 else 'it'} out, or use "
                                 "--drop auto")
        if self.drop == "auto":
            if not self.auto_budgets:
                raise InputError("--drop auto needs at least one candidate budget, e.g. --auto-budget 0.1 --auto-budget 0.2")
            for b in self.auto_budgets:
                budget_count(b, 1_000_000)
            if self.auto_epochs < 1:
                raise InputError(f"--auto-epochs must be >= 1 (fine-tuning epochs per --drop auto trial), got {self.auto_epochs}")

    def _check_sizes(self) -> None:
        """Counts and fractions are in range: head, split, actors, resources, shards, image size."""
        if self.head not in ("auto", "new", "keep"):
            raise InputError(f"--head must be auto, new or keep, got {self.head!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise InputError(f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}; the paper uses 0.1")
        if self.actors is not None and self.actors < 1:
            raise InputError(f"--actors must be >= 1, got {self.actors}")
        if self.gpus < 0 or (self.cpus is not None and self.cpus < 1):
            raise InputError(f"--gpus must be >= 0 and --cpus >= 1 (got --gpus {self.gpus}, --cpus {self.cpus})")
        if self.gpus and self.actors and self.actors > self.gpus:
            raise InputError(f"--actors {self.actors} with --gpus {self.gpus}: scoring runs one actor per GPU; "
                             f"drop --actors or ask for --gpus {self.actors}")
        if self.shard_size < 1:
            raise InputError(f"--shard-size must be >= 1 (samples per checkpointed shard), got {self.shard_size}; "
                             "the default is 1024")
        if self.head_steps < 1:
            raise InputError(f"--head-steps must be >= 1 (L-BFGS steps of the new head), got {self.head_steps}")
        if self.image_size is not None and self.image_size < 1:
            raise InputError(f"--image-size must be a positive number of pixels, got {self.image_size}")
        if self.target_classes is not None and any(c < 0 for c in self.target_classes):
            raise InputError(f"--target-class takes class indices >= 0, got {self.target_classes}")

    def _check_model(self) -> None:
        """The model is known, its weights file exists, and every --param names a parameter of it."""
        from .models import MODELS, check_weights_file

        if self.model not in MODELS:
            raise InputError(f"unknown model {self.model!r}: use one of {', '.join(MODELS)}")
        if not self.resume:  # a resumed run reuses its saved model.pt and needs no weights file
            check_weights_file(self.weights)
        if self.params:
            check_params(self.model, self.params, self.influence.score)

    @property
    def out_dir(self) -> str:
        safe = self.dataset.replace(":", "-").replace("/", "_")
        return self.out or f"runs/score-{safe}-{self.model}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
