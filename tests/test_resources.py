"""Declared resources and shared storage (issue 12 items 1-2), without a cluster: the decisions the
commands take from ``--gpus``/``--cpus``, ``IDTL_SHARED_STORAGE`` and what the cluster reports."""

from __future__ import annotations

import pytest

import idtl_ray.resources as R
from idtl_ray.config import ScoreConfig
from idtl_ray.errors import InputError
from idtl_ray.scoring.pipeline import Pool, pool_bundles, scoring_pool


def test_declared_gpus_size_the_pool_one_actor_per_gpu_whatever_the_cluster_has_now():
    assert scoring_pool(None, gpus=2) == Pool(2, 0.5, True, 2)
    assert scoring_pool(1, gpus=2) == Pool(1, 0.5, True, 2)
    assert pool_bundles(scoring_pool(None, gpus=2)) == [{"CPU": 0.5, "GPU": 1.0}] * 2


def test_declared_cpus_leave_room_for_the_read_tasks():
    pool = scoring_pool(None, cpus=2)
    assert pool.actors == 2 and not pool.gpu and pool.threads == 1
    assert pool.actors * pool.cpus <= 2 - 0.25  # a read task (0.25 CPU) always fits beside the pool
    big = scoring_pool(None, cpus=16)
    assert big.actors == 8 and big.threads == 2


def test_a_cluster_scaled_to_zero_needs_declared_resources(monkeypatch):
    import ray

    monkeypatch.setattr(R, "joined_cluster", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"memory": 1e9})
    with pytest.raises(InputError, match="--gpus N"):
        scoring_pool(None)
    assert scoring_pool(None, gpus=1).gpu  # declared: nothing is sniffed


def test_score_config_refuses_more_actors_than_gpus():
    with pytest.raises(InputError, match="one actor per GPU"):
        ScoreConfig(gpus=1, actors=2)
    with pytest.raises(InputError, match="--gpus must be >= 0"):
        ScoreConfig(gpus=-1)


def test_paths_off_shared_storage_are_refused_in_one_line_on_a_multi_node_cluster(monkeypatch, tmp_path):
    monkeypatch.setattr(R, "work_runs_elsewhere", lambda: True)
    shared = tmp_path / "shared"
    monkeypatch.setenv(R.SHARED_ENV, str(shared))
    R.check_shared_storage({"--out": shared / "runs" / "a", "--dataset": "s3://bucket/cifar", "--data-dir": None})
    with pytest.raises(InputError) as e:
        R.check_shared_storage({"--out": tmp_path / "local"})
    msg = str(e.value)
    assert "--out" in msg and "not on shared storage" in msg and str(shared) in msg and "\n" not in msg
    with pytest.raises(InputError, match="file:///x"):
        R.check_shared_storage({"--dataset": "file:///x"})
    monkeypatch.delenv(R.SHARED_ENV)
    with pytest.raises(InputError, match="IDTL_SHARED_STORAGE=/mnt/cluster_storage"):
        R.check_shared_storage({"--out": shared})


def test_no_check_and_no_request_off_a_cluster(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not R.joined_cluster() and not R.work_runs_elsewhere()
    R.check_shared_storage({"--out": tmp_path})  # the embedded local Ray: every worker is on this node
    R.request([{"GPU": 1}])  # no autoscaler to ask: a no-op
