"""Cost of scoring against plain inference, in one run on one machine (issue 2, item 4).

For each model, on one batch of real CIFAR-10 images (../shared/data/cifar10_jpegbytes.npz; random
images if the file is missing), prints images/s of
  - plain inference (eval mode, no grad),
  - JVP scoring (idtl-ray's path: one forward-mode pass gives every sample's score),
  - per-sample gradients with vmap(grad) + dot (what most influence libraries do),
and their ratios. Then times a whole ``score_samples`` call (g_val, solve, scores) at the default
settings on N training samples against one inference pass over the same samples.

    python benchmarks/bench_scoring.py [--models sample-cnn resnet18 resnet50] [--n 5000 20000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import best_time, load_cifar_jpeg  # noqa: E402

from idtl_ray.influence import InfluenceConfig, InfluenceEngine, compute_influence  # noqa: E402
from idtl_ray.models import build_model  # noqa: E402

MEAN, STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)


def images(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    got = load_cifar_jpeg(n)
    if got is None:
        print("note: ../shared/data/cifar10_jpegbytes.npz not found; using random images", file=sys.stderr)
        g = torch.Generator().manual_seed(0)
        return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), "random"
    x, y = got
    xt = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    return xt.contiguous(), torch.from_numpy(y), "cifar10"


def per_model(name: str, batch: int, grad_batch: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=3, image_size=32).eval()
    x, y, _ = images(batch)
    engine = InfluenceEngine(model, device="cpu")
    s = torch.randn(engine.space.dim) * 1e-3

    def infer():
        with torch.inference_mode():
            model(x)

    t_inf = best_time(infer)
    t_jvp = best_time(lambda: engine.score_batch(x, y, s, n_train=batch, method="jvp"))
    xs, ys = x[:grad_batch], y[:grad_batch]
    t_grad = best_time(lambda: engine.score_batch(xs, ys, s, n_train=batch, method="grad"), repeats=1)
    r = {
        "inference_img_s": batch / t_inf,
        "jvp_img_s": batch / t_jvp,
        "grad_img_s": grad_batch / t_grad,
    }
    r["jvp_cost_x_inference"] = r["inference_img_s"] / r["jvp_img_s"]
    r["jvp_speedup_over_grad"] = r["jvp_img_s"] / r["grad_img_s"]
    return r


def whole_call(name: str, n: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=3, image_size=32).eval()
    x, y, _ = images(n + n // 10)
    train, val = TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])
    bs = 256

    def infer_all():
        with torch.inference_mode():
            for i in range(0, n, bs):
                model(x[i:i + bs])

    t_inf = best_time(infer_all, repeats=2)
    out = {"n_train": n, "n_val": len(val), "inference_s": t_inf}
    for score in ("self", "paper"):  # the default (self-influence) and the paper's score at its defaults
        t0 = time.perf_counter()
        r = compute_influence(model, train, val, InfluenceConfig(score=score), device="cpu")  # = score_samples
        t_call = time.perf_counter() - t0
        assert np.isfinite(r.scores).all()
        out[score] = {"score_samples_s": t_call, "ratio": t_call / t_inf, "stages": r.timings, "solve": r.solve}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["sample-cnn", "resnet18", "resnet50"])
    ap.add_argument("--batch", type=int, default=128, help="images per timed batch")
    ap.add_argument("--grad-batch", type=int, default=16, help="images for the (slow) per-sample-gradient path")
    ap.add_argument("--n", type=int, nargs="+", default=[5000, 20000], help="training-set sizes for the whole-call timing")
    ap.add_argument("--whole-model", default="sample-cnn")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    _, _, source = images(8)
    print(f"data: {source}; torch {torch.__version__}; threads {torch.get_num_threads()}; fp32 CPU")
    print(f"{'model':<12}{'infer img/s':>12}{'JVP img/s':>11}{'grad img/s':>12}{'JVP/infer cost':>16}{'JVP vs grad':>13}")
    for name in args.models:
        r = per_model(name, args.batch, args.grad_batch)
        print(f"{name:<12}{r['inference_img_s']:>12.1f}{r['jvp_img_s']:>11.1f}{r['grad_img_s']:>12.1f}"
              f"{r['jvp_cost_x_inference']:>15.2f}x{r['jvp_speedup_over_grad']:>12.1f}x", flush=True)
    print()
    for n in args.n:
        w = whole_call(args.whole_model, n)
        for score in ("self", "paper"):
            r = w[score]
            print(f"whole score_samples call (score={score}), {args.whole_model}, {w['n_train']} train / {w['n_val']} val, "
                  f"default settings: {r['score_samples_s']:.1f} s vs one inference pass {w['inference_s']:.2f} s = "
                  f"{r['ratio']:.2f}x", flush=True)
            print("  stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["stages"].items())
                  + f" ({r['solve'].solver}, {r['solve'].iterations} iterations, residual {r['solve'].relative_residual:.1e})")


if __name__ == "__main__":
    main()
