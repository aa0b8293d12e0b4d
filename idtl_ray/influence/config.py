"""What an influence run computes (:class:`InfluenceConfig`) and how its solve went (:class:`SolveInfo`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import InputError


Solver = Literal["cg", "lissa", "exact"]
ScoreKind = Literal["self", "paper"]
CurvatureKind = Literal["ggn", "exact"]
ParamSpec = None | int | Sequence[str]


@dataclass
class InfluenceConfig:
    """Settings of one influence computation; the same object drives the API, the CLI and the mask metadata."""

    score: ScoreKind = field(default="self", metadata={"help": "self: self-influence on the head (EK-FAC; finds mislabelled samples, no validation set needed); paper: delta_val_loss, the paper's validation-loss influence."})
    head_params: Literal["bias", "head"] = field(default="bias", metadata={"help": "Self-influence over the head's bias (default; exact curvature) or the whole head (weight and bias, EK-FAC)."})
    head_damping: float = field(default=0.1, metadata={"help": "Damping of the self-influence curvature, relative to its mean eigenvalue (Kronfluence's 0.1)."})
    solver: Solver = field(default="cg", metadata={"help": "Inverse-curvature solver: cg, lissa or exact (dense, small models)."})
    curvature: CurvatureKind = field(default="ggn", metadata={"help": "ggn (Gauss-Newton, PSD; default for nets) or exact (true Hessian)."})
    damping: float = field(default=0.1, metadata={"help": "λ in (H + λI)^-1: makes the system well posed; larger = smoother, more biased."})
    curvature_samples: int | None = field(default=512, metadata={"help": "Seeded subsample of training samples for the curvature; None = all."})
    max_iter: int = field(default=30, metadata={"help": "Iterations of cg, or of lissa (recursion depth)."})
    tol: float = field(default=1e-2, metadata={"help": "Stop when the relative residual |(H+λI)s - g| / |g| is below this."})
    lissa_scale: float = field(default=10.0, metadata={"help": "LiSSA scale; must exceed the largest curvature eigenvalue + λ."})
    batch_size: int = field(default=256, metadata={"help": "Samples per forward pass (memory vs speed)."})
    seed: int = field(default=0, metadata={"help": "Seed of the curvature subsample and LiSSA batch order."})

    def __post_init__(self) -> None:
        if self.score not in ("self", "paper"):
            raise InputError(f"unknown score {self.score!r}: use self (self-influence, the default) or paper (delta_val_loss)")
        if self.seed < 0:  # numpy's generators take none
            raise InputError(f"seed must be >= 0, got {self.seed}")
        if self.head_params not in ("bias", "head"):
            raise InputError(f"unknown --head-params {self.head_params!r}: use bias or head")
        if not (self.head_damping > 0 and math.isfinite(self.head_damping)):
            raise InputError(f"--head-damping must be a finite number > 0, got {self.head_damping}")
        if self.solver not in ("cg", "lissa", "exact"):
            raise InputError(f"unknown solver {self.solver!r}: use one of cg, lissa, exact")
        if self.curvature not in ("ggn", "exact"):
            raise InputError(f"unknown curvature {self.curvature!r}: use ggn or exact")
        if not (self.damping >= 0 and math.isfinite(self.damping)):
            raise InputError(f"--damping must be a finite number >= 0, got {self.damping}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_iter < 1:
            raise InputError(f"--max-iter must be >= 1, got {self.max_iter}")
        if self.curvature_samples is not None and self.curvature_samples < 1:
            raise InputError(f"--curvature-samples must be >= 1, or 0 for all of them (None in the API), got {self.curvature_samples}")
        if not (self.lissa_scale > 0 and math.isfinite(self.lissa_scale)):
            raise InputError(f"--lissa-scale must be a finite number > 0, got {self.lissa_scale}")
        if not (self.tol > 0 and math.isfinite(self.tol)):
            raise InputError(f"--tol must be a finite number > 0 (the relative residual to stop at), got {self.tol}")


@dataclass
class SolveInfo:
    """How a solve went: enough to judge whether the scores can be trusted."""

    solver: str
    iterations: int
    relative_residual: float
    converged: bool
    g_norm: float
    s_norm: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)
