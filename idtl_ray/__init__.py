"""idtl-ray: instance-based deep transfer learning on Ray.

Score every target training sample with influence functions (self-influence by default; the paper's
validation-loss influence one option away), drop the harmful ones, fine-tune on the rest. Stages:
data → models → influence → scoring (Ray Data) → mask (Parquet) → finetune (Ray Train) → sweep (Ray Tune).
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import IdtlError
from .influence import InfluenceConfig, InfluenceResult, score_samples
from .selection import keep_least_harmful, keep_mask

__all__ = ["IdtlError", "InfluenceConfig", "InfluenceResult", "__version__", "keep_least_harmful", "keep_mask", "score",
           "score_samples"]


def __getattr__(name: str):  # the Ray path is imported on first use: `import idtl_ray` stays light
    if name == "score":
        from .user_score import score

        return score
    raise AttributeError(f"module 'idtl_ray' has no attribute {name!r}")
