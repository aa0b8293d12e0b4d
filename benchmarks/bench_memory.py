"""The driver's peak memory when scoring 5,000 and 50,000 CIFAR-10 images (issue 11 item 2).

The driver of `idtl-ray score` must not hold the dataset: it keeps labels and scores (8 bytes per
sample each) while Ray Data reads and decodes the images on workers. This benchmark prepares two
datasets from the real CIFAR-10 images in ../shared/data/cifar10_jpegbytes.npz (a seeded draw of
5,000 and 50,000 training images, 1,000 test images each) with `idtl-ray prepare`, then scores each
in a fresh child process (`run_score`: a new head fitted on a worker, self-influence, 10% dropped)
and reads that process's peak resident memory (``ru_maxrss``). 45,000 more images are 132 MiB of
uint8 pixels; a driver that held them would differ by at least that much.

    python benchmarks/bench_memory.py [--sizes 5000 50000] [--model sample-cnn] [--out results/bench_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

LIMIT_MB = 100.0


def _child(location: str, out: str, model: str) -> None:
    """Score ``location`` in this process and print its peak RSS (MiB) as JSON on the last line."""
    from idtl_ray.config import ScoreConfig
    from idtl_ray.scoring import ensure_ray
    from idtl_ray.workflow import run_score

    ensure_ray(None)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    summary = run_score(ScoreConfig(dataset=location, model=model, head="new", drop="budget", drop_budget=0.1,
                                    out=out), progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n_train": summary["n_train"], "peak_rss_mib": peak, "rss_before_scoring_mib": before,
                      "seconds": time.perf_counter() - t}))


def _prepare(n: int, work: Path) -> str:
    """A prepared dataset of ``n`` CIFAR-10 training and 1,000 test images; returns its directory."""
    import numpy as np

    from common import CIFAR_NPZ, load_cifar_jpeg

    train, test = load_cifar_jpeg(n, "train"), load_cifar_jpeg(1000, "test")
    if train is None or test is None:
        sys.exit(f"skipped: {CIFAR_NPZ} not found (this benchmark needs the real CIFAR-10 images)")
    npz = work / f"cifar-{n}.npz"
    np.savez(npz, x_train=train[0], y_train=train[1], x_test=test[0], y_test=test[1])
    out = work / f"prepared-{n}"
    subprocess.run([sys.executable, "-m", "idtl_ray.cli", "prepare", "--dataset", f"npz:{npz}", "--out", str(out)],
                   check=True, cwd=ROOT)
    npz.unlink()
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    ap.add_argument("--model", default="sample-cnn")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_memory.json"))
    ap.add_argument("--child", nargs=2, metavar=("DATASET", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child, args.model)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="idtl-bench-memory-") as tmp:
        work = Path(tmp)
        for n in args.sizes:
            location = _prepare(n, work)
            r = subprocess.run([sys.executable, __file__, "--model", args.model, "--child", location,
                                str(work / f"score-{n}")], capture_output=True, text=True, cwd=ROOT)
            if r.returncode != 0:
                sys.exit(f"scoring {n} images failed:\n{r.stderr[-3000:]}")
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append({"images": n, **row})
            print(f"{n:>6} images ({row['n_train']} scored): driver peak RSS {row['peak_rss_mib']:.0f} MiB "
                  f"(after Ray start {row['rss_before_scoring_mib']:.0f} MiB), {row['seconds']:.0f} s", flush=True)
    diff = rows[-1]["peak_rss_mib"] - rows[0]["peak_rss_mib"]
    verdict = "PASS" if abs(diff) < LIMIT_MB else "FAIL"
    print(f"difference {diff:+.0f} MiB ({verdict}: the target is under {LIMIT_MB:.0f} MB)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "runs": rows, "difference_mib": diff,
                                          "target_mb": LIMIT_MB, "verdict": verdict}, indent=1) + "\n")


if __name__ == "__main__":
    main()
