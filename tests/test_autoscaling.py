"""The commands on an autoscaling GPU cluster, on this machine (issue 12 item 6).

One cluster for the module (:class:`fake_cluster.FakeCluster`, Ray's fake multi-node provider): a head
with ``CPU: 0`` and a worker type with ``CPU: 1, GPU: 1`` (logical GPUs), min 0, max 2, as
``cluster.yaml`` has on AWS. Work goes in through ``ray job submit``, as users submit it; what ran
where is read from Ray's State API (over the dashboard's address: this process never joins the
cluster, and sets no ``RAY_ADDRESS``). The temporary directory is declared shared storage
(``IDTL_SHARED_STORAGE`` in the head's environment, as ``cluster.yaml`` sets it for its EFS mount),
since every fake node sees this machine's disk; ``--out`` and the datasets live under it.

(a) ``idtl-ray score --gpus 2`` scales the cluster from 0 to 2 workers, each of the 2 scoring actors
    holds one GPU, and the mask covers every training sample.
(b) ``python jobs/table5.py --smoke --gpus 2`` succeeds, its Train workers hold one GPU each.
(c) the node a Train worker runs on is killed during epoch 1 (its raylet by process id, then the
    processes the raylet started): the run continues from its last checkpoint on another node and runs
    every epoch once.

The tests run in this order and share the cluster: (a) needs it fresh (no worker yet); (b) and (c)
reuse the nodes (a) started while they are up (idle timeout 1 minute), else the autoscaler starts
them again. Where the fake cluster differs from a real one (no CUDA behind the GPUs, one disk for all
nodes) is in ``fake_cluster``'s docstring and docs/cluster.md. The first test needs no cluster: it
checks what ``--gpus`` of the jobs declares.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fake_cluster import BIN, FakeCluster, JobRun

from idtl_ray import experiments as E
from idtl_ray.experiments import runner
from idtl_ray.errors import InputError

SCORE_JOB_S = 900
TABLE5_JOB_S = 1500
FINETUNE_JOB_S = 900


def _note(what: str, value: Any) -> None:
    """What the State API showed, in the test's output (pytest -s, or the report of a failure)."""
    print(f"[autoscaling] {what}: {json.dumps(value, default=str)}", flush=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    shared = tmp_path_factory.mktemp("cluster-storage")
    env = {"IDTL_SHARED_STORAGE": str(shared), "IDTL_CACHE_DIR": str(shared / "cache")}
    # digits prepared into the shared directory while the head starts: as shipped (8x8) for (a), and at
    # 48x48 for (c), where an epoch must last long enough to be interrupted (~10 s instead of ~1 s)
    cmd = f"{BIN / 'idtl-ray'} prepare --dataset digits --out {shared / 'digits'} && " \
          f"{BIN / 'idtl-ray'} prepare --dataset digits --image-size 48 --out {shared / 'digits48'}"
    prep = subprocess.Popen(cmd, shell=True, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    # idle timeout 1 minute: Ray's v1 autoscaler removes a dead node only as an idle one, and until then
    # it counts towards max_workers, so (c) gets a replacement node a minute after the kill, not five
    c = FakeCluster(shared, max_workers=2, idle_timeout_minutes=1, env=env)
    try:
        c.start()
        out, _ = prep.communicate(timeout=600)
        assert prep.returncode == 0, f"idtl-ray prepare failed:\n{out[-3000:]}"
        yield c
    finally:
        if prep.poll() is None:
            prep.kill()
            prep.wait()
        c.stop()


def _finished(c: FakeCluster, run: JobRun) -> None:
    print(f"[autoscaling] {run.tail(1500)}", flush=True)
    assert run.status == "SUCCEEDED", f"{run.tail()}\n\nautoscaler:\n{c.monitor_log(3000)}"


def _job_actors(c: FakeCluster, run: JobRun, name: str) -> list[Any]:
    """The job's actors whose class (or Ray Data's name for them) contains ``name``."""
    assert run.ray_job_id, f"job {run.job_id} has no Ray job id"
    return [a for a in c.actors(run.ray_job_id) if name in (a.class_name or "") or name in (a.repr_name or "")]


def _gpu(actor: Any) -> float:
    """GPUs an actor holds: ``GPU``, or inside a placement group ``GPU_group_<bundle>_<group id>``."""
    res = actor.required_resources or {}
    return float(res.get("GPU") or max((v for k, v in res.items() if re.fullmatch(r"GPU_group_\d+_\w+", k)), default=0.0))


def _group(actor: Any) -> str | None:
    """The placement group an actor's resources come from (a Ray Train worker group), or None."""
    return next((m.group(1) for k in actor.required_resources or {} if (m := re.fullmatch(r"GPU_group_(\w+)", k))
                 and not re.fullmatch(r"\d+_\w+", m.group(1))), None)  # fmt: skip


def test_jobs_gpus_declares_train_workers_scoring_actors_and_the_request(tmp_path: Path, monkeypatch) -> None:
    """``jobs/tableN.py --gpus N`` (no cluster needed): N Train workers with one GPU each, ScoreConfig(gpus=N)."""
    parser = E.job_parser(5)
    res = E.resources_from_args(parser.parse_args(["--smoke", "--gpus", "2"]))
    assert (res.workers, res.gpus_per_worker, res.gpus, res.score_actors) == (2, 1.0, 2, None)
    assert res.bundles() == [{"GPU": 1.0, "CPU": 1.0}] * 2
    full = E.resources_from_args(parser.parse_args(["--gpus", "0"]))
    assert (full.gpus_per_worker, full.bundles()) == (0.0, [])  # --gpus 0: no GPU, nothing to ask for
    for argv in (["--gpus", "2", "--workers", "3"], ["--gpus", "2", "--gpus-per-worker", "0.5"], ["--gpus", "-1"],
                 ["--gpus", "0", "--workers", "2"]):  # as finetune --gpus 0 --workers 2
        with pytest.raises(InputError, match="--gpus"):
            E.resources_from_args(parser.parse_args(argv))

    seen = {}

    def run_score(cfg, progress=False):  # the ScoreConfig the job builds, not run
        seen["cfg"] = cfg
        return {"mask": "m", "n_train": 1, "n_dropped": 0}

    monkeypatch.setattr("idtl_ray.workflow.run_score", run_score)
    table = E.table_spec(5, smoke=True)
    ctx = runner._Context(table, tmp_path, None, res, tmp_path / "_data")
    runner._score(ctx, table.settings[0], "digits", "none", 0, None)
    assert (seen["cfg"].gpus, seen["cfg"].actors) == (2, None)


@pytest.mark.slow
@pytest.mark.timeout(SCORE_JOB_S + 600)  # the module's cluster starts in this test's setup
def test_a_score_scales_from_zero_to_two_gpu_workers(cluster: FakeCluster) -> None:
    c = cluster
    before = c.workers()
    assert before == [], f"the cluster must start with no worker node, has {[n.node_id for n in before]}"
    out = c.shared / "score"
    # Ray Data starts a pool's actors asynchronously and scores with those ready. Here the pre-scoring task
    # holds one of the two GPUs while the actors start, and digits' 1294 samples are scored in under a
    # second, so the second actor may only get its GPU after the work is done, and be ended unplaced.
    # Waiting for the pool's 2 actors before the first batch (Ray Data's wait_for_min_actors_s) makes
    # both hold their GPU in every run.
    c.submit(f"idtl-ray score --dataset {c.shared / 'digits'} --gpus 2 --drop budget --drop-budget 0.1 "
             f"--shard-size 256 --out {out}", job_id="score-gpus-2",
             env_vars={"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "600"})  # fmt: skip
    run = c.wait("score-gpus-2", SCORE_JOB_S)
    _finished(c, run)
    peak = max(len(p.get("workers", [])) for p in run.polls)
    _note("(a) worker nodes seen per poll", [(p["t"], len(p.get("workers", []))) for p in run.polls])
    assert peak == 2, f"the cluster should scale to 2 workers for --gpus 2, saw at most {peak}\n{c.monitor_log()}"

    every = c.workers(alive_only=False)
    # a launch the fake provider lost at once (seen: a node that ended 0.3 s after it started) is replaced
    # by the autoscaler; it is no third worker of ours. Every other node must be one of the two.
    lost = [n for n in every if n.end_time_ms and n.end_time_ms - n.start_time_ms < 10_000]
    workers = {n.node_id: n for n in every if n not in lost}
    _note("(a) worker launches lost at once and replaced", [n.node_id for n in lost])
    assert len(workers) == 2, f"2 worker nodes expected (max_workers 2), found {list(workers)}"
    for n in workers.values():
        assert n.resources_total.get("GPU") == 1.0 and n.resources_total.get("CPU") == 1.0, n.resources_total
    scorers = _job_actors(c, run, "Scorer")
    _note("(a) scoring actors (actor, node, resources)",
          [(a.actor_id[:8], a.node_id, a.required_resources, a.state) for a in scorers])
    assert len(scorers) == 2, f"2 scoring actors expected, the State API lists {[a.repr_name for a in scorers]}"
    assert all(_gpu(a) == 1.0 for a in scorers), [a.required_resources for a in scorers]
    # each worker node has one GPU: two GPU actors on two nodes hold one GPU each
    assert {a.node_id for a in scorers} == set(workers), ({a.node_id for a in scorers}, set(workers))

    import pyarrow.parquet as pq

    mask = pq.read_table(out / "mask.parquet").to_pydict()
    train = [i for f in sorted((c.shared / "digits").glob("train-*.parquet"))
             for i in pq.read_table(f, columns=["sample_id"]).column("sample_id").to_pylist()]  # fmt: skip
    assert sorted(mask["sample_id"]) == sorted(train), "the mask must score every training sample once"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == len(mask["sample_id"]) == 1294
    assert sum(1 for k in mask["keep"] if not k) == summary["n_dropped"] == 129  # --drop-budget 0.1 of 1294


@pytest.mark.slow
@pytest.mark.timeout(TABLE5_JOB_S + 600)
def test_b_table5_smoke_trains_on_gpu_workers(cluster: FakeCluster) -> None:
    c = cluster
    out = c.shared / "table5"
    # The driver starts in the checkout (the head's directory) and every node has the package installed,
    # as cluster.yaml installs it. No --working-dir upload here: every fake node's runtime-env agent
    # unpacks it into the same directory on this one disk, deleting it under the running driver.
    # DDP runs over gloo: these GPUs have no CUDA for NCCL (fake_cluster.gloo_env)
    c.submit(f"python jobs/table5.py --smoke --gpus 2 --out {out}", job_id="table5-smoke-gpus-2")
    run = c.wait("table5-smoke-gpus-2", TABLE5_JOB_S)
    _finished(c, run)
    _note("(b) the job's stages", [ln.strip() for ln in run.logs.splitlines() if ln.startswith("[experiments")])
    doc = json.loads((out / "table5.json").read_text())
    assert doc["resources"]["gpus"] == 2 and doc["resources"]["workers"] == 2 and doc["resources"]["gpus_per_worker"] == 1.0
    assert {r["strategy"] for r in doc["runs"]} == {"scratch", "model", "instance"}

    trainers = _job_actors(c, run, "RayTrainWorker")
    groups: dict[str | None, list[str]] = {}
    for a in trainers:
        groups.setdefault(_group(a), []).append(a.node_id)
    _note("(b) Train workers (actor, placement group, node, GPUs)",
          [(a.actor_id[:8], (_group(a) or "-")[:8], a.node_id, _gpu(a)) for a in trainers])
    assert all(_gpu(a) == 1.0 for a in trainers), [a.required_resources for a in trainers]
    # one worker group (placement group) per run: its 2 workers hold the GPUs of the 2 nodes
    assert len(groups) == len(doc["runs"]) and None not in groups, groups
    assert all(sorted(nodes) == sorted(set(nodes)) and len(nodes) == 2 for nodes in groups.values()), groups
    # the job's scoring pool: 2 actors with one GPU each (as in (a), the second may not be placed before
    # the pool's work is done: this job does not wait for it)
    scorers = _job_actors(c, run, "Scorer")
    _note("(b) scoring actors (actor, node, resources)", [(a.actor_id[:8], a.node_id, a.required_resources) for a in scorers])
    assert len(scorers) == 2 and all(_gpu(a) == 1.0 for a in scorers), [a.required_resources for a in scorers]


def _registered_checkpoints(out: Path) -> list[str]:
    """The checkpoints Ray Train has registered for the run in ``out`` (what a restart resumes from): the
    controller's ``checkpoint_manager_snapshot.json``; a checkpoint directory exists a little earlier."""
    names: list[str] = []
    for snapshot in out.glob("ray/*/checkpoint_manager_snapshot.json"):
        try:
            names += [r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
        except (OSError, ValueError, KeyError, TypeError):  # being written: read it again
            pass
    return sorted(names)


@pytest.mark.slow
@pytest.mark.timeout(FINETUNE_JOB_S + 600)
def test_c_killed_node_resumes_from_checkpoint_on_another_node(cluster: FakeCluster) -> None:
    c = cluster
    out = c.shared / "finetune-kill"
    # --gpus 1 inside the job (RAY_ADDRESS): asked of the autoscaler, never refused for the GPUs the
    # cluster has now; half a CPU per worker leaves the node's other half to Ray Data
    c.submit(f"idtl-ray finetune --strategy scratch --dataset {c.shared / 'digits48'} --no-augment --epochs 3 "
             f"--batch-size 32 --gpus 1 --cpus-per-worker 0.5 --max-failures 1 --out {out}",
             job_id="finetune-node-kill")  # fmt: skip

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(c.url)
    job: dict[str, Any] = {}
    stop = threading.Event()

    def watch() -> None:  # the job's status, away from the kill loop (the dashboard can take seconds)
        while not stop.is_set():
            try:
                info = client.get_job_info("finetune-node-kill")
                job.update(status=str(info.status.value), ray_job_id=info.job_id or job.get("ray_job_id"))
                c.remember_pids()
            except Exception:
                pass
            stop.wait(2.0)

    threading.Thread(target=watch, name="job-status", daemon=True).start()
    worker, killed = None, {}
    t0 = time.time()
    deadline = t0 + FINETUNE_JOB_S
    # First the Train worker's node (the State API), then, watching only the run's files, its node is
    # killed as soon as Ray Train has registered the checkpoint of epoch 0: epoch 1 is then running.
    try:
        while not killed:
            if job.get("status") in ("SUCCEEDED", "FAILED", "STOPPED"):
                pytest.fail(f"the run ended ({job['status']}) before a node could be killed in epoch 1:\n"
                            f"{c.job_logs('finetune-node-kill')[-4000:]}")  # fmt: skip
            assert time.time() < deadline, f"no checkpoint after {FINETUNE_JOB_S} s:\n{c.job_logs('finetune-node-kill')[-4000:]}"
            if worker is None:
                try:
                    worker = next((a for a in c.actors(job["ray_job_id"]) if "RayTrainWorker" in (a.class_name or "")
                                   and a.state == "ALIVE"), None) if job.get("ray_job_id") else None  # fmt: skip
                except Exception:  # the State API can be slow to answer on a busy machine: ask again
                    worker = None
                time.sleep(0.5)
                continue
            if ckpts := _registered_checkpoints(out):
                killed = {**c.kill_node(worker.node_id), "checkpoints": ckpts, "actor": worker.actor_id,
                          "at_s": round(time.time() - t0, 1)}
                _note("(c) killed", killed)
            time.sleep(0.1)
    finally:
        stop.set()
    run = c.wait("finetune-node-kill", max(60.0, deadline - time.time()))
    _finished(c, run)
    _note("(c) the run's progress", [ln.strip() for ln in run.logs.splitlines() if ln.startswith(("epoch ", "training "))])

    final = json.loads((out / "final.json").read_text())
    history = json.loads((out / "metrics.json").read_text())
    last = int(killed["checkpoints"][-1].split("=")[1])  # the last checkpoint when the node died
    _note("(c) final.json start_epochs / epochs", {"start_epochs": final["start_epochs"], "epochs": final["epochs"],
                                                    "history_epochs": [h["epoch"] for h in history]})  # fmt: skip
    assert last < 2, f"the node died after the last epoch ({killed['checkpoints']}): nothing was left to resume"
    assert final["start_epochs"] == [0, last + 1], f"one restart, from the checkpoint of epoch {last}: {final['start_epochs']}"
    assert [h["epoch"] for h in history] == [0, 1, 2] and final["epochs"] == 3, "every epoch once"

    trainers = _job_actors(c, run, "RayTrainWorker")
    _note("(c) Train workers (actor, node, state)", [(a.actor_id[:8], a.node_id, a.state) for a in trainers])
    after = [a for a in trainers if a.actor_id != killed["actor"]]
    assert after and all(a.node_id != killed["node"] for a in after), "the run must continue on another node"
    assert all(_gpu(a) == 1.0 for a in trainers)
    dead = {n.node_id: n.state for n in c.nodes(alive_only=False)}
    assert dead.get(killed["node"]) == "DEAD", dead
