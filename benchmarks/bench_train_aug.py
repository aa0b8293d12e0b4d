"""Fine-tuning with the batch augmentation on the device against today's per-sample torchvision one
(issue 12 item 3: "CPU results must match today's within seed noise").

Both arms run :func:`idtl_ray.finetune.run_finetune` (strategy scratch, sample-cnn, Ray Train, one
worker, fp32 on the CPU) on the same prepared CIFAR-10 subset: a seeded draw of real images from
``../shared/data/cifar10_jpegbytes.npz`` (default 5,000 training, 10% of them carved for validation,
and 2,000 test images) written as an ``npz:`` file and prepared with its dataset recorded as
``cifar10``, so that both arms pick the CIFAR recipe (horizontal flip + shifts up to 10%) by name;
an ``npz:`` dataset itself gets no augmentation. The OLD arm runs the library as of ``--old-ref``
(exported with ``git archive``, nothing in the work tree changes) in its own process; the NEW arm
runs the work tree. Arms alternate seed by seed, each in a fresh process with a fresh local Ray, so
drifting load on a shared machine hits both alike. Evaluation runs after the last epoch only
(``eval_every = epochs``). Each epoch's training loop is timed inside the worker; epoch 1 (which also
starts Ray Data's pipeline) is left out of the mean.

    python benchmarks/bench_train_aug.py [--n-train 5000] [--n-test 2000] [--epochs 8] [--seeds 0 1 2]
                                         [--old-ref 71d7ced] [--out results/bench_train_aug.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
OLD_REF = "71d7ced"  # the last commit whose Train worker augments per sample with torchvision


def _timed_worker(config: dict[str, Any]) -> None:
    """The library's Train worker loop with each ``_train_epoch`` timed inside the worker (both arms have
    it): the driver sees epochs only through Ray Train's report polling, seconds late. Defined in
    ``__main__``, so Ray ships it by value and the worker runs it against its own tree."""
    import idtl_ray.finetune.worker as W

    train_epoch, times = W._train_epoch, []

    def timed(*args: Any) -> Any:
        t = time.perf_counter()
        result = train_epoch(*args)
        times.append(time.perf_counter() - t)  # the CPU's loss needs no sync: the epoch's work is done
        (Path(config["cfg"]["out"]) / "epoch_times.json").write_text(json.dumps(times))
        return result

    W._train_epoch = timed
    W.train_worker(config)


def _arm(tree: str, dataset: str, out: str, seed: int, epochs: int) -> None:
    """Child process: one run of the library at ``tree`` (first on sys.path); prints a JSON line."""
    sys.path.insert(0, tree)  # before the editable install of the work tree
    import ray

    import idtl_ray
    import idtl_ray.finetune.worker as W
    from idtl_ray.finetune import FinetuneConfig, run_finetune
    from idtl_ray.scoring import ensure_ray

    ensure_ray(None)
    # the workers must import the same tree as this driver (they inherit PYTHONPATH, set by the parent)
    worker_file = ray.get(ray.remote(lambda: __import__("idtl_ray").__file__).remote())
    assert worker_file == idtl_ray.__file__, (worker_file, idtl_ray.__file__)
    W.train_worker = _timed_worker  # what finetune.run._trainer hands to the TorchTrainer
    t0 = time.monotonic()
    final = run_finetune(FinetuneConfig(dataset=dataset, strategy="scratch", model="sample-cnn", epochs=epochs,
                                        eval_every=epochs, seed=seed, out=out))  # fmt: skip
    times = json.loads((Path(out) / "epoch_times.json").read_text())
    print(json.dumps({"tree": idtl_ray.__file__, "seed": seed, "test_error": final["test_error"],
                      "epoch_s": times, "total_s": time.monotonic() - t0}))  # fmt: skip


def _prepare(work: Path, n_train: int, n_test: int) -> str:
    """The CIFAR-10 subset as a prepared directory whose manifest names ``cifar10`` (for the recipe)."""
    import dataclasses

    import numpy as np

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import CIFAR_NPZ, load_cifar_jpeg

    from idtl_ray import data as D

    train, test = load_cifar_jpeg(n_train, "train"), load_cifar_jpeg(n_test, "test")
    if train is None or test is None:
        sys.exit(f"skipped: {CIFAR_NPZ} not found (this benchmark needs the real CIFAR-10 images)")
    npz = work / "cifar10-subset.npz"
    np.savez(npz, x_train=train[0], y_train=train[1], x_test=test[0], y_test=test[1])
    # npz: datasets carry no augmentation; recorded as cifar10, the prepared copy gets CIFAR's recipe
    data = dataclasses.replace(D.load_npz(npz), name="cifar10")
    out = work / "prepared"
    D.write_prepared(data, D.make_split(data, 0.1, seed=0), str(out), source=f"npz:{npz}")
    assert D.augmentation(str(out)) is not None and D.batch_augmentation(str(out)) == D.batch_augmentation("cifar10")
    return str(out)


def _export(ref: str, work: Path) -> str:
    """The library as of ``ref`` in a directory of its own (git archive: the work tree is untouched)."""
    tree = work / "old"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", ref, "idtl_ray"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return str(tree)


def _run_arm(tree: str, dataset: str, out: Path, seed: int, epochs: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": tree}  # Ray's workers inherit it: they import the same tree
    cmd = [sys.executable, __file__, "--arm", tree, dataset, str(out), str(seed), str(epochs)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent, env=env)
    if r.returncode != 0:
        sys.exit(f"the run in {tree} (seed {seed}) failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _augment_ms(batch: int = 128) -> dict[str, float]:
    """Milliseconds to augment one batch of 32x32 RGB images: per sample (torchvision) vs batched."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import best_time

    from idtl_ray import data as D

    x = torch.rand(batch, 3, 32, 32)
    per_sample, batched, g = D.augmentation("cifar10"), D.batch_augmentation("cifar10"), torch.Generator()
    return {"per_sample_ms": 1e3 * best_time(lambda: torch.stack([per_sample(s) for s in x])),
            "batch_ms": 1e3 * best_time(lambda: batched(x, g))}


