"""Drop rules, on plain arrays.

Two kinds of score come in (see :class:`idtl_ray.influence.InfluenceResult`): ``delta_val_loss``
(the paper's; negative = removing the sample lowers the summed validation loss) and
``self_influence`` (high = the model bends towards the sample: a flipped label or an outlier). Rules:

- ``paper``: drop every sample with ``delta_val_loss < threshold`` (paper: 0), optionally capped.
- ``budget``: drop exactly ``k`` samples, the most harmful first, whichever score.
- ``auto``: pick ``k`` on validation (:mod:`idtl_ray.budget`), then as ``budget``.

A budget has one meaning everywhere: a value below 1 is a fraction of the samples, a whole number
>= 1 is a count (so 1 and 1.0 both mean one sample).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Literal

import numpy as np

from .errors import InputError

DropRule = Literal["auto", "budget", "paper"]
DROP_RULES = ("auto", "budget", "paper")


def budget_count(budget: int | float, n: int) -> int:
    """How many of ``n`` samples a budget drops: a fraction in [0, 1), or a whole count >= 1."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
        raise InputError(f"a drop budget must be a count or a fraction, got {budget!r}")
    b = float(budget)
    if not np.isfinite(b) or b < 0:
        raise InputError(f"a drop budget must be a finite number >= 0, got {budget}: pass a fraction below 1 or a count")
    if b < 1:  # the decimal the user wrote, times n: 0.29 * 100 is 28.999... in floats, and 29 samples here
        return int(Fraction(repr(b)) * n)
    if not b.is_integer():
        raise InputError(f"a drop budget >= 1 is a count and must be a whole number, got {budget}: "
                         "pass a fraction below 1 (e.g. 0.1) or a count (e.g. 100)")
    return min(int(b), n)


def checked_scores(scores: np.ndarray) -> np.ndarray:
    """``scores`` as a 1-D float64 array, or one InputError if it is not 1-D or holds NaN/inf."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise InputError(f"scores must be a 1-D array, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise InputError("scores contain NaN or inf: recompute them (a solver diverged or the model outputs are not finite)")
    return scores


def keep_mask(scores: np.ndarray, threshold: float = 0.0, max_drop: int | float | None = None) -> np.ndarray:
    """The paper's rule on ``delta_val_loss``: boolean array, True = keep.

    Args:
        scores: ``delta_val_loss`` per sample.
        threshold: drop samples whose score is strictly below this (paper: 0).
        max_drop: drop at most this many samples (:func:`budget_count`); the most negative go first.
    """
    scores = checked_scores(scores)
    candidates = np.flatnonzero(scores < threshold)
    if max_drop is not None:
        budget = budget_count(max_drop, len(scores))
        # Stable sort: ties keep their original order, so the result is deterministic.
        candidates = candidates[np.argsort(scores[candidates], kind="stable")[:budget]]
    keep = np.ones(len(scores), dtype=bool)
    keep[candidates] = False
    return keep


def keep_least_harmful(harm: np.ndarray, k: int) -> np.ndarray:
    """Drop the ``k`` samples with the highest ``harm`` (ties: lower index first); True = keep."""
    harm = checked_scores(harm)
    if not 0 <= k <= len(harm):
        raise InputError(f"cannot drop {k} of {len(harm)} samples: choose a budget between 0 and {len(harm)}")
    keep = np.ones(len(harm), dtype=bool)
    keep[np.argsort(-harm, kind="stable")[:k]] = False
    return keep


def harm_of(scores: np.ndarray, score: str) -> np.ndarray:
    """Scores oriented so that higher = drop first: self-influence as is, delta_val_loss negated."""
    if score not in ("self", "paper"):
        raise InputError(f"unknown score {score!r}: use self or paper")
    s = checked_scores(scores)
    return s if score == "self" else -s
