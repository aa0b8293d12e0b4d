"""The drop rule, on plain arrays (design.md §1).

The paper drops a training sample when removing it is predicted to lower the summed validation
loss, i.e. when ``delta_val_loss < 0``. Users may move the threshold or cap how many are dropped
(most negative first).
"""

from __future__ import annotations

import numpy as np

from .errors import InputError


def keep_mask(scores: np.ndarray, threshold: float = 0.0, max_drop: int | float | None = None) -> np.ndarray:
    """Boolean array, True = keep.

    Args:
        scores: ``delta_val_loss`` per sample.
        threshold: drop samples whose score is strictly below this (paper: 0).
        max_drop: drop at most this many samples: an int count, or a float in (0, 1] as a fraction of
            all samples; the most negative scores go first. None: no cap.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise InputError(f"scores must be a 1-D array, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise InputError("scores contain NaN or inf: recompute them (a solver diverged or the model outputs are not finite)")
    candidates = np.flatnonzero(scores < threshold)
    if max_drop is not None:
        budget = _budget(max_drop, len(scores))
        # Stable sort: ties keep their original order, so the result is deterministic.
        candidates = candidates[np.argsort(scores[candidates], kind="stable")[:budget]]
    keep = np.ones(len(scores), dtype=bool)
    keep[candidates] = False
    return keep


def _budget(max_drop: int | float, n: int) -> int:
    if isinstance(max_drop, bool):
        raise InputError("max_drop must be a count or a fraction, not a bool")
    if isinstance(max_drop, (int, np.integer)):
        if max_drop < 0:
            raise InputError(f"max_drop must be >= 0, got {max_drop}")
        return int(max_drop)
    if not 0.0 < float(max_drop) <= 1.0:
        raise InputError(f"a fractional max_drop must be in (0, 1], got {max_drop}: pass an int for a count")
    return int(np.floor(float(max_drop) * n))
