"""Declared resources and shared storage (issue 12 items 1-2), without a cluster: the decisions the
commands take from ``--gpus``/``--cpus``, ``IDTL_SHARED_STORAGE`` and what the cluster reports."""

from __future__ import annotations

import pytest

import idtl_ray.resources as R
from idtl_ray.config import ScoreConfig
from idtl_ray.errors import IdtlError, InputError
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
    monkeypatch.setattr(R, "work_runs_elsewhere", lambda bundles=None: True)
    shared = tmp_path / "shared"
    monkeypatch.setenv(R.SHARED_ENV, str(shared))
    R.check_shared_storage({"--out": shared / "runs" / "a", "--dataset": "s3://bucket/cifar", "--data-dir": None})
    with pytest.raises(InputError) as e:
        R.check_shared_storage({"--out": tmp_path / "local"})
    msg = str(e.value)
    assert "--out" in msg and "not on shared storage" in msg and str(shared) in msg and "\n" not in msg
    with pytest.raises(InputError, match="file:///x"):
        R.check_shared_storage({"--dataset": "file:///x"})
    R.check_shared_storage({"--dataset": f"file://{shared}/cifar"})  # a local path written as a URI, on the mount
    R.check_shared_storage({"--dataset": f"file://localhost{shared}/cifar"})
    with pytest.raises(InputError, match="not on shared storage"):  # another host's file: not this node's mount
        R.check_shared_storage({"--dataset": f"file://otherhost{shared}/cifar"})
    # only --dataset may be a URI: the hint is not given where a URI would be refused next (outputs, the cache)
    for option in ("--out", "IDTL_CACHE_DIR (the cache --dataset NAME is prepared into)", "--data-dir"):
        with pytest.raises(InputError) as e:
            R.check_shared_storage({option: tmp_path / "local"})
        assert "s3://" not in str(e.value)
    with pytest.raises(InputError, match="use s3://... or a path"):
        R.check_shared_storage({"--dataset": tmp_path / "local"})
    monkeypatch.delenv(R.SHARED_ENV)
    with pytest.raises(InputError, match="IDTL_SHARED_STORAGE=/mnt/cluster_storage"):
        R.check_shared_storage({"--out": shared})


def test_a_one_node_cluster_that_must_scale_up_for_the_command_checks_the_paths(monkeypatch) -> None:
    """A cluster of one head with CPUs skipped the shared-storage check; `--gpus 2` then ran on GPU nodes
    that joined later, which could not see a local --out (left open in the ninth session)."""
    import types

    import ray

    monkeypatch.setattr(R, "joined_cluster", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeID": "head", "Resources": {"CPU": 4.0}}])
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(get_node_id=lambda: "head"))
    assert not R.work_runs_elsewhere() and not R.work_runs_elsewhere([{"CPU": 2.0}] * 3)  # each fits: may queue here
    assert R.work_runs_elsewhere([{"CPU": 0.5, "GPU": 1.0}])  # no GPU here: the work goes to a new node
    assert R.work_runs_elsewhere([{"CPU": 8.0}])  # a bundle larger than this node


def test_no_check_and_no_request_off_a_cluster(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not R.joined_cluster() and not R.work_runs_elsewhere()
    R.check_shared_storage({"--out": tmp_path})  # the embedded local Ray: every worker is on this node
    R.request([{"GPU": 1}])  # no autoscaler to ask: a no-op


def test_finetune_gpus_declares_one_gpu_worker_per_gpu_and_the_request():
    from idtl_ray.finetune import FinetuneConfig

    cfg = FinetuneConfig(strategy="scratch", gpus=2, cpus_per_worker=4)
    assert (cfg.workers, cfg.gpus_per_worker) == (2, 1.0)
    assert cfg.bundles() == [{"CPU": 4.0, "GPU": 1.0}] * 2
    assert "gpus" not in cfg.identity()  # declared GPUs do not change what is trained: workers does
    assert FinetuneConfig(strategy="scratch", gpus=0).gpus_per_worker == 0.0
    for bad in ({"gpus": 2, "workers": 3}, {"gpus": 1, "gpus_per_worker": 0.5}, {"gpus": -1}):
        with pytest.raises(InputError, match="--gpus"):
            FinetuneConfig(strategy="scratch", **bad)
    with pytest.raises(InputError, match="share a GPU"):  # fractions with several workers, as before
        FinetuneConfig(strategy="scratch", workers=2, gpus_per_worker=0.5)


@pytest.fixture
def fake_cluster_calls(monkeypatch):
    """A joined cluster whose work runs elsewhere, without Ray: records the autoscaler requests."""
    import ray.autoscaler.sdk

    import idtl_ray.scoring

    calls: list[list[dict[str, float]]] = []
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setattr(idtl_ray.scoring, "ensure_ray", lambda address=None: None)
    monkeypatch.setattr(R, "joined_cluster", lambda: True)
    monkeypatch.setattr(R, "work_runs_elsewhere", lambda bundles=None: True)
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles=None, **_: calls.append(bundles))
    return calls


