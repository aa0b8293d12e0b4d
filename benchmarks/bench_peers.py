"""idtl-ray against Kronfluence on the same small CIFAR CNN, the same torch, data and damping (issue 10, item 10).

Both compute the paper's validation-influence score: for every training sample z_i

    score_i = ∇θ L(z_i) · (H + λI)^-1 g_val,    g_val = Σ_j ∇θ L(v_j) over the validation set,

over all parameters of ``sample-cnn`` (4 conv + 2 linear layers, no BatchNorm, so Kronfluence tracks every
parameter too), with H the Gauss-Newton / Fisher curvature of the mean training loss and the same absolute λ.

- **idtl-ray** (``score="paper"``, default solver settings): CG on the GGN of a 512-sample curvature
  subsample, max_iter 30, tol 1e-2; scores by one JVP pass. Its scores carry a 1/n factor, which does not
  change ranks.
- **Kronfluence** 1.0.1, EK-FAC (its default strategy; covariance and Lambda fitted on all training
  samples, labels sampled from the model: the true Fisher, which for softmax cross-entropy is the GGN),
  ``compute_pairwise_scores`` of the validation against the training samples, summed over the validation
  samples. Kronfluence's ``damping_factor`` is absolute (added to the EK-FAC eigenvalues, which are averaged
  over samples, i.e. eigenvalues of the curvature of the mean loss), so ``damping_factor=λ`` is the same λ
  as idtl-ray's. Also timed: the same factors with ``aggregate_query_gradients=True`` (Kronfluence sums the
  validation gradients before preconditioning: the cheapest way it offers to get this quantity).
- **Reference**: idtl-ray's CG on the GGN of *all* training samples to tol 1e-6 (max 500 iterations); the
  dense solve is out of reach (~0.6 M parameters). Its relative residual is reported.
- **idtl-ray's default** ``compute_influence(model, train, None, InfluenceConfig())``: self-influence on the
  head, no validation set. A different quantity (ranks likely-mislabelled samples); timed only.

Sign: both scores are ∇L(z_i)·(H+λI)^-1 g_val without a minus, so for both positive = helpful (removing the
sample is predicted to raise the validation loss; Kronfluence's convention), and ρ is reported signed.

Timing: CPU time = user + sys of ``getrusage`` (this process, all its threads, plus children) around each
call, and wall time; torch runs with ``--threads`` (2) intra-op threads; idtl-ray is first run once on a
small subset and Kronfluence on an 8x8 sample-cnn (imports, lazy initialisation); then one timed run each
(they take minutes; the reference solve, ~90 CG iterations on all samples, takes the longest: ~1,000
CPU-s at the defaults). The JSON is written once before the reference and again after it.

Kronfluence is NOT a dependency of idtl-ray. Install it beside the project venv, without dependency
resolution, so that both sides import the project venv's own torch:

    .venv/bin/pip install --no-deps --target /tmp/idtl-peers-site -r benchmarks/peers-requirements.txt
    .venv/bin/python benchmarks/bench_peers.py [--n-train 2000] [--n-val 200] [--damping 0.1] [--seed 0]

The folder (``--peers-site`` or ``IDTL_PEERS_SITE``; default /tmp/idtl-peers-site) is appended to
``sys.path`` after the venv's site-packages, so it cannot shadow a project package. Writes
``results/bench_peers.json`` (atomically) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_cifar_jpeg  # noqa: E402

from idtl_ray.data import channel_stats, to_tensor  # noqa: E402
from idtl_ray.influence import InfluenceConfig, compute_influence  # noqa: E402
from idtl_ray.models import build_model  # noqa: E402

DEFAULT_PEERS_SITE = os.environ.get("IDTL_PEERS_SITE", "/tmp/idtl-peers-site")
INSTALL_LINE = ".venv/bin/pip install --no-deps --target /tmp/idtl-peers-site -r benchmarks/peers-requirements.txt"


# ── measurement ────────────────────────────────────────────────────────────────────────────────────


def _cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def measure(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, CPU seconds, wall seconds) of one call."""
    c0, w0 = _cpu_seconds(), time.perf_counter()
    out = fn()
    return out, _cpu_seconds() - c0, time.perf_counter() - w0


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def bottom_overlap(a: np.ndarray, b: np.ndarray, frac: float = 0.1) -> float:
    """Share of the ``frac`` lowest-scored (most harmful: what the paper drops) samples that both agree on."""
    k = max(1, int(round(frac * len(a))))
    return len(set(np.argsort(a)[:k]) & set(np.argsort(b)[:k])) / k


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Atomic: a temp file in the same folder, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".json.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=float)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes it 0600
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        raise


