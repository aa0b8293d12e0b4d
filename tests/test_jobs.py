"""`ray job submit` of jobs/table5.py --smoke against a throwaway local head (ray-2.60-notes section 5).

The head is started with ``ray start --head --block`` in its own session, on free ports and with its own
``--temp-dir``, so that neither this test nor a plain ``ray.init()`` elsewhere attaches to another Ray on
the machine. It is stopped by signalling that process (``ray stop`` would stop every Ray instance on the
machine, including other tests'), then any leftover process of that head is ended by its PID.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from fake_cluster import free_ports

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
JOB_TIMEOUT_S = 900  # 360 s ran out under a load average of 40 with the job at its last strategy

pytestmark = pytest.mark.slow


def _pids_using(marker: str) -> list[int]:
    """PIDs whose command line mentions ``marker`` (this head's unique temp dir)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if marker in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore"):
                    pids.append(int(p.name))
            except OSError:
                continue
    return pids


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` shuts its node down on SIGTERM ...
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # ... in ~30 s: nothing of this throwaway head needs keeping
            os.killpg(proc.pid, signal.SIGKILL)  # our own session: only processes this head started
            proc.wait(timeout=10)
    deadline = time.time() + 5
    while _pids_using(temp_dir) and time.time() < deadline:
        time.sleep(1)
    for pid in _pids_using(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def ray_head():
    """A 2-CPU head with the dashboard (Jobs API) on free ports; yields (dashboard URL, temp dir)."""
    # short path: Ray's unix socket names under the temp dir must stay below ~107 bytes
    temp_dir = tempfile.mkdtemp(prefix="idtl-job-", dir="/tmp")
    port, dash, client, agent, agent_grpc, env_agent, metrics = free_ports(7)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [RAY, "start", "--head", "--block", "--num-cpus=2", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
           "--include-dashboard=true", f"--port={port}", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}", f"--temp-dir={temp_dir}"]  # fmt: skip
    log = open(Path(temp_dir) / "ray-start.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}: {(Path(temp_dir) / 'ray-start.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("the local Ray head's dashboard did not come up within 180 s")
            time.sleep(1)
        yield url, temp_dir
    finally:
        _stop_head(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_table5_smoke_runs_as_a_ray_job(ray_head, tmp_path: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    url, temp_dir = ray_head
    out = tmp_path / "results"
    client = JobSubmissionClient(url)
    job_id = client.submit_job(
        # the head runs the driver with whatever `python` it finds: name this environment's interpreter
        entrypoint=f"{sys.executable} jobs/table5.py --smoke --out {out}",
        runtime_env={"working_dir": str(ROOT),
                     "env_vars": {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                                  "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}},
    )  # fmt: skip
    deadline = time.time() + JOB_TIMEOUT_S
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.time() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"job {job_id} still {status} after {JOB_TIMEOUT_S} s:\n{client.get_job_logs(job_id)[-3000:]}")
        time.sleep(3)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    # a normal run logs no error-level line (Ray's known-harmless ones are filtered, as in the CLI)
    errors = [ln for ln in logs.splitlines() if re.search(r"\[[^]]* E \d+ \d+\]|\bERROR\b|Traceback", ln)]
    assert not errors, errors

    # the uploaded working dir has the package but not the virtualenv (.gitignore / .rayignore)
    pkgs = {p.resolve() for p in Path(temp_dir).glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
            if p.is_dir()}  # fmt: skip
    assert pkgs and all((p / "idtl_ray" / "experiments" / "runner.py").is_file() for p in pkgs)
    assert not any((p / ".venv").exists() for p in pkgs)

    doc = json.loads((out / "table5.json").read_text())
    assert {"table", "mode", "seeds", "settings", "runs", "summary", "paper", "direction", "files"} <= set(doc)
    assert doc["table"] == 5 and doc["mode"] == "smoke" and doc["seeds"] == [0]
    assert {r["strategy"] for r in doc["runs"]} == {"scratch", "model", "instance"}
    # a smoke run's directories stay apart from a full run's: a full run must not reuse its tiny source
    assert (out / "table5-smoke" / "seed0").is_dir() and not (out / "table5").exists()
    for r in doc["runs"]:
        assert r["plus_test_size"] == 10 * 20 + 9 * 10 and 0.0 <= r["test_error"] <= 100.0
        assert "class_a" in r and "uniform_test_error" in r
    md = (out / "table5.md").read_text()
    assert "CIFAR-10+ paper" in md and "| Instance-based TL | ResNet-50 | 4.18 |" in md
    assert (out / "table5.png").stat().st_size > 0