def _summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm, rows in runs.items():
        errors = [r["test_error"] for r in rows]
        epochs = [t for r in rows for t in r["epoch_s"][1:]]  # epoch 1 also starts Ray Data's pipeline
        out[arm] = {"test_error_mean": statistics.mean(errors), "test_error_std": statistics.stdev(errors) if len(errors) > 1 else 0.0,
                    "epoch_s_mean": statistics.mean(epochs), "errors": errors}  # fmt: skip
    out["epoch_time_ratio_new_over_old"] = out["new"]["epoch_s_mean"] / out["old"]["epoch_s_mean"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--old-ref", default=OLD_REF)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_train_aug.json"))
    ap.add_argument("--arm", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        tree, dataset, out, seed, epochs = args.arm
        _arm(tree, dataset, out, int(seed), int(epochs))
        return
    runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="idtl-bench-train-aug-") as tmp:
        work = Path(tmp)
        dataset = _prepare(work, args.n_train, args.n_test)
        trees = {"old": _export(args.old_ref, work), "new": str(ROOT)}
        for seed in args.seeds:
            for arm, tree in trees.items():
                row = _run_arm(tree, dataset, work / f"run-{arm}-{seed}", seed, args.epochs)
                runs[arm].append(row)
                print(f"{arm} seed {seed}: test error {row['test_error']:.2f}%, epochs "
                      f"{', '.join(f'{t:.1f}' for t in row['epoch_s'])} s", flush=True)
    summary = {**_summary(runs), "augment_one_batch": _augment_ms(), "runs": runs,
               "settings": {**vars(args), "arm": None}}  # fmt: skip
    for arm in ("old", "new"):
        s = summary[arm]
        print(f"{arm}: test error {s['test_error_mean']:.2f} ± {s['test_error_std']:.2f}%, "
              f"{s['epoch_s_mean']:.2f} s per training epoch")
    print(f"epoch time new/old: {summary['epoch_time_ratio_new_over_old']:.3f}; one 128-image batch augmented: "
          f"{summary['augment_one_batch']['per_sample_ms']:.1f} ms per sample vs "
          f"{summary['augment_one_batch']['batch_ms']:.1f} ms batched")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
