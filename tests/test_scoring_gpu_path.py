"""The GPU-cluster shape of the scoring pipeline (issues 3, 11), on logical GPUs: Ray is told it has a GPU
(torch, finding no CUDA, runs on the CPU). The pre-scoring task holds that GPU and computes g_val and
the solve, or the head factors (the driver does not); a GPU actor scores; the scores must equal the
in-process engine's."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from idtl_ray import score_samples
from idtl_ray.data import apply_split, load_dataset, make_split, to_tensor
from idtl_ray.influence import InfluenceConfig
from idtl_ray.models import build_model
from idtl_ray.workflow import score


@pytest.fixture(scope="module")
def ray_with_a_logical_gpu():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=1, object_store_memory=300 * 1024**2, log_to_driver=False,
             include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def _on_a_gpu_worker(monkeypatch, module=None, name: str = "prescore") -> None:
    """Replace ``module.name`` (default: the pre-scoring function) by a wrapper that fails unless it
    runs on a GPU worker; the wrapper is shipped to the worker by value."""
    import idtl_ray.scoring.prescore as P

    module = module or P
    real, driver = getattr(module, name), os.getpid()

    def where(*args, **kwargs):
        import ray

        if os.getpid() == driver or not ray.get_gpu_ids():
            raise AssertionError(f"on a GPU cluster {name} runs on a GPU worker, not on the driver")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, where)


def _digits_in_float64() -> tuple[TensorDataset, TensorDataset, torch.nn.Module]:
    """600 digits training and the validation samples, and a seeded sample-cnn, all float64."""
    d = load_dataset("digits")
    tr, va, _ = apply_split(d, make_split(d, 0.1, 0))
    train = TensorDataset(to_tensor(tr.x[:600], d.mean, d.std).double(), torch.from_numpy(tr.y[:600]))
    val = TensorDataset(to_tensor(va.x, d.mean, d.std).double(), torch.from_numpy(va.y))
    torch.manual_seed(0)
    model = build_model("sample-cnn", 10, in_channels=1, image_size=8).double()
    return train, val, model


def test_gpu_cluster_solves_on_a_gpu_worker_and_matches_in_process(ray_with_a_logical_gpu, tmp_path, monkeypatch):
    train, val, model = _digits_in_float64()
    cfg = InfluenceConfig(score="paper", curvature_samples=128, max_iter=8, tol=1e-3, batch_size=64)
    inproc = score_samples(model, train, val, score="paper", solver=cfg.solver, damping=cfg.damping, batch_size=cfg.batch_size,
                           curvature_samples=cfg.curvature_samples, max_iter=cfg.max_iter, tol=cfg.tol, device="cpu").scores
    _on_a_gpu_worker(monkeypatch)
    import idtl_ray.scoring.pipeline as pipeline

    real_score_todo, started = pipeline._score_todo, []

    def score_todo(*args, **kwargs):  # the GPU actors start only once pre-scoring has finished (and its GPU is free)
        parts = args[8]
        started.append((parts.load_prescored() is not None, args[-1] is None))
        return real_score_todo(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_score_todo", score_todo)
    out = score(model, train, val, config=cfg, out=tmp_path / "run", shard_size=200)
    assert started == [(True, True)]  # GPU actors waiting on the task could hold every GPU it needs: a hang
    err = float(np.linalg.norm(out.scores - inproc) / np.linalg.norm(inproc))
    assert err < 1e-9, err  # float64 model: s crosses the wire in float64
    assert (tmp_path / "run" / "mask.parquet").exists()


def test_gpu_cluster_fits_the_self_influence_factors_off_the_driver(ray_with_a_logical_gpu, tmp_path, monkeypatch):
    train, val, model = _digits_in_float64()
    cfg = InfluenceConfig(curvature_samples=128, batch_size=64)
    inproc = score_samples(model, train, curvature_samples=128, batch_size=64, device="cpu").scores
    _on_a_gpu_worker(monkeypatch)
    out = score(model, train, val, config=cfg, out=tmp_path / "self", shard_size=200, drop_budget=0.1)
    assert float(np.linalg.norm(out.scores - inproc) / np.linalg.norm(inproc)) < 1e-9
    assert int((~out.keep).sum()) == 60


def test_gpu_cluster_fits_the_new_head_on_a_gpu_worker(ray_with_a_logical_gpu, tmp_path, monkeypatch):
    import idtl_ray.head as H
    from idtl_ray.config import ScoreConfig
    from idtl_ray.workflow import run_score

    _on_a_gpu_worker(monkeypatch, H, "fit_head_task")
    cfg = ScoreConfig(dataset="digits", model="sample-cnn", out=str(tmp_path / "gpu"), head="new", drop="budget",
                      drop_budget=0.1, influence=InfluenceConfig(curvature_samples=128, batch_size=64))
    summary = run_score(cfg, progress=False)
    assert summary["head"]["new_head"] and summary["device"] == "cuda"
