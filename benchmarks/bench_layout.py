"""Channels-last against NCHW image batches: inference, the paper's JVP scores, self-influence.

``idtl_ray.layout`` hands the model channels-last image batches, convolution weights and JVP tangents.
This benchmark shows what that buys and that the scores stay the same. This machine's speed drifts
by up to 2x from one minute to the next, so the arms are interleaved batch by batch (every arm runs
on batch i before any runs on batch i+1) and the totals are compared as ratios. A whole-run A/B would
mostly measure the drift.

Arms, per model and thread count, on real CIFAR-10 images (a seeded draw from ../shared/data):
  inference      plain ``model(x)`` under inference_mode (the yardstick of bench_ray)
  paper (JVP)    ``InfluenceEngine.score_batch`` along a fixed direction s
  self           ``self_influence_batch`` with head factors fitted on 512 images
  train step     forward, backward and an SGD step in train mode (fine-tuning's inner loop; the
                 channels-last arm also has its weights in that layout, ``model.to(memory_format=...)``)
each with ``idtl_ray.layout.CHANNELS_LAST`` off (NCHW) and on. The two layouts' scores are compared
with each other, and the JVP scores of each with a float64 NCHW computation.

    python benchmarks/bench_layout.py [--models sample-cnn resnet18] [--threads 1 2] [--batches 12]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import CIFAR_NPZ, load_cifar_jpeg  # noqa: E402

from idtl_ray import layout  # noqa: E402
from idtl_ray.data import channel_stats, to_tensor  # noqa: E402
from idtl_ray.influence import InfluenceEngine  # noqa: E402
from idtl_ray.models import build_model  # noqa: E402
from idtl_ray.self_influence import fit_head_factors, self_influence_batch  # noqa: E402


def arms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, n_train: int) -> dict[str, Callable[[slice, bool], np.ndarray]]:
    """name -> fn(rows, channels_last) returning that arm's output for the rows (scores, or nothing)."""
    engines = {}
    for cl in (False, True):  # the engine lays its weights out when built, so one engine per layout
        layout.CHANNELS_LAST = cl
        engines[cl] = InfluenceEngine(model, device="cpu")
    s = torch.randn(engines[False].space.dim, generator=torch.Generator().manual_seed(0))
    s *= 1e-2 / float(s.norm()) * s.numel() ** 0.5
    layout.CHANNELS_LAST = False
    factors = fit_head_factors(model, [(x[:256], y[:256]), (x[256:512], y[256:512])])

    def inference(rows: slice, cl: bool) -> np.ndarray:
        with torch.inference_mode():
            model(x[rows].contiguous(memory_format=torch.channels_last) if cl else x[rows])
        return np.zeros(0)

    def paper(rows: slice, cl: bool) -> np.ndarray:
        return engines[cl].score_batch(x[rows], y[rows], s, n_train).numpy()

    def self_(rows: slice, cl: bool) -> np.ndarray:
        return self_influence_batch(model, factors, x[rows], y[rows], n_train)

    nets = {cl: copy.deepcopy(model).train() for cl in (False, True)}
    nets[True] = nets[True].to(memory_format=torch.channels_last)
    opts = {cl: torch.optim.SGD(nets[cl].parameters(), lr=1e-3, momentum=0.9) for cl in (False, True)}

    def train_step(rows: slice, cl: bool) -> np.ndarray:
        opts[cl].zero_grad()
        loss = torch.nn.functional.cross_entropy(nets[cl](layout.model_layout(x[rows], cl)), y[rows])
        loss.backward()
        opts[cl].step()
        return np.array([float(loss.detach())])

    return {"inference": inference, "paper (JVP)": paper, "self": self_, "train step": train_step}


