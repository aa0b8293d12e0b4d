"""`--drop auto`: choose how many samples to drop by fine-tuning on validation, one Ray Tune trial per budget.

Why: how many samples a target should lose depends on how noisy it is, which the scores alone do not
say (on clean data any fixed budget throws away good samples; on noisy data too small a budget keeps
flipped ones). So each candidate budget is tried: the pre-trained (adapted) model is fine-tuned on the
samples that budget keeps and scored on the validation split. The default score, self-influence,
never sees the validation split, so these numbers are unbiased by the scoring.

Choice: the smallest budget whose validation error is within one standard error of the best's, the
standard error taken on the paired difference (only validation samples on which the two models
disagree count, so samples both get wrong, such as mislabelled validation samples, add no noise): a
larger budget must earn its place by more than the noise of a finite validation set. On a clean
target that keeps (almost) everything.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import InputError
from .selection import budget_count, checked_scores, keep_least_harmful

DEFAULT_CANDIDATES = (0.0, 0.05, 0.1, 0.2, 0.3)


@dataclass
class TrainRecipe:
    """A short fine-tuning run: the paper's optimiser and schedule (Adam, x0.1 at half), fewer epochs."""

    epochs: int = field(default=10, metadata={"help": "Epochs of each fine-tuning trial."})
    batch_size: int = field(default=128, metadata={"help": "Batch size of each trial."})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate (x0.1 at half the epochs)."})

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise InputError(f"the auto budget's recipe needs epochs >= 1, batch_size >= 1, lr > 0; got {self}")


def lr_drop_epoch(fraction: float, epochs: int) -> int:
    """The first epoch at x0.1 learning rate: ``fraction * epochs`` rounded half up, at least 1 (round() goes
    to even: 5 epochs dropped after 2, 7 after 4). The trials here and the Ray Train workers share it."""
    return max(1, math.floor(fraction * epochs + 0.5))


def fine_tune(model: nn.Module, x: np.ndarray, y: np.ndarray, recipe: TrainRecipe, mean: Any, std: Any,
              augment: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
              device: torch.device | str = "cpu") -> nn.Module:
    """Fine-tune ``model`` in place on uint8 NHWC images ``x`` and labels ``y``; returns it."""
    from .finetune.worker import _images

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.to(device).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=recipe.lr)
    drop_at = lr_drop_epoch(0.5, recipe.epochs)
    for epoch in range(recipe.epochs):
        for g in opt.param_groups:
            g["lr"] = recipe.lr * (0.1 if epoch >= drop_at else 1.0)
        order = rng.permutation(len(y))
        for i in range(0, len(order), recipe.batch_size):
            idx = np.sort(order[i:i + recipe.batch_size])
            if len(idx) < 2:  # BatchNorm cannot train on one sample
                continue
            opt.zero_grad(set_to_none=True)
            logits = model(_images(x[idx], augment, mean, std).to(device))
            torch.nn.functional.cross_entropy(logits, torch.as_tensor(y[idx], device=device)).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def correct(model: nn.Module, x: np.ndarray, y: np.ndarray, mean: Any, std: Any,
            device: torch.device | str = "cpu") -> np.ndarray:
    """Per sample: does the model (eval mode) predict the label?"""
    from .data import to_tensor

    model.to(device).eval()
    preds = [model(to_tensor(x[i:i + 512], mean, std).to(device)).argmax(1).cpu().numpy() for i in range(0, len(y), 512)]
    return np.concatenate(preds) == y if preds else np.zeros(0, bool)


def error_rate(model: nn.Module, x: np.ndarray, y: np.ndarray, mean: Any, std: Any,
               device: torch.device | str = "cpu") -> float:
    """Fraction of ``x`` the model misclassifies (eval mode)."""
    return float(1.0 - correct(model, x, y, mean, std, device).mean()) if len(y) else 0.0


@dataclass
class BudgetChoice:
    """The chosen budget and every trial's number (written into the mask's metadata and the summary)."""

    k: int
    fraction: float
    trials: list[dict[str, Any]]
    choice: str = "smallest budget within one paired standard error of the best validation error"

    def as_dict(self) -> dict[str, Any]:
        return {"k": self.k, "fraction": self.fraction, "choice": self.choice, "trials": self.trials}


def pick(trials: list[dict[str, Any]], correct_by_k: dict[int, np.ndarray]) -> dict[str, Any]:
    """The paired one-standard-error rule over finished trials (``k``, ``val_error``).

    ``correct_by_k[k]``: per validation sample, whether trial k's model got it right. A trial ties with
    the best when it loses at most one standard error of the paired difference, sqrt(b + c) samples
    (b, c: samples only one of the two gets right).
    """
    ok = [t for t in trials if t.get("val_error") is not None]
    if not ok:
        raise InputError("every auto-budget trial failed: see the trial errors in the log, or use --drop budget")
    best = min(ok, key=lambda t: (t["val_error"], t["k"]))
    hits = correct_by_k[best["k"]]

    def ties(t: dict[str, Any]) -> bool:
        mine = correct_by_k[t["k"]]
        b, c = int((hits & ~mine).sum()), int((mine & ~hits).sum())
        return b - c <= math.sqrt(b + c)

    return min((t for t in ok if ties(t)), key=lambda t: t["k"])


