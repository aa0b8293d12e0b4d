"""Which samples to drop: idtl-ray's scores against the baselines a practitioner tries first (issue 10).

On noisy targets (``noisy_targets.py``: 20% of training and validation labels flipped, seeded; a
source model pre-trained on another domain or label set, a new head fitted on the noisy target) this
compares, at equal drop sizes k (10% and 20% of the training samples):

  self        idtl-ray's default: self-influence over the head's bias (EK-FAC)
  self-head   self-influence over the whole head (weight and bias, EK-FAC)
  paper       delta_val_loss with the library's solver defaults (the paper's validation influence)
  loss        highest per-sample loss under the same adapted model
  cleanlab    cleanlab's label-quality ranking on cross-validated linear-probe probabilities
  random      3 seeded draws
  oracle      exactly the flipped samples first
and the paper's rule (drop every delta_val_loss < 0) and the default rule (``--drop auto``: a Ray Tune
trial per candidate budget, chosen on the noisy validation split).

Reported per target and seed: precision and recall of flipped labels among the dropped, and the test
error after fine-tuning (the same recipe for every kept set: Adam 1e-3, x0.1 at half, batch 128, all
layers, from the adapted model, no augmentation: 2 CPUs) on all data, on each 20% selection, on the paper's rule and on the
default rule; on the clean control (true labels) all data against the default rule. Mean ± std over
seeds, written to results/bench_selection.{json,md}.

    python benchmarks/bench_selection.py --targets digits cifar10 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from noisy_targets import TARGETS, NoisyTarget  # noqa: E402

from idtl_ray import baselines as B  # noqa: E402
from idtl_ray import models as M  # noqa: E402
from idtl_ray.budget import TrainRecipe, choose_budget, error_rate, fine_tune  # noqa: E402
from idtl_ray.influence import InfluenceConfig, compute_influence  # noqa: E402
from idtl_ray.mask import write_text_atomic  # noqa: E402
from idtl_ray.scoring import Preprocess  # noqa: E402
from idtl_ray.selection import keep_least_harmful, keep_mask  # noqa: E402
from idtl_ray.workflow import fit_head  # noqa: E402

FRACTIONS = (0.1, 0.2)
SAME_SIZE = ("loss", "cleanlab", "random0")  # baselines compared with the default at the budget it chose
DEFAULT_CANDIDATES = (0.0, 0.05, 0.1, 0.2, 0.3)


def adapted_model(t: NoisyTarget, seed: int) -> torch.nn.Module:
    """The source model with a new head fitted on the (noisy) target, as `idtl-ray score --head new`.

    Seeded: the new head's init came from torch's global RNG, whose state depended on what ran before in
    the process, and 50 L-BFGS steps do not forget it (precision at 20% moved by up to 0.02).
    """
    model, _ = M.load_checkpoint(t.source)
    torch.manual_seed(seed)
    M.replace_head(model, t.num_classes)
    fit_head(model, t.x_train, t.y_train, Preprocess(t.mean, t.std), steps=50, seed=seed)
    return model.eval()


def rankings(t: NoisyTarget, model: torch.nn.Module, seed: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Harm per sample (higher = drop first) for every selection method, and the paper's scores."""
    pre = Preprocess(t.mean, t.std)
    xtr, ytr = pre(t.x_train), torch.as_tensor(t.y_train)
    train, val = TensorDataset(xtr, ytr), TensorDataset(pre(t.x_val), torch.as_tensor(t.y_val))
    harm, info = {}, {}
    for name, cfg in (("self", InfluenceConfig(seed=seed)), ("self-head", InfluenceConfig(head_params="head", seed=seed)),
                      ("paper", InfluenceConfig(score="paper", seed=seed))):
        t0 = time.perf_counter()
        r = compute_influence(model, train, val, cfg)
        harm[name] = r.harm
        info[name] = {"seconds": round(time.perf_counter() - t0, 2), "solve": r.solve.as_dict()}
        if name == "paper":
            info["paper_scores"] = r.scores
    feats, logits = B.features_and_logits(model, t.x_train, t.mean, t.std)
    harm["loss"] = torch.nn.functional.cross_entropy(torch.as_tensor(logits), ytr, reduction="none").numpy()
    probs = B.cross_validated_probs(feats, t.y_train, t.num_classes, seed=seed)
    from cleanlab.rank import get_label_quality_scores

    harm["cleanlab"] = -get_label_quality_scores(t.y_train, probs, method="self_confidence")
    for d in range(3):
        harm[f"random{d}"] = np.random.default_rng(100 * seed + d).random(len(t.y_train))
    harm["oracle"] = t.flipped.astype(np.float64) + 1e-6 * np.random.default_rng(seed).random(len(t.y_train))
    return harm, info


def precision_recall(keep: np.ndarray, flipped: np.ndarray) -> tuple[float, float]:
    """Share of flipped labels among the dropped (NaN when nothing was dropped: undefined, not 0) and recall."""
    dropped = ~keep
    hit = int((dropped & flipped).sum())
    return (hit / int(dropped.sum()) if dropped.any() else float("nan")), hit / max(1, int(flipped.sum()))