def test_finetune_on_a_cluster_checks_shared_storage_first_and_asks_for_its_workers(fake_cluster_calls, monkeypatch,
                                                                                  tmp_path):  # fmt: skip
    import idtl_ray.finetune as F
    import idtl_ray.finetune.run as run_module

    shared = tmp_path / "shared"
    monkeypatch.setenv(R.SHARED_ENV, str(shared))
    monkeypatch.setattr(run_module, "_run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("trained")))
    local = F.FinetuneConfig(strategy="scratch", dataset=str(shared / "prepared"), gpus=2, out=str(tmp_path / "run"))
    with pytest.raises(InputError, match="--out .* not on shared storage"):
        F.run_finetune(local)
    assert fake_cluster_calls == [] and not (tmp_path / "run").exists()  # refused before any request or file
    cfg = F.FinetuneConfig(strategy="scratch", dataset=str(shared / "prepared"), gpus=2, out=str(shared / "run"))
    with pytest.raises(RuntimeError, match="trained"):
        F.run_finetune(cfg)
    assert fake_cluster_calls == [[{"CPU": 1.0, "GPU": 1.0}] * 2, []]  # asked at start, withdrawn after a failure too


def test_score_into_a_held_out_on_a_cluster_leaves_no_request_behind(fake_cluster_calls, monkeypatch, tmp_path):
    """The directory is taken before the autoscaler is asked: a refusal must not leave GPU nodes requested."""
    from idtl_ray.config import ScoreConfig
    from idtl_ray.scoring import hold_directory
    from idtl_ray.workflow import run_score

    monkeypatch.setenv(R.SHARED_ENV, str(tmp_path))
    out = tmp_path / "busy"
    with hold_directory(out), pytest.raises(IdtlError, match="in use by another idtl-ray run"):
        run_score(ScoreConfig(dataset=str(tmp_path / "prepared"), out=str(out), gpus=2))
    assert fake_cluster_calls == []  # nothing asked, so nothing left asked for


def test_sweep_gpus_runs_one_trial_per_gpu_and_asks_for_them(fake_cluster_calls, monkeypatch, tmp_path):
    import idtl_ray.sweep as S
    from idtl_ray.finetune import FinetuneConfig

    monkeypatch.setenv(R.SHARED_ENV, str(tmp_path))
    seen = {}
    monkeypatch.setattr(S, "_tune", lambda base, frozen, root, conc, failures: seen.update(base=base, conc=conc))
    (tmp_path / "w.pt").touch()  # sweep checks that a --weights PATH exists; the faked trials never load it
    base = FinetuneConfig(strategy="model", weights=str(tmp_path / "w.pt"), dataset="s3://b/d", gpus=2, cpus_per_worker=2)
    S.run_sweep(base, [1, 2, 3], tmp_path / "sweep")
    assert seen["conc"] == 2 and (seen["base"].workers, seen["base"].gpus_per_worker) == (1, 1.0)
    assert fake_cluster_calls == [[{"CPU": 0.5}, {"CPU": 2.0, "GPU": 1.0}] * 2, []]
    with pytest.raises(InputError, match="--max-concurrent"):
        S.run_sweep(base, [1, 2], tmp_path / "sweep", max_concurrent=3)


def test_training_on_a_cluster_is_never_refused_for_what_it_has_now(monkeypatch):
    import ray

    import idtl_ray.finetune as F
    from idtl_ray.finetune.run import check_local_resources

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 0.0})  # a head with no CPU, scaled to zero
    cfg = F.FinetuneConfig(strategy="scratch", gpus=2)
    monkeypatch.setattr(R, "joined_cluster", lambda: True)
    check_local_resources(cfg)  # Train's placement group makes the cluster scale up
    monkeypatch.setattr(R, "joined_cluster", lambda: False)
    with pytest.raises(InputError, match="local Ray has 0"):
        check_local_resources(cfg)


def test_a_job_on_a_cluster_refuses_out_off_shared_storage_before_any_work(fake_cluster_calls, monkeypatch, tmp_path):
    from idtl_ray import experiments as E
    from idtl_ray.experiments import runner

    monkeypatch.setenv(R.SHARED_ENV, str(tmp_path / "shared"))
    monkeypatch.setattr(runner, "_run_setting", lambda *a, **k: pytest.fail("no work may start"))
    with pytest.raises(InputError, match="--out .* not on shared storage"):
        E.run_table(5, smoke=True, out=tmp_path / "local")
    assert fake_cluster_calls == []
