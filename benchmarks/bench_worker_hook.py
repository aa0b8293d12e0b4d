"""Does importing torch when each Ray worker starts shorten self-influence scoring? (issue 11 item 8)

Alternating A/B in one run on the embedded local Ray as `idtl-ray score` starts it, 45,000 training /
5,000 validation CIFAR-10 images (../shared/data; the script stops with a message without the file),
sample-cnn, 2 scoring actors: "off" as shipped, "on" with a ``worker_process_setup_hook`` that imports
torch (``torch.get_num_threads``) in every worker process. Prints each run and the medians.

    python benchmarks/bench_worker_hook.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from common import CIFAR_NPZ, load_cifar_jpeg  # noqa: E402
from idtl_ray.data import channel_stats  # noqa: E402
from idtl_ray.influence import InfluenceConfig  # noqa: E402
from idtl_ray.models import build_model  # noqa: E402
from idtl_ray.scoring import ArraySet, Preprocess, run_pipeline  # noqa: E402
from idtl_ray.scoring.session import local_ray_options  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=45000)
    args = ap.parse_args()
    n = args.n_train
    got = load_cifar_jpeg(n + 5000)
    if got is None:
        print(f"skipped: {CIFAR_NPZ} not found (this benchmark needs real CIFAR-10 images)")
        return 0
    x, y = got
    mean, std = channel_stats(x)
    train, val = ArraySet(x[:n], y[:n], np.arange(n)), ArraySet(x[n:], y[n:], np.arange(len(y) - n))
    torch.manual_seed(0)
    model = build_model("sample-cnn", 10, in_channels=3, image_size=32).eval()
    cfg = InfluenceConfig(score="self", curvature_samples=512, max_iter=10, tol=1e-6, batch_size=256)
    seconds: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.repeat):
        for mode in seconds:
            opts = local_ray_options(2)
            if mode == "on":
                opts["runtime_env"] = {"worker_process_setup_hook": "torch.get_num_threads"}
            ray.init(**opts, log_to_driver=False, logging_level="ERROR")
            t = time.perf_counter()
            r = run_pipeline(model, train, val, cfg, preprocess=Preprocess(mean, std), actors=2, progress=False)
            seconds[mode].append(time.perf_counter() - t)
            ray.shutdown()
            print(f"{mode}: {seconds[mode][-1]:.1f} s (scores {r.timings['scores_s']:.1f} s)", flush=True)
    for mode, v in seconds.items():
        print(f"{mode}: median {np.median(v):.1f} s of {', '.join(f'{s:.1f}' for s in v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