def test_error(t: NoisyTarget, model: torch.nn.Module, keep: np.ndarray, recipe: TrainRecipe, seed: int) -> float:
    import copy

    m = fine_tune(copy.deepcopy(model), t.x_train[keep], t.y_train[keep], recipe, t.mean, t.std, None, seed)
    return 100.0 * error_rate(m, t.x_test, t.y_test, t.mean, t.std)


def run_seed(target: str, seed: int, work: Path, recipe: TrainRecipe, candidates: list[float]) -> dict[str, Any]:
    t = TARGETS[target](work, seed)
    model = adapted_model(t, seed)
    harm, info = rankings(t, model, seed)
    n, fl = len(t.y_train), t.flipped
    row: dict[str, Any] = {"target": target, "seed": seed, "n_train": n, "n_flipped": int(fl.sum()),
                           "timing_s": {k: v["seconds"] for k, v in info.items() if isinstance(v, dict)},
                           "paper_solve": info["paper"]["solve"], "pr": {}, "test_error": {}}
    for name, h in harm.items():
        for f in FRACTIONS:
            row["pr"][f"{name}@{f:g}"] = precision_recall(keep_least_harmful(h, int(f * n)), fl)
    paper_keep = keep_mask(info["paper_scores"])
    row["pr"]["paper-rule"] = precision_recall(paper_keep, fl)
    row["paper_rule_dropped"] = int((~paper_keep).sum())
    k20 = int(0.2 * n)
    keeps = {"all": np.ones(n, bool), "paper-rule": paper_keep}
    for name in ("self", "loss", "cleanlab", "random0", "oracle"):
        keeps[f"{name}@0.2"] = keep_least_harmful(harm[name], k20)
    choice = choose_budget(model, t.x_train, t.y_train, harm["self"], t.x_val, t.y_val, t.mean, t.std,
                           candidates=candidates, recipe=recipe, seed=seed)
    keeps["default (auto)"] = keep_least_harmful(harm["self"], choice.k)
    if choice.k not in (0, k20):  # the baselines at the size the default chose (at 0 or 20% they are run above)
        for name in SAME_SIZE:
            keeps[f"{name}@auto"] = keep_least_harmful(harm[name], choice.k)
    row["auto"] = choice.as_dict()
    row["pr"]["default (auto)"] = precision_recall(keeps["default (auto)"], fl)
    for name, keep in keeps.items():
        row["test_error"][name] = test_error(t, model, keep, recipe, seed)
        print(f"  {target} seed {seed}: {name:<16} kept {int(keep.sum()):>5}  test error {row['test_error'][name]:.2f}%",
              flush=True)
    # the clean control: the same target with its true labels, all data against the default rule
    c = t.clean()
    cmodel = adapted_model(c, seed)
    charm = compute_influence(cmodel, TensorDataset(Preprocess(c.mean, c.std)(c.x_train), torch.as_tensor(c.y_train)),
                              None, InfluenceConfig(seed=seed)).harm
    cchoice = choose_budget(cmodel, c.x_train, c.y_train, charm, c.x_val, c.y_val, c.mean, c.std, candidates=candidates,
                            recipe=recipe, seed=seed)
    row["clean"] = {"auto": cchoice.as_dict(),
                    "all": test_error(c, cmodel, np.ones(n, bool), recipe, seed),
                    "default (auto)": test_error(c, cmodel, keep_least_harmful(charm, cchoice.k), recipe, seed)}
    print(f"  {target} seed {seed} clean control: all {row['clean']['all']:.2f}%, default drops {cchoice.k}: "
          f"{row['clean']['default (auto)']:.2f}%", flush=True)
    return row


def _ms(v: list[float], pct: bool = False) -> str:
    """Mean ± sample std (ddof 1) over seeds; seeds where the value is undefined (NaN) are left out and counted."""
    a = np.asarray(v, dtype=float)
    a, undefined = a[~np.isnan(a)], int(np.isnan(a).sum())
    fmt = "{:.2f}" if pct else "{:.3f}"
    if not a.size:
        return "-"
    cell = fmt.format(a.mean()) + (" ± " + fmt.format(a.std(ddof=1)) if len(a) > 1 else "")
    return cell + (f" ({undefined} seed(s) dropped nothing)" if undefined else "")


def _key(row: dict[str, Any]) -> tuple[str, int, tuple[float, ...]]:
    """What makes rows comparable: target, fine-tuning epochs, auto candidates (older rows: the defaults)."""
    return row["target"], int(row.get("epochs", 15)), tuple(row.get("candidates", DEFAULT_CANDIDATES))


def _at_chosen_size(row: dict[str, Any], name: str) -> float | None:
    """Test error of baseline ``name`` at the budget the default chose in ``row`` (None: not recorded)."""
    k, errs = row["auto"]["k"], row["test_error"]
    if k == 0:
        return errs["all"]
    if k == int(0.2 * row["n_train"]):
        return errs.get(f"{name}@0.2")
    return errs.get(f"{name}@auto")


