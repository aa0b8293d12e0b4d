"""Scoring through Ray against the in-process engine (issue 3 item 8, issue 11 item 8).

One run, one machine, one model, the same real images (a seeded random draw from CIFAR-10 in
../shared/data/cifar10_jpegbytes.npz; the benchmark stops with a message when the file is absent).
Prints, for the in-process engine and for the Ray pipeline, for each score (self-influence, the
default, and the paper's delta_val_loss), the time of each stage and the ratios that matter:

  overhead   = Ray total / in-process total - 1, per repeat (the median of the repeats' ratios); Ray's
               own start-up (`ray.init`) is printed apart and not counted in either total
  vs infer   = Ray scoring stage / one plain inference pass over the same training set, in PyTorch's
               default NCHW layout and in the channels-last layout the scoring itself uses
               (idtl_ray/layout.py; 1.7-2.1x faster for sample-cnn on these CPUs)

Same settings in every path. In-process, one process (2 torch threads) does everything; through Ray,
one pre-scoring task computes g_val and the solve (or the head factors), then a Ray Data actor pool
scores and writes Parquet files, which are merged. Each Ray path starts a fresh local Ray, so its
workers start cold (a first `idtl-ray score`, the worst case). With --warm, each Ray path's local
Ray first runs a small untimed pipeline (2,048 samples), as on a cluster that has already run a job:
Ray's daemons, dashboard and Ray Data's helper actors are up; the scoring actors and the pre-scoring
worker are new processes either way (Ray does not reuse an actor's process). Ray is shut down after
each Ray path in both modes, so the in-process path and the inference passes never run beside a
live Ray session (before the eleventh session, --warm kept one session for every repeat, and the
later repeats' baselines shared the 2 CPUs with it).

    python benchmarks/bench_ray.py [--n-train 45000] [--n-val 5000] [--model sample-cnn]
                                   [--scores self paper] [--actors 2] [--repeat 3] [--cpu-accounting] [--warm]

--cpu-accounting (Linux) also prints, for every path, the CPU-seconds each kind of process spent
(scoring actors, task workers, Ray Data's helper actors, the dashboard, Ray's daemons, the driver):
on 2 CPUs, what Ray adds is CPU taken from the scoring, so this is where its overhead goes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from common import CIFAR_NPZ, CpuAccount, load_cifar_jpeg  # noqa: E402

from idtl_ray.data import channel_stats, to_tensor  # noqa: E402
from idtl_ray.influence import InfluenceConfig, compute_influence  # noqa: E402
from idtl_ray.models import build_model  # noqa: E402
from idtl_ray.scoring import ArraySet, Preprocess, ensure_ray, run_pipeline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=45000)
    ap.add_argument("--n-val", type=int, default=5000)
    ap.add_argument("--model", default="sample-cnn")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--scores", nargs="+", choices=["self", "paper"], default=["self", "paper"])
    ap.add_argument("--actors", type=int, nargs="+", default=[2], help="scoring actors per Ray path (default: one per CPU)")
    ap.add_argument("--repeat", type=int, default=1, help="run every path this many times, alternating; report medians "
                    "(this machine's speed drifts by up to 2x between minutes)")
    ap.add_argument("--cpu-accounting", action="store_true", help="print the CPU-seconds of every kind of process per path")
    ap.add_argument("--warm", action="store_true", help="warm each Ray path's fresh session with a small untimed run first")
    args = ap.parse_args()
    got = load_cifar_jpeg(args.n_train + args.n_val)
    if got is None:
        print(f"skipped: {CIFAR_NPZ} not found (this benchmark needs real CIFAR-10 images)")
        return
    x, y = got
    mean, std = channel_stats(x)
    pre = Preprocess(mean, std)
    n = args.n_train
    train, val = ArraySet(x[:n], y[:n], np.arange(n)), ArraySet(x[n:], y[n:], np.arange(len(y) - n))
    torch.manual_seed(0)
    model = build_model(args.model, 10, in_channels=3, image_size=32).eval()
    print(f"{args.model}, CIFAR-10 JPEG file, {n} train / {len(val)} val, fp32 CPU, {torch.get_num_threads()} threads")
    for score in args.scores:
        cfg = InfluenceConfig(score=score, curvature_samples=512, max_iter=10, tol=1e-6, batch_size=args.batch_size)
        runs, passes, passes_cl = [], [], []
        for _ in range(args.repeat):  # each repeat: the inference passes, then every path, back to back
            xt = to_tensor(train.x, mean, std)
            passes.append(inference_pass(model, xt, args.batch_size))
            passes_cl.append(inference_pass(model, xt.contiguous(memory_format=torch.channels_last), args.batch_size))
            del xt
            runs.append(run_paths(model, train, val, cfg, pre, mean, std, args.actors, args.cpu_accounting, args.warm))
        rows = [(r[0][0], *np.median([[*run[i][1:]] for run in runs], axis=0)) for i, r in enumerate(zip(*runs))]
        t_inf, t_cl = float(np.median(passes)), float(np.median(passes_cl))
        print(f"\nplain inference over the training set: {t_inf:.1f} s NCHW, {t_cl:.1f} s channels-last"
              + (f" (medians of {args.repeat})" if args.repeat > 1 else ""))
        if args.repeat > 1:
            print(f"score={score}: overhead per repeat " + ", ".join(f"{run[1][1] / run[0][1] - 1:.1%}" for run in runs))
        print(f"score={score}")
        print(f"{'path':<16}{'total s':>9}{'g_val s':>9}{'solve s':>9}{'scores s':>10}{'overhead':>10}{'scores/infer':>14}"
              f"{'/infer CL':>11}{'rel.err':>10}")
        over = [float(np.median([run[i][1] / run[0][1] - 1 for run in runs])) for i in range(len(rows))]
        for (name, tot, g, sv, sc, err), ov in zip(rows, over):
            print(f"{name:<16}{tot:>9.1f}{g:>9.1f}{sv:>9.1f}{sc:>10.1f}{ov:>9.1%}{sc / t_inf:>13.2f}x"
                  f"{sc / t_cl:>10.2f}x{err:>10.1e}",
                  flush=True)


def inference_pass(model: torch.nn.Module, xt: torch.Tensor, batch_size: int) -> float:
    """Seconds of one plain inference pass over ``xt``: the yardstick of the scoring stage."""
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(xt), batch_size):
            model(xt[i:i + batch_size])
    return time.perf_counter() - t


def run_paths(model: torch.nn.Module, train: ArraySet, val: ArraySet, cfg: InfluenceConfig, pre: Preprocess,
              mean: tuple, std: tuple, actor_counts: list[int], accounting: bool = False,
              warm: bool = False) -> list[tuple]:
    """(path, total, g_val, solve, scores, rel. error against in-process) for in-process and each Ray path.

    ``warm``: run a small untimed pipeline in the fresh Ray session before the timed one.
    """
    import ray

    c = time.process_time()
    t = time.perf_counter()  # the in-process path normalises its uint8 images too, as the actors do
    xt, xv = to_tensor(train.x, mean, std), to_tensor(val.x, mean, std)
    ref = compute_influence(model, TensorDataset(xt, torch.from_numpy(train.y)),
                            TensorDataset(xv, torch.from_numpy(val.y)), cfg, device="cpu")
    t_in = time.perf_counter() - t
    if accounting:
        print(f"  cpu-s, in-process ({t_in:.1f} s): this process {time.process_time() - c:.1f}", flush=True)
    del xt, xv
    tm = ref.timings
    rows = [("in-process", t_in, tm.get("validation_gradient", 0.0), tm.get("solve", tm.get("curvature", 0.0)),
             tm["scores"], 0.0)]
    for actors in actor_counts:
        t = time.perf_counter()
        ensure_ray(num_cpus=2)  # the embedded local Ray as `idtl-ray score` starts it
        print(f"  ray start: {time.perf_counter() - t:.1f} s (not in the totals)", flush=True)
        if warm:
            m = min(2048, len(train.y))
            run_pipeline(model, ArraySet(train.x[:m], train.y[:m], train.ids[:m]), val, cfg, preprocess=pre,
                         actors=actors, progress=False)
        with CpuAccount(process_kind) if accounting else contextlib.nullcontext() as acc:
            t = time.perf_counter()
            r = run_pipeline(model, train, val, cfg, preprocess=pre, actors=actors, progress=False)
            total = time.perf_counter() - t
        if acc is not None:
            print(f"  cpu-s, Ray with {actors} actors ({total:.1f} s): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in acc.seconds.items()), flush=True)
        ray.shutdown()  # warm or not: the next repeat's baselines run without a live Ray beside them
        err = float(np.linalg.norm(r.scores - ref.scores) / np.linalg.norm(ref.scores))
        rows.append((f"ray{' warm' if warm else ''}, {actors} actor{'s' if actors > 1 else ''}", total, r.timings["validation_gradient_s"],
                     r.timings["solve_s"], r.timings["scores_s"], err))
    return rows


def process_kind(cmdline: str) -> str:
    """The group a process's CPU time is counted in (``--cpu-accounting``), by its command line."""
    if "ray::MapWorker" in cmdline:
        return "scoring actors"
    if "ray::IDLE" in cmdline or "ray::idtl-prescore" in cmdline:
        return "task workers (pre-scoring, writers)"
    if "ray::" in cmdline:  # Ray Data's _StatsActor, ActorLocationTracker, _AutoscalingCoordinatorActor
        return "Ray Data's helper actors"
    if "dashboard" in cmdline or "process_api" in cmdline:
        return "dashboard"
    if "/ray/" in cmdline or "raylet" in cmdline or "gcs_server" in cmdline:
        return "Ray's daemons (raylet, GCS, agents)"
    return "other processes on the machine"


if __name__ == "__main__":
    main()