def run(model_name: str, threads: int, x: torch.Tensor, y: torch.Tensor, batch: int, passes: int) -> list[dict]:
    """Interleaved timings of every arm in both layouts; one row per arm."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(model_name, 10, in_channels=3, image_size=32).eval()
    fns = arms(model, x, y, len(y))
    secs = {(a, cl): 0.0 for a in fns for cl in (False, True)}
    outs: dict[tuple[str, bool], list[np.ndarray]] = {k: [] for k in secs}
    for p in range(passes + 1):  # pass 0 warms up (oneDNN primitives, allocator) and is not timed
        for i in range(0, len(y), batch):
            rows = slice(i, i + batch)
            for (a, cl) in secs:
                layout.CHANNELS_LAST = cl
                t = time.perf_counter()
                out = fns[a](rows, cl)
                if p:
                    secs[(a, cl)] += time.perf_counter() - t
                elif a != "inference":
                    outs[(a, cl)].append(out)
    layout.CHANNELS_LAST = True
    rows_out = []
    for a in fns:
        nchw, cl = secs[(a, False)], secs[(a, True)]
        diff = float("nan")
        if a != "inference":
            u, v = np.concatenate(outs[(a, False)]), np.concatenate(outs[(a, True)])
            diff = float(np.abs(u - v).max() / np.abs(u).max())
        rows_out.append(dict(model=model_name, threads=threads, arm=a, nchw_s=nchw, cl_s=cl, speedup=nchw / cl,
                             nchw_vs_inference=nchw / secs[("inference", False)],
                             cl_vs_inference=cl / secs[("inference", True)],
                             cl_vs_nchw_inference=cl / secs[("inference", False)], max_rel_diff=diff))
    return rows_out


def accuracy(model_name: str, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Relative l2 error of the float32 JVP scores in each layout against a float64 NCHW computation."""
    torch.manual_seed(0)
    model = build_model(model_name, 10, in_channels=3, image_size=32).eval()
    out = {}
    for name, cl, dtype in (("float64", False, torch.float64), ("NCHW", False, torch.float32), ("channels-last", True, torch.float32)):
        layout.CHANNELS_LAST = cl
        engine = InfluenceEngine(copy.deepcopy(model).to(dtype), device="cpu")
        s = torch.randn(engine.space.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        s *= 1e-2 / float(s.norm()) * s.numel() ** 0.5
        out[name] = np.concatenate([engine.score_batch(x[i:i + 256].to(dtype), y[i:i + 256], s.to(dtype), len(y)).numpy()
                                    for i in range(0, len(y), 256)])
    layout.CHANNELS_LAST = True
    ref = out.pop("float64")
    return {k: float(np.linalg.norm(v - ref) / np.linalg.norm(ref)) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["sample-cnn", "resnet18"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, default=12, help="batches of --batch-size images per timed pass")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--passes", type=int, default=2, help="timed passes over the batches (after one warm-up pass)")
    args = ap.parse_args()
    got = load_cifar_jpeg(args.batches * args.batch_size)
    if got is None:
        print(f"skipped: {CIFAR_NPZ} not found (this benchmark needs real CIFAR-10 images)")
        return
    xu, yn = got
    mean, std = channel_stats(xu)
    x, y = to_tensor(xu, mean, std), torch.from_numpy(yn)
    print(f"{len(y)} CIFAR-10 images, batches of {args.batch_size}, {args.passes} timed passes, arms interleaved per batch")
    print(f"{'model':<11}{'thr':>4} {'arm':<12}{'NCHW s':>8}{'CL s':>8}{'speed-up':>9}{'NCHW/inf':>10}{'CL/inf CL':>10}"
          f"{'CL/inf NCHW':>12}{'max rel diff':>13}")
    for name in args.models:
        for threads in args.threads:
            for r in run(name, threads, x, y, args.batch_size, args.passes):
                print(f"{r['model']:<11}{r['threads']:>4} {r['arm']:<12}{r['nchw_s']:>8.2f}{r['cl_s']:>8.2f}{r['speedup']:>8.2f}x"
                      f"{r['nchw_vs_inference']:>9.2f}x{r['cl_vs_inference']:>9.2f}x{r['cl_vs_nchw_inference']:>11.2f}x"
                      f"{r['max_rel_diff']:>13.1e}", flush=True)
    n = min(512, len(y))
    print(f"\nJVP scores of {n} images against a float64 NCHW computation (relative l2 error):")
    for name in args.models:
        print(f"  {name}: " + ", ".join(f"{k} {v:.1e}" for k, v in accuracy(name, x[:n], y[:n]).items()), flush=True)


if __name__ == "__main__":
    main()
