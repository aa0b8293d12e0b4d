"""Selection baselines a practitioner would try before influence scores (issue 10).

A functional core on plain arrays, each returning a boolean *keep* mask that drops exactly ``k``
samples (cleanlab style: arrays in, arrays out, no files, no Ray):

  - :func:`random_drop`    k samples drawn uniformly at random (seeded);
  - :func:`loss_drop`      the k highest per-sample losses of the model;
  - :func:`cleanlab_drop`  the k samples cleanlab ranks most likely mislabeled (lowest label quality,
                           ``method="self_confidence"``) from *out-of-sample* predicted probabilities.

:func:`features_and_logits` and :func:`cross_validated_probs` turn a model into those inputs (a
cross-validated linear probe on the frozen penultimate features gives the out-of-fold probabilities
cleanlab requires), and :func:`baseline_masks` is the workflow wrapper used by ``idtl-ray compare
--baselines`` and the benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import InputError

METHODS = ("random", "loss", "cleanlab")
TITLES = {"random": "random", "loss": "highest-loss", "cleanlab": "cleanlab label issues"}


def _check_k(n: int, k: int) -> None:
    if not 0 <= int(k) <= n:
        raise InputError(f"k (samples to drop) must be in 0..{n} for {n} samples, got {k}; "
                         f"pass the number of samples the instance mask drops")  # fmt: skip


def _drop_first(order: np.ndarray, n: int, k: int) -> np.ndarray:
    keep = np.ones(n, dtype=bool)
    keep[order[:k]] = False
    return keep


def parse_methods(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"random,loss"`` or ``["random", "loss"]`` -> validated, de-duplicated method names (may be empty)."""
    if spec is None:
        return ()
    parts = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in str(s).split(",")]
    names = tuple(dict.fromkeys(p.strip().lower() for p in parts if p.strip()))
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise InputError(f"unknown baseline {', '.join(map(repr, bad))}; choose from {', '.join(METHODS)} "
                         f"(e.g. --baselines random,loss,cleanlab)")  # fmt: skip
    return names


def random_drop(n: int, k: int, seed: int) -> np.ndarray:
    """Keep mask of length ``n`` that drops ``k`` samples chosen uniformly at random with ``seed``."""
    _check_k(n, k)
    rng = np.random.default_rng(seed)
    return _drop_first(rng.permutation(n), n, k)


def loss_drop(losses: np.ndarray, k: int) -> np.ndarray:
    """Keep mask that drops the ``k`` samples with the highest loss (ties: the lower index drops first)."""
    losses = np.asarray(losses, dtype=np.float64).reshape(-1)
    _check_k(len(losses), k)
    if not np.isfinite(losses).all():
        raise InputError("per-sample losses contain NaN or inf: check the model and the inputs' normalisation")
    return _drop_first(np.argsort(-losses, kind="stable"), len(losses), k)


def cleanlab_drop(labels: np.ndarray, pred_probs: np.ndarray, k: int) -> np.ndarray:
    """Keep mask that drops the ``k`` samples cleanlab ranks most likely mislabeled.

    Ranks by ``cleanlab.rank.get_label_quality_scores(labels, pred_probs, method="self_confidence")``
    (lowest quality first, ties by index). ``pred_probs`` (N, K) should be out-of-sample, e.g. from
    :func:`cross_validated_probs`.
    """
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    pred_probs = np.asarray(pred_probs, dtype=np.float64)
    if pred_probs.ndim != 2 or len(pred_probs) != len(labels):
        raise InputError(f"pred_probs must be (N, K) with N = {len(labels)} labels, got shape {pred_probs.shape}")
    _check_labels(labels, pred_probs.shape[1])
    _check_k(len(labels), k)
    scores = get_label_quality_scores(labels, pred_probs, method="self_confidence")
    return _drop_first(np.argsort(scores, kind="stable"), len(labels), k)


