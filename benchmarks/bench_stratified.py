"""Does dropping the same share of every given label close the default's test-error gap? (issue 10)

On a bench_selection target (same source, flips, adapted model and fine-tuning recipe), the default
score (self-influence), the loss and the mean of their ranks ("mix") each drop 20% of the training
samples, either globally (the most harmful first, as `--drop budget` does) or stratified (20% of each
given label, the most harmful first within it). Prints precision of flipped labels and the test error
of each kept set.

    python benchmarks/bench_stratified.py --seeds 0 1 2 [--epochs 10] [--target digits] [--clean]
        [--arms "mix global" "self stratified"]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from bench_selection import adapted_model, precision_recall  # noqa: E402
from noisy_targets import TARGETS  # noqa: E402

from idtl_ray import baselines as B  # noqa: E402
from idtl_ray.budget import TrainRecipe, error_rate, fine_tune  # noqa: E402
from idtl_ray.influence import InfluenceConfig, compute_influence  # noqa: E402
from idtl_ray.scoring import Preprocess  # noqa: E402
from idtl_ray.selection import keep_least_harmful  # noqa: E402


def stratified_keep(harm: np.ndarray, fraction: float, labels: np.ndarray) -> np.ndarray:
    """Drop ``int(fraction * n)`` samples, as the global arms do, shared over the given labels in proportion
    to their sizes (largest remainders; rounding each label's share on its own dropped 1-2 too many), the
    most harmful first within each label."""
    classes, sizes = np.unique(labels, return_counts=True)
    quota = fraction * sizes
    per = np.floor(quota).astype(int)
    short = int(fraction * len(labels)) - int(per.sum())
    per[np.argsort(-(quota - per), kind="stable")[:short]] += 1
    keep = np.ones(len(labels), bool)
    for c, k in zip(classes, per):
        idx = np.flatnonzero(labels == c)
        keep[idx[np.argsort(-harm[idx], kind="stable")[:k]]] = False
    return keep


def rank_mix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The mean of two rankings' ranks (0 = least harmful): a sample ranks high only if both rank it high."""
    return (np.argsort(np.argsort(a, kind="stable")) + np.argsort(np.argsort(b, kind="stable"))) / 2.0


def run_seed(target: str, seed: int, work: Path, recipe: TrainRecipe, arms: list[str] | None = None,
             clean: bool = False) -> dict[str, list[float]]:
    t = TARGETS[target](work, seed)
    t = t.clean() if clean else t
    model = adapted_model(t, seed)
    pre = Preprocess(t.mean, t.std)
    harm = {"self": compute_influence(model, TensorDataset(pre(t.x_train), torch.as_tensor(t.y_train)), None,
                                      InfluenceConfig(seed=seed)).harm}
    _, logits = B.features_and_logits(model, t.x_train, t.mean, t.std)
    harm["loss"] = torch.nn.functional.cross_entropy(torch.as_tensor(logits), torch.as_tensor(t.y_train),
                                                     reduction="none").numpy()
    harm["mix"] = rank_mix(harm["self"], harm["loss"])
    row = {}
    for name, h in harm.items():
        for how, keep in (("global", keep_least_harmful(h, int(0.2 * len(h)))), ("stratified", stratified_keep(h, 0.2, t.y_train))):
            if arms and f"{name} {how}" not in arms:
                continue
            m = fine_tune(copy.deepcopy(model), t.x_train[keep], t.y_train[keep], recipe, t.mean, t.std, None, seed)
            row[f"{name} {how}"] = [precision_recall(keep, t.flipped)[0], 100 * error_rate(m, t.x_test, t.y_test, t.mean, t.std)]
            print(f"{target} seed {seed}: {name} {how}: precision {row[f'{name} {how}'][0]:.3f}, "
                  f"test error {row[f'{name} {how}'][1]:.2f}%", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="cifar10", choices=sorted(TARGETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--arms", nargs="*", help='only these arms, e.g. "mix global" "self stratified" (default: all)')
    ap.add_argument("--clean", action="store_true", help="the clean control: the same target with its true labels")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "idtl-ray" / "bench_selection"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = [run_seed(args.target, s, Path(args.work), TrainRecipe(epochs=args.epochs), args.arms, args.clean)
            for s in args.seeds]
    for key in rows[0]:
        v = np.array([r[key] for r in rows])
        print(f"{key:<18} precision {v[:, 0].mean():.3f}  test error {v[:, 1].mean():.2f} ± {v[:, 1].std(ddof=1) if len(v) > 1 else 0:.2f}")
    print(json.dumps({"target": args.target + ("-clean" if args.clean else ""), "epochs": args.epochs, "seeds": args.seeds, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