def _arrays(x: Any, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) as given, or gathered from Ray Data (:class:`~idtl_ray.data.samples.RaySamples`)."""
    return x.gather() if hasattr(x, "gather") else (x, y)


def _trial(config: dict[str, Any], model: nn.Module, data: dict[str, Any], recipe: TrainRecipe) -> None:
    import ray.tune

    from .scoring.common import worker_device

    torch.set_num_threads(1)
    device = str(worker_device())  # a trial Ray gave no GPU must not take one it can see
    keep = keep_least_harmful(data["harm"], int(config["k"]))
    x, y = _arrays(data["x"], data["y"])  # a prepared dataset's images are read here, in the trial
    val_x, val_y = _arrays(data["val_x"], data["val_y"])
    m = fine_tune(copy.deepcopy(model), x[keep], y[keep], recipe, data["mean"], data["std"],
                  data["augment"], data["seed"], device)
    hits = correct(m, val_x, val_y, data["mean"], data["std"], device)
    ray.tune.report({"val_error": float(1.0 - hits.mean()), "val_correct": hits.tolist()})


def choose_budget(model: nn.Module, x: Any, y: np.ndarray, harm: np.ndarray, val_x: Any,
                  val_y: np.ndarray, mean: Any, std: Any, *, candidates: Sequence[float] = DEFAULT_CANDIDATES,
                  recipe: TrainRecipe | None = None, augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  seed: int = 0, gpus_per_trial: float = 0.0, storage: str | None = None,
                  progress: Callable[[str], None] | None = None) -> BudgetChoice:
    """Fine-tune once per candidate budget (a Ray Tune grid) and pick one by validation error.

    ``x``/``val_x``: images, or :class:`~idtl_ray.data.samples.RaySamples` that each trial gathers.
    ``harm``: higher = dropped first (:func:`idtl_ray.selection.harm_of`). ``candidates``: fractions or
    counts (:func:`idtl_ray.selection.budget_count`); 0 is always tried. Needs a running Ray.
    """
    import ray.tune

    recipe = recipe or TrainRecipe()
    if len(val_y) == 0:
        raise InputError("--drop auto needs a validation split to choose the budget on: use --drop budget instead")
    harm = checked_scores(harm)  # a NaN or a length mismatch fails here in one line, not in every trial
    if len(harm) != len(y):
        raise InputError(f"harm has {len(harm)} entries for {len(y)} training samples: score the same samples")
    ks = sorted({0, *(budget_count(c, len(y)) for c in candidates)})
    if ks[-1] >= len(y):
        raise InputError(f"a candidate budget drops all {len(y)} samples: use fractions below 1")
    data = {"x": x, "y": y, "harm": harm, "val_x": val_x, "val_y": val_y,
            "mean": mean, "std": std, "augment": augment, "seed": seed}
    if progress:
        progress(f"--drop auto: fine-tuning {len(ks)} candidates ({', '.join(map(str, ks))} samples dropped), "
                 f"{recipe.epochs} epochs each, on Ray Tune")
    trainable = ray.tune.with_resources(ray.tune.with_parameters(_trial, model=model.cpu(), data=data, recipe=recipe),
                                        {"cpu": 1, "gpu": gpus_per_trial})
    tuner = ray.tune.Tuner(
        trainable, param_space={"k": ray.tune.grid_search(ks)},
        run_config=ray.tune.RunConfig(storage_path=storage, verbose=0,
                                      failure_config=ray.tune.FailureConfig(max_failures=1)),
    )
    results = tuner.fit()
    trials, correct_by_k = [], {}
    for r in results:
        k = int(r.config["k"])
        err = (r.metrics or {}).get("val_error") if r.error is None else None
        if err is not None:
            correct_by_k[k] = np.asarray(r.metrics["val_correct"], dtype=bool)
        trials.append({"k": k, "fraction": round(k / len(y), 4), "val_error": err,
                       "error": None if r.error is None else str(r.error).strip().splitlines()[-1][:200]})
    trials.sort(key=lambda t: t["k"])
    chosen = pick(trials, correct_by_k)
    if progress:
        progress("--drop auto: " + ", ".join(f"{t['k']}: {100 * t['val_error']:.2f}%" if t["val_error"] is not None
                                              else f"{t['k']}: failed" for t in trials) + f" -> drop {chosen['k']}")
    return BudgetChoice(chosen["k"], chosen["k"] / len(y), trials)