def _check_labels(labels: np.ndarray, num_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise InputError(f"labels must be in 0..{num_classes - 1} (the model has {num_classes} outputs), got "
                         f"{int(bad[0])}: use the model scored on this dataset, or remap the labels")  # fmt: skip


def features_and_logits(model: nn.Module, x_uint8: np.ndarray, mean: Sequence[float], std: Sequence[float],
                        batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Penultimate features (the head's input, flattened) and logits, float32, in eval mode without grad.

    ``x_uint8`` is a uint8 (N, H, W, C) batch, normalised with :func:`idtl_ray.data.to_tensor`.
    The model's train/eval mode is restored afterwards.
    """
    from .data import to_tensor
    from .influence import eval_mode
    from .self_influence import features_and_logits as batch_features, head_module

    head = head_module(model)
    device = next(model.parameters()).device
    feats: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    with eval_mode(model):  # one hook helper for the head's input, shared with self-influence
        for i in range(0, len(x_uint8), batch_size):
            f, z = batch_features(model, to_tensor(x_uint8[i:i + batch_size], tuple(mean), tuple(std)).to(device))
            feats.append(f.float().cpu())
            logits.append(z.float().cpu())
    if not logits:
        return np.zeros((0, head.in_features), np.float32), np.zeros((0, head.out_features), np.float32)
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def _fit_probe(f: torch.Tensor, y: torch.Tensor, num_classes: int, steps: int, weight_decay: float) -> nn.Linear:
    """Multinomial logistic regression on ``f`` (zero init, full-batch L-BFGS): deterministic."""
    probe = nn.Linear(f.shape[1], num_classes, dtype=f.dtype)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    opt = torch.optim.LBFGS(probe.parameters(), lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(probe(f), y) + weight_decay / 2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe


def cross_validated_probs(features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int = 5, seed: int = 0,
                          steps: int = 50, weight_decay: float = 1e-4) -> np.ndarray:  # fmt: skip
    """Out-of-fold softmax probabilities (N, num_classes) of a linear probe on frozen features.

    The samples are split into ``folds`` seeded, stratified folds (every class spread over the folds as
    evenly as its count allows, as cleanlab's own cross-validation does, so a rare class is never missing
    from the samples a fold's probe learns from); each fold is predicted by a multinomial logistic
    regression (features standardised with the other folds' statistics, L-BFGS for ``steps``
    iterations, L2 ``weight_decay``) fitted on the other folds only, so no sample's own label
    influences its probabilities (what cleanlab needs). Each row sums to 1.
    """
    f_all = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    y_all = np.asarray(labels, dtype=np.int64).reshape(-1)
    n = len(y_all)
    if len(f_all) != n:
        raise InputError(f"features have {len(f_all)} rows but there are {n} labels; pass one row per sample")
    _check_labels(y_all, num_classes)
    if not 2 <= folds <= n:
        raise InputError(f"folds must be in 2..{n} (the number of samples), got {folds}; the default is 5")
    probs = np.zeros((n, num_classes), dtype=np.float64)
    order = np.arange(n)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is ~100x faster than a contended pool, and deterministic
    try:
        for held in stratified_folds(y_all, folds, seed):
            probs[held] = _fold_probs(f_all, y_all, order, held, num_classes, steps, weight_decay)
    finally:
        torch.set_num_threads(threads)
    return probs


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> list[np.ndarray]:
    """``folds`` disjoint sets of positions covering ``labels``, each holding every class's floor or ceiling
    share: the samples are shuffled (seeded), grouped by label and dealt to the folds in turn."""
    order = np.random.default_rng(seed).permutation(len(labels))
    grouped = order[np.argsort(labels[order], kind="stable")]  # by class, in shuffled order within each
    return [np.sort(grouped[j::folds]) for j in range(folds)]


def _fold_probs(f_all: np.ndarray, y_all: np.ndarray, order: np.ndarray, held: np.ndarray, num_classes: int,
                steps: int, weight_decay: float) -> np.ndarray:  # fmt: skip
    """Probabilities of the ``held`` samples from a probe fitted on the other samples of ``order``."""
    fit = np.setdiff1d(order, held, assume_unique=True)
    mu, sd = f_all[fit].mean(0), f_all[fit].std(0) + 1e-6
    f_fit = torch.from_numpy(((f_all[fit] - mu) / sd).astype(np.float32))
    probe = _fit_probe(f_fit, torch.from_numpy(y_all[fit]), num_classes, steps, weight_decay)
    with torch.no_grad():
        logits = probe(torch.from_numpy(((f_all[held] - mu) / sd).astype(np.float32))).double()
        return torch.softmax(logits, 1).numpy()


def baseline_masks(model: nn.Module, x: np.ndarray, y: np.ndarray, mean: Sequence[float], std: Sequence[float],
                   k: int, methods: Sequence[str] = METHODS, seed: int = 0) -> dict[str, np.ndarray]:  # fmt: skip
    """Keep masks (each dropping exactly ``k`` of the ``len(y)`` samples) for each baseline in ``methods``.

    ``x`` are uint8 (N, H, W, C) training images and ``y`` their labels; ``model`` is the scored model
    (its losses rank ``loss``; its penultimate features feed the cross-validated probe for
    ``cleanlab``). ``seed`` seeds ``random`` and the probe's folds. Returns ``{method: keep}``.
    """
    names = parse_methods(list(methods))
    y = np.asarray(y, dtype=np.int64).reshape(-1)
    if x.ndim != 4 or x.dtype != np.uint8 or len(x) != len(y):
        raise InputError(f"x must be uint8 images (N, H, W, C) with N = {len(y)} labels, got {x.dtype} {x.shape}")
    n = len(y)
    if not 0 <= int(k) < n:
        raise InputError(f"k (samples to drop) must be in 0..{n - 1} so that at least one of the {n} samples "
                         f"is kept, got {k}")  # fmt: skip
    from .models import head_module

    num_classes = head_module(model).out_features
    _check_labels(y, num_classes)
    out: dict[str, np.ndarray] = {}
    feats = logits = None
    if any(m in names for m in ("loss", "cleanlab")):
        feats, logits = features_and_logits(model, x, mean, std)
    for m in names:
        if m == "random":
            out[m] = random_drop(n, int(k), seed)
        elif m == "loss":
            losses = nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y), reduction="none")
            out[m] = loss_drop(losses.numpy(), int(k))
        else:
            probs = cross_validated_probs(feats, y, num_classes, seed=seed)
            out[m] = cleanlab_drop(y, probs, int(k))
    return out


def baseline_masks_task(model: nn.Module, samples: Any, mean: Sequence[float], std: Sequence[float], k: int,
                        methods: Sequence[str], seed: int, threads: int) -> dict[str, np.ndarray]:  # fmt: skip
    """:func:`baseline_masks` in a Ray worker (on its GPU when it has one): ``samples`` is a
    :class:`~idtl_ray.data.samples.RaySamples`, gathered here from Ray Data, so the driver never holds the images."""
    from .scoring.common import setup_worker

    device = setup_worker(threads)
    x, y = samples.gather()
    return baseline_masks(model.to(device), x, y, mean, std, k, methods, seed=seed)


def row_label(method: str, k: int) -> str:
    """Row title of a baseline in the compare table, e.g. ``Baseline: drop 144 highest-loss``."""
    return f"Baseline: drop {k} {TITLES[method]}"


__all__ = ["METHODS", "baseline_masks", "cleanlab_drop", "cross_validated_probs", "features_and_logits", "loss_drop",
           "parse_methods", "random_drop", "row_label"]  # fmt: skip
