"""The scoring stage on Ray (design.md §3): pre-scoring worker → Ray Data actor pool → Parquet → merge.

- :mod:`.prescore`  one Ray task computes what scoring needs from the model: s (paper) or the head's
                    EK-FAC factors (self), on a GPU when the cluster has one
- :mod:`.pipeline`  a plain Ray Data pipeline: ``map_batches`` over an actor pool, ``write_parquet``
- :mod:`.parts`     the run's directory: lock, resume (skip written sample_ids), merge
- :mod:`.common`    arrays, preprocessing on the worker's device, result types
- :mod:`.session`   joining or starting Ray

The stage functions take plain arrays, so the same code scores registry datasets (uint8 images,
normalised on the worker) and a user's own tensors.
"""

from .common import ArraySet, PipelineResult, Preprocess, ScoreOutput
from .parts import hold_directory
from .pipeline import Scorer, run_fingerprint, run_pipeline
from .prescore import head_factors
from .session import ensure_ray

__all__ = ["ArraySet", "PipelineResult", "Preprocess", "ScoreOutput", "Scorer", "ensure_ray", "head_factors",
           "hold_directory", "run_fingerprint", "run_pipeline"]