def _same_size_table(rs: list[dict[str, Any]]) -> list[str]:
    """Per seed: the default's test error against each baseline dropping as many samples as it did."""
    if not any(all(_at_chosen_size(r, n) is not None for n in SAME_SIZE) for r in rs):
        return []  # rows recorded before the same-size arms were added
    out = ["", "The default against the baselines at the budget it chose (test error %, per seed):", "",
           "| seed | dropped | default (auto) | " + " | ".join(SAME_SIZE) + " |", "|---|---|---|" + "---|" * len(SAME_SIZE)]
    for r in rs:
        cells = [_at_chosen_size(r, n) for n in SAME_SIZE]
        out.append(f"| {r['seed']} | {r['auto']['k']} | {r['test_error']['default (auto)']:.2f} | "
                   + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    complete = [r for r in rs if all(_at_chosen_size(r, n) is not None for n in SAME_SIZE)]
    means = [_ms([_at_chosen_size(r, n) for r in complete], True) for n in SAME_SIZE]
    out.append(f"| mean (seeds with every arm) | | {_ms([r['test_error']['default (auto)'] for r in complete], True)} | " + " | ".join(means) + " |")
    return out


def render(rows: list[dict[str, Any]]) -> str:
    out = ["# Selection benchmark (benchmarks/bench_selection.py)", ""]
    for key in dict.fromkeys(_key(r) for r in rows):
        rs = [r for r in rows if _key(r) == key]
        target = key[0]
        out += [f"## {target}, {key[1]} fine-tuning epochs, auto candidates {list(key[2])}: {rs[0]['n_train']} training "
                f"samples, {rs[0]['n_flipped']} flipped; seeds {[r['seed'] for r in rs]}", "",
                "Precision / recall of flipped labels among the dropped (mean ± std over seeds):", "",
                "| selection | precision @10% | recall @10% | precision @20% | recall @20% |", "|---|---|---|---|---|"]
        names = [k.split("@")[0] for k in rs[0]["pr"] if k.endswith("@0.1")]
        for name in names:
            cells = [_ms([r["pr"][f"{name}@{f:g}"][i] for r in rs]) for f in FRACTIONS for i in (0, 1)]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        for name in ("paper-rule", "default (auto)"):
            # a rule that dropped nothing has no precision (rows recorded before this fix hold 0 there)
            pr = [r["pr"][name] if name == "paper-rule" or r["auto"]["k"] else (float("nan"), 0.0) for r in rs]
            drop = [r["paper_rule_dropped"] if name == "paper-rule" else r["auto"]["k"] for r in rs]
            out.append(f"| {name} (drops {drop}) | {_ms([p[0] for p in pr])} | {_ms([p[1] for p in pr])} | | |")
        out += ["", "Test error (%) after fine-tuning on each kept set (mean ± std over seeds):", "",
                "| kept set | test error (%) |", "|---|---|"]
        for name in rs[0]["test_error"]:
            if not name.endswith("@auto"):
                out.append(f"| {name} | {_ms([r['test_error'][name] for r in rs], True)} |")
        out += _same_size_table(rs)
        out += ["", "Clean control (true labels): all data against the default rule:", "",
                f"| all data | {_ms([r['clean']['all'] for r in rs], True)} |",
                f"| default (auto), dropped {[r['clean']['auto']['k'] for r in rs]} | "
                f"{_ms([r['clean']['default (auto)'] for r in rs], True)} |", ""]
        times = {k: float(np.median([r["timing_s"][k] for r in rs])) for k in rs[0]["timing_s"]}
        out += ["Scoring time, median over seeds (s; the first seed's includes the process's warm-up): "
                + ", ".join(f"{k} {v:.2f}" for k, v in times.items()), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", nargs="+", default=["digits", "cifar10"], choices=sorted(TARGETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs of every test-error run and auto trial")
    ap.add_argument("--candidates", nargs="+", type=float, default=list(DEFAULT_CANDIDATES))
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "idtl-ray" / "bench_selection"))
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_selection"))
    args = ap.parse_args(argv)
    import ray

    ray.init(num_cpus=2, address="local", include_dashboard=False, log_to_driver=False)
    torch.set_num_threads(2)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    partial = out / "rows.jsonl"  # one line per finished (target, seed): a rerun skips those
    done = [json.loads(x) for x in partial.read_text().splitlines()] if partial.exists() else []
    recipe = TrainRecipe(epochs=args.epochs)
    for target in args.targets:
        for seed in args.seeds:
            if any(_key(r) == (target, args.epochs, tuple(args.candidates)) and r["seed"] == seed for r in done):
                continue  # finished with the same epochs and candidates (other settings are run, not reused)
            t0 = time.perf_counter()
            row = run_seed(target, seed, work, recipe, args.candidates)
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            row["epochs"] = recipe.epochs
            row["candidates"] = list(args.candidates)
            out.mkdir(parents=True, exist_ok=True)
            with partial.open("a") as f:
                f.write(json.dumps(row) + "\n")
    every = [json.loads(x) for x in partial.read_text().splitlines()]  # all targets run so far
    md = render(every)
    write_text_atomic(md, out / "bench_selection.md")
    write_text_atomic(json.dumps(every, indent=1), out / "bench_selection.json")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