# ── data and model ─────────────────────────────────────────────────────────────────────────────────


def make_data(n_train: int, n_val: int, seed: int) -> tuple[TensorDataset, TensorDataset, str]:
    tr = load_cifar_jpeg(n_train, "train", seed=seed)
    va = load_cifar_jpeg(n_val, "test", seed=seed + 1)
    if tr is None or va is None:
        raise SystemExit("../shared/data/cifar10_jpegbytes.npz not found (set IDTL_CIFAR_NPZ): this benchmark needs real images")
    mean, std = channel_stats(tr[0])
    xt, xv = to_tensor(tr[0], mean, std), to_tensor(va[0], mean, std)
    return (TensorDataset(xt, torch.as_tensor(tr[1])), TensorDataset(xv, torch.as_tensor(va[1])),
            f"CIFAR-10 JPEG: {len(tr[1])} train (train split), {len(va[1])} validation (test split)")


def train_model(train: TensorDataset, epochs: int, seed: int) -> tuple[torch.nn.Module, list[float]]:
    """sample-cnn trained briefly with Adam 1e-3, batch 64, seeded; returns the model and each epoch's mean loss."""
    torch.manual_seed(seed)
    model = build_model("sample-cnn", 10, 3, 32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = train.tensors
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(epochs):
        perm, total = torch.randperm(len(y), generator=g), 0.0
        for i in range(0, len(y), 64):
            b = perm[i:i + 64]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
        losses.append(total / len(y))
    model.eval()
    return model, losses


def accuracy(model: torch.nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# ── Kronfluence ────────────────────────────────────────────────────────────────────────────────────


def import_kronfluence(site: str) -> Any:
    if site and site not in sys.path:
        sys.path.append(site)  # after the venv: the project's torch/numpy win
    try:
        import kronfluence
    except ImportError as e:
        raise SystemExit(f"Kronfluence is not importable ({e}); install it beside the venv:\n    {INSTALL_LINE}") from e
    return kronfluence


def make_task() -> Any:
    from kronfluence.task import Task

    class ClassificationTask(Task):
        """Summed cross-entropy; sample=True draws labels from the model (true Fisher = GGN for softmax CE)."""

        def compute_train_loss(self, batch: Any, model: torch.nn.Module, sample: bool = False) -> torch.Tensor:
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: torch.nn.Module) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    return ClassificationTask()


class KronfluenceRun:
    """One Analyzer on a private copy of the model (prepare_model wraps modules in place)."""

    def __init__(self, model: torch.nn.Module, outdir: str, name: str):
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.utils.dataset import DataLoaderKwargs

        task = make_task()
        self.model = prepare_model(copy.deepcopy(model), task)
        self.analyzer = Analyzer(name, self.model, task, cpu=True, disable_tqdm=True, output_dir=outdir)
        self.loader = DataLoaderKwargs(num_workers=0)

    def fit(self, train: TensorDataset, batch_size: int, seed: int) -> None:
        from kronfluence.arguments import FactorArguments

        torch.manual_seed(seed)  # the sampled labels of the true Fisher
        self.analyzer.fit_all_factors("ekfac", train, per_device_batch_size=batch_size, dataloader_kwargs=self.loader,
                                      factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)

    def scores(self, train: TensorDataset, val: TensorDataset, damping: float, query_batch: int, train_batch: int,
               aggregate: bool = False) -> np.ndarray:
        from kronfluence.arguments import ScoreArguments

        name = "agg" if aggregate else "pairwise"
        args = ScoreArguments(damping_factor=damping, aggregate_query_gradients=aggregate)
        self.analyzer.compute_pairwise_scores(name, "ekfac", val, train, per_device_query_batch_size=query_batch,
                                              per_device_train_batch_size=train_batch, dataloader_kwargs=self.loader,
                                              score_args=args, overwrite_output_dir=True)
        s = self.analyzer.load_pairwise_scores(name)["all_modules"]  # (n_val or 1, n_train)
        return s.double().sum(0).numpy()


# ── the benchmark ──────────────────────────────────────────────────────────────────────────────────


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--damping", type=float, default=0.1, help="absolute λ for both methods")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=3, help="Adam 1e-3 epochs before scoring")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--batch-size", type=int, default=256, help="both methods' training batch size")
    ap.add_argument("--ref-tol", type=float, default=1e-6)
    ap.add_argument("--ref-max-iter", type=int, default=500)
    ap.add_argument("--no-reference", action="store_true", help="skip the converged solve (no Spearman)")
    ap.add_argument("--peers-site", default=DEFAULT_PEERS_SITE, help="folder Kronfluence was pip-installed into (--target)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench_peers.json")
    a = ap.parse_args(argv)

    torch.set_num_threads(a.threads)
    kronfluence = import_kronfluence(a.peers_site)
    import kronfluence.analyzer  # noqa: F401  (warm the import chain: accelerate, safetensors, ...)

    train, val, data_note = make_data(a.n_train, a.n_val, a.seed)
    (model, epoch_losses), _, train_wall = measure(lambda: train_model(train, a.epochs, a.seed))
    print(f"{data_note}; sample-cnn trained {a.epochs} epochs in {train_wall:.0f} s: loss {epoch_losses[-1]:.3f}, "
          f"train acc {accuracy(model, train):.3f}, val acc {accuracy(model, val):.3f}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    paper = InfluenceConfig(score="paper", damping=a.damping, batch_size=a.batch_size, seed=a.seed)

    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        # warm-up on a small subset: imports, torch.func / Kronfluence lazy init, allocator
        sub_t = TensorDataset(*(t[:64] for t in train.tensors))
        sub_v = TensorDataset(*(t[:16] for t in val.tensors))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            compute_influence(model, sub_t, sub_v, paper, device="cpu")
        compute_influence(model, sub_t, None, InfluenceConfig(batch_size=a.batch_size), device="cpu")
        # Kronfluence's warm-up on an 8x8 sample-cnn: same code paths, without paying the real model's
        # 4096x4096 eigendecomposition twice
        torch.manual_seed(a.seed)
        tiny = build_model("sample-cnn", 10, 3, 8)
        tiny_t = TensorDataset(torch.randn(64, 3, 8, 8), torch.arange(64) % 10)
        tiny_v = TensorDataset(torch.randn(16, 3, 8, 8), torch.arange(16) % 10)
        w = KronfluenceRun(tiny, tmp, "warmup")
        w.fit(tiny_t, 32, a.seed)
        w.scores(tiny_t, tiny_v, a.damping, 16, 32)
        w.scores(tiny_t, tiny_v, a.damping, 16, 32, aggregate=True)
        print("warm-up done", flush=True)

        # idtl-ray, paper score, default solver settings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            res, cpu, wall = measure(lambda: compute_influence(model, train, val, paper, device="cpu"))
        idtl = res.scores
        rows["idtl-ray paper (default CG)"] = dict(
            cpu_s=cpu, wall_s=wall, scores=idtl, solve=res.solve.as_dict(), stages_wall_s=res.timings,
            warnings=[str(c.message) for c in caught],
            settings=dict(solver="cg", curvature="ggn", curvature_samples=paper.curvature_samples,
                          max_iter=paper.max_iter, tol=paper.tol, damping=a.damping))
        print(f"idtl-ray: {cpu:.1f} CPU-s, {wall:.1f} s wall, solve {res.solve.iterations} it, "
              f"residual {res.solve.relative_residual:.2e}", flush=True)

        # idtl-ray's package default: self-influence on the head (a different quantity)
        res_self, cpu, wall = measure(lambda: compute_influence(model, train, None, InfluenceConfig(batch_size=a.batch_size),
                                                                device="cpu"))
        rows["idtl-ray default (self-influence, head)"] = dict(
            cpu_s=cpu, wall_s=wall, scores=res_self.scores, stages_wall_s=res_self.timings,
            settings=dict(score="self", head_damping=InfluenceConfig().head_damping, curvature_samples=512))
        print(f"idtl-ray self-influence: {cpu:.1f} CPU-s, {wall:.1f} s wall", flush=True)

        # Kronfluence EK-FAC
        kr = KronfluenceRun(model, tmp, "bench_peers")
        _, f_cpu, f_wall = measure(lambda: kr.fit(train, a.batch_size, a.seed))
        print(f"Kronfluence factors: {f_cpu:.1f} CPU-s, {f_wall:.1f} s wall", flush=True)
        kron, s_cpu, s_wall = measure(lambda: kr.scores(train, val, a.damping, len(val), a.batch_size))
        print(f"Kronfluence pairwise scores: {s_cpu:.1f} CPU-s, {s_wall:.1f} s wall", flush=True)
        kset = dict(strategy="ekfac", damping_factor=a.damping, covariance_and_lambda_samples=len(train),
                    fisher="true (sampled labels)", query_batch=len(val), train_batch=a.batch_size,
                    kronfluence_version=kronfluence.__version__)
        rows["Kronfluence EK-FAC, pairwise then summed"] = dict(
            cpu_s=f_cpu + s_cpu, wall_s=f_wall + s_wall, factors_cpu_s=f_cpu, factors_wall_s=f_wall,
            scores_cpu_s=s_cpu, scores_wall_s=s_wall, scores=kron, settings=kset)
        kagg, g_cpu, g_wall = measure(lambda: kr.scores(train, val, a.damping, len(val), a.batch_size, aggregate=True))
        print(f"Kronfluence aggregated-query scores: {g_cpu:.1f} CPU-s, {g_wall:.1f} s wall", flush=True)
        rows["Kronfluence EK-FAC, aggregate_query_gradients"] = dict(
            cpu_s=f_cpu + g_cpu, wall_s=f_wall + g_wall, factors_cpu_s=f_cpu, factors_wall_s=f_wall,
            scores_cpu_s=g_cpu, scores_wall_s=g_wall, scores=kagg, settings={**kset, "aggregate_query_gradients": True})

    base = rows["idtl-ray paper (default CG)"]
    for r in rows.values():
        r["cpu_ratio_vs_idtl"] = r["cpu_s"] / base["cpu_s"]
        r["wall_ratio_vs_idtl"] = r["wall_s"] / base["wall_s"]

    def result(ref_info: dict[str, Any] | None, ref: np.ndarray | None) -> dict[str, Any]:
        k_scores = rows["Kronfluence EK-FAC, pairwise then summed"]["scores"]
        return dict(
            benchmark="bench_peers", date=time.strftime("%Y-%m-%d %H:%M:%S"), data=data_note, model="sample-cnn",
            n_params=n_params, n_train=len(train), n_val=len(val), damping=a.damping, seed=a.seed, epochs=a.epochs,
            train_epoch_losses=epoch_losses, train_acc=accuracy(model, train), val_acc=accuracy(model, val),
            threads=a.threads, torch=torch.__version__, python=platform.python_version(), cpu_count=os.cpu_count(),
            load_average=os.getloadavg(), kronfluence=kronfluence.__version__, install=INSTALL_LINE,
            sign="both scores are grad L(z_i) . (H+λI)^-1 g_val: positive = helpful; ρ is signed",
            spearman_idtl_vs_kronfluence=spearman(rows["idtl-ray paper (default CG)"]["scores"], k_scores),
            reference=ref_info if ref_info is not None else ("skipped" if a.no_reference else "pending"),
            methods={n: {key: v for key, v in r.items() if key != "scores"} for n, r in rows.items()},
            scores={n: np.asarray(r["scores"]).tolist() for n, r in rows.items()}
            | ({"reference": ref.tolist()} if ref is not None else {}),
        )

    # the timed part is kept even if the (long) reference solve is interrupted
    write_json(a.out, result(None, None))

    # converged reference
    ref_info: dict[str, Any] | None = None
    ref = None
    if not a.no_reference:
        rcfg = InfluenceConfig(score="paper", damping=a.damping, curvature_samples=None, tol=a.ref_tol,
                               max_iter=a.ref_max_iter, batch_size=a.batch_size, seed=a.seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            rres, cpu, wall = measure(lambda: compute_influence(model, train, val, rcfg, device="cpu"))
        ref = rres.scores
        ref_info = dict(cpu_s=cpu, wall_s=wall, solve=rres.solve.as_dict(), warnings=[str(c.message) for c in caught],
                        settings=dict(solver="cg", curvature="ggn", curvature_samples=None, tol=a.ref_tol,
                                      max_iter=a.ref_max_iter, damping=a.damping))
        print(f"reference: {rres.solve.iterations} CG iterations, residual {rres.solve.relative_residual:.2e}, "
              f"{cpu:.0f} CPU-s", flush=True)

    for name, r in rows.items():
        if ref is not None and not name.startswith("idtl-ray default"):  # the self-influence is another quantity
            r["spearman_vs_reference"] = spearman(r["scores"], ref)
            r["bottom10_overlap_vs_reference"] = bottom_overlap(r["scores"], ref)

    # Markdown table
    print()
    print(f"sample-cnn ({n_params:,} parameters), {len(train)} train / {len(val)} validation CIFAR-10, λ = {a.damping}, "
          f"{a.threads} torch threads")
    print()
    print("| method | CPU s | wall s | CPU × idtl-ray | Spearman ρ vs reference | bottom-10% overlap |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        rho = f"{r['spearman_vs_reference']:+.3f}" if "spearman_vs_reference" in r else "n/a (other quantity)"
        ov = f"{r['bottom10_overlap_vs_reference']:.2f}" if "bottom10_overlap_vs_reference" in r else "n/a"
        print(f"| {name} | {r['cpu_s']:.1f} | {r['wall_s']:.1f} | {r['cpu_ratio_vs_idtl']:.2f} | {rho} | {ov} |")
    if ref_info is not None:
        s = ref_info["solve"]
        print(f"| reference (CG, all {len(train)} samples, tol {a.ref_tol:g}) | {ref_info['cpu_s']:.1f} | "
              f"{ref_info['wall_s']:.1f} | {ref_info['cpu_s'] / base['cpu_s']:.2f} | 1 | 1 |")
        print(f"\nreference: {s['iterations']} iterations, relative residual {s['relative_residual']:.2e}, "
              f"converged={s['converged']}")
    k = rows["Kronfluence EK-FAC, pairwise then summed"]
    print(f"Kronfluence (pairwise) / idtl-ray: {k['cpu_ratio_vs_idtl']:.2f}x CPU, {k['wall_ratio_vs_idtl']:.2f}x wall")
    print(f"Spearman(idtl-ray, Kronfluence) = {spearman(base['scores'], k['scores']):+.3f}")

    write_json(a.out, result(ref_info, ref))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
