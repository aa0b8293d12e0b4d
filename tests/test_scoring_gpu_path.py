"""The GPU-cluster shape of the scoring pipeline (issue 3), on logical GPUs: Ray is told it has a GPU
(torch, finding no CUDA, runs on the CPU). One actor holds that GPU, computes g_val, runs the solve
(the driver does not) and scores; the scores must equal the in-process engine's."""

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
    ray.init(num_cpus=2, num_gpus=1, object_store_memory=300 * 1024**2, log_to_driver=False,
             include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def test_gpu_cluster_solves_on_an_actor_and_matches_in_process(ray_with_a_logical_gpu, tmp_path, monkeypatch):
    import idtl_ray.scoring as S

    d = load_dataset("digits")
    tr, va, _ = apply_split(d, make_split(d, 0.1, 0))
    tr_x, tr_y = tr.x[:600], tr.y[:600]
    train = TensorDataset(to_tensor(tr_x, d.mean, d.std).double(), torch.from_numpy(tr_y))
    val = TensorDataset(to_tensor(va.x, d.mean, d.std).double(), torch.from_numpy(va.y))
    torch.manual_seed(0)
    model = build_model("sample-cnn", 10, in_channels=1, image_size=8).double()
    cfg = InfluenceConfig(score="paper", curvature_samples=128, max_iter=8, tol=1e-3, batch_size=64)

    def no_driver_solve(*args, **kwargs):
        raise AssertionError("on a GPU cluster the driver must not solve")

    inproc = score_samples(model, train, val, score="paper", solver=cfg.solver, damping=cfg.damping, batch_size=cfg.batch_size,
                           curvature_samples=cfg.curvature_samples, max_iter=cfg.max_iter, tol=cfg.tol, device="cpu").scores
    # The actor runs the solve in its own process (unpatched); only the driver's copies are replaced.
    monkeypatch.setattr(S, "_solve_task", no_driver_solve)
    monkeypatch.setattr(S, "solve", no_driver_solve)
    out = score(model, train, val, config=cfg, out=tmp_path / "run", shard_size=200)
    err = float(np.linalg.norm(out.scores - inproc) / np.linalg.norm(inproc))
    assert err < 1e-9, err
    assert (tmp_path / "run" / "mask.parquet").exists()


def test_gpu_cluster_fits_the_self_influence_factors_off_the_driver(ray_with_a_logical_gpu, tmp_path, monkeypatch):
    import idtl_ray.scoring as S

    d = load_dataset("digits")
    tr, va, _ = apply_split(d, make_split(d, 0.1, 0))
    train = TensorDataset(to_tensor(tr.x[:600], d.mean, d.std).double(), torch.from_numpy(tr.y[:600]))
    val = TensorDataset(to_tensor(va.x, d.mean, d.std).double(), torch.from_numpy(va.y))
    torch.manual_seed(0)
    model = build_model("sample-cnn", 10, in_channels=1, image_size=8).double()
    cfg = InfluenceConfig(curvature_samples=128, batch_size=64)
    inproc = score_samples(model, train, curvature_samples=128, batch_size=64, device="cpu").scores
    real, driver = S.head_factors, os.getpid()

    def off_the_driver(*args, **kwargs):  # shipped by value to the GPU worker, where it runs the real one
        if os.getpid() == driver:
            raise AssertionError("on a GPU cluster the driver must not fit the factors")
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "head_factors", off_the_driver)
    out = score(model, train, val, config=cfg, out=tmp_path / "self", shard_size=200, drop_budget=0.1)
    assert float(np.linalg.norm(out.scores - inproc) / np.linalg.norm(inproc)) < 1e-9
    assert int((~out.keep).sum()) == 60
