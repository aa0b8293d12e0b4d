"""An autoscaling Ray cluster on this machine, for tests: Ray's own fake multi-node provider.

``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`` with provider type ``fake_multinode``
starts a head whose autoscaler launches "nodes" as extra sets of Ray processes on this machine (a raylet,
its agents and workers each) when work asks for resources no node has, as on a cloud. Here: a head that
takes no work (``CPU: 0``, as in ``cluster.yaml``) and one worker type with ``CPU: 1, GPU: 1`` (logical
GPUs: torch finds no CUDA and computes on the CPU), ``min_workers: 0``, ``max_workers: 2``. Every node
shares this machine's disk, so the tests declare their temporary directory shared storage
(``IDTL_SHARED_STORAGE``, as ``cluster.yaml`` declares its EFS mount).

Isolation from every other Ray on the machine (other engineers' tests, a user's ``ray start``):

- free ports for everything the head listens on (GCS, dashboard, client server, agents), and the
  provider's ``gcs_address`` set to that GCS port (it assumes 6379 otherwise);
- a private, short ``--temp-dir`` (Ray's unix sockets live under it, ~107 bytes at most). ``ray start
  --head`` records its address in ``<temp-dir>/ray_current_cluster``, not in ``/tmp/ray/``, so a plain
  ``ray.init()`` elsewhere on the machine never joins this cluster; the whole directory is removed at
  the end;
- no ``RAY_ADDRESS`` is set in this process: the CLI calls get ``--address`` and the State API calls
  ``address=`` explicitly;
- the head runs ``--block`` in a session of its own, and :meth:`FakeCluster.stop` ends exactly the
  processes of this cluster, by process id: the head's process group, the processes started from it
  (fake nodes, workers, job drivers) and any process whose command line names the private temp dir.
  Never ``ray stop``, which stops every Ray on the machine.

Where this cluster differs from one on AWS, and what the tests do about it:

- the autoscaler is Ray's v1 autoscaler, what ``ray start --head --autoscaling-config`` runs in Ray
  2.60 (``ray up`` turns on v2); v2 would need ``fake_multi_node/example.yaml``, the provider's defaults
  file, which the 2.60 wheel does not ship;
- all nodes share the head's temp dir, so a job's ``--working-dir`` upload is unpacked by every node's
  runtime-env agent into the same directory, each deleting the previous copy (Ray unpacks working dirs
  with ``overwrite=True``), also under the running driver ("FileNotFoundError" from ``os.getcwd()``).
  Jobs therefore start in the checkout (the head's working directory) and use the package installed in
  this environment, as every node of ``cluster.yaml`` has it installed;
- the GPUs have no CUDA: see :data:`_GLOO_SITECUSTOMIZE` for what Ray Train needs then;
- a node killed by its raylet leaves its worker processes running: :meth:`FakeCluster.kill_node`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # this environment's ray, idtl-ray and python
RAY = str(BIN / "ray")
WORKER_TYPE = "gpu_worker"

# The fake provider's defaults (the fields of Ray's example.yaml for it), under this cluster's own.
_DEFAULTS = {
    "cluster_name": "fake_multinode",
    "max_workers": 8,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True, "launch_multiple": True},
    "auth": {"ssh_user": "ubuntu"},
    "available_node_types": {"ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0}},
    "head_node_type": "ray.head.default",
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 5,
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}  # fmt: skip

# Logical GPUs have no CUDA, and Ray Train assumes a worker that holds a GPU has one: it moves the model
# to cuda:0 (its CUDA device manager returns cuda:<id> for every GPU id Ray assigned: "Found no NVIDIA
# driver") and starts DDP over NCCL (TorchTrainer sets backend "nccl" for use_gpu: "ProcessGroupNCCL is
# only supported with GPUs"). On real GPU nodes both are right. On this fake cluster every Ray process
# starts with this sitecustomize on PYTHONPATH (:func:`gloo_env`), so that where torch finds no CUDA a
# GPU worker computes on the CPU and its process group uses gloo, as GPU workers do without CUDA
# elsewhere in the project. It patches the two Ray modules when (and if) they are imported; other
# processes import nothing.
_GLOO_SITECUSTOMIZE = """\
import importlib.abc
import importlib.util
import sys


def _no_cuda():
    import torch

    return not torch.cuda.is_available()


def _patch_backend(module):
    import dataclasses

    start = module._TorchBackend.on_start

    def on_start(self, worker_group, backend_config):
        if getattr(backend_config, "backend", None) in (None, "nccl") and _no_cuda():
            backend_config = dataclasses.replace(backend_config, backend="gloo")
        return start(self, worker_group, backend_config)

    module._TorchBackend.on_start = on_start


def _patch_devices(module):
    devices = module.CUDATorchDeviceManager.get_devices

    def get_devices(self):
        if _no_cuda():
            import torch

            return [torch.device("cpu")]
        return devices(self)

    module.CUDATorchDeviceManager.get_devices = get_devices


_PATCHES = {"ray.train.torch.config": _patch_backend, "ray.air._internal.device_manager.nvidia_gpu": _patch_devices}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        patch = _PATCHES.pop(name, None)
        if patch is None:
            return None
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchOnImport())
"""


def gloo_env(directory: Path) -> dict[str, str]:
    """Env vars that make Ray Train's DDP use gloo on CUDA-less GPU workers (the head's, for the cluster)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(_GLOO_SITECUSTOMIZE)
    return {"PYTHONPATH": os.pathsep.join([str(directory), *filter(None, [os.environ.get("PYTHONPATH")])])}


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on this machine right now."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    start: int  # start time in clock ticks since boot: tells a process from a later one with its pid
    zombie: bool
    cmd: str


def _proc_table() -> dict[int, Proc]:
    """Every process we can read, by pid."""
    table = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            table[int(p.name)] = Proc(int(p.name), int(stat[1]), int(stat[19]), stat[0] in "ZX", cmd)
        except (OSError, ValueError, IndexError):
            continue
    return table


def _descendants(roots: Iterable[int], table: dict[int, Proc]) -> set[int]:
    out, todo = set(), list(roots)
    children: dict[int, list[int]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    while todo:
        pid = todo.pop()
        if pid in out or pid not in table:
            continue
        out.add(pid)
        todo.extend(children.get(pid, ()))
    return out


@dataclass
class JobRun:
    """A finished (or abandoned) job: its id, final status, logs and wall time."""

    job_id: str
    status: str
    logs: str
    wall_s: float
    ray_job_id: str | None = None
    polls: list[dict[str, Any]] = field(default_factory=list)

    def tail(self, n: int = 6000) -> str:
        return f"job {self.job_id} ended {self.status} after {self.wall_s:.0f} s; its logs (`ray job logs`):\n" \
               f"{self.logs[-n:]}"


class FakeCluster:
    """The autoscaling cluster: :meth:`start`, submit jobs, read the State API, kill nodes, :meth:`stop`."""

    def __init__(self, shared: Path, *, max_workers: int = 2, idle_timeout_minutes: float = 5.0,
                 env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:  # fmt: skip
        self.shared = Path(shared)
        self.cwd = Path(cwd)  # where the head runs: job drivers start there (no --working-dir upload here)
        self.max_workers = max_workers
        self.idle_timeout_minutes = idle_timeout_minutes
        self.extra_env = dict(env or {})
        # short: Ray's socket paths under it must stay below ~107 bytes
        self.temp_dir = Path(tempfile.mkdtemp(prefix="idtl-fc-", dir="/tmp"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = self.dashboard_port = 0
        self.ip = "127.0.0.1"
        self._log = None
        self._seen: dict[int, int] = {}  # pid -> start time of every process of this cluster seen
        self.leftover: list[int] = []

    # ── addresses ───────────────────────────────────────────────────────────────────────────────

    @property
    def gcs_address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def cli_env(self) -> dict[str, str]:
        """Environment of the ray CLI calls: this environment's tools, never another cluster's address."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                   PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
        return env

    # ── start / stop ────────────────────────────────────────────────────────────────────────────

    def config(self) -> dict[str, Any]:
        cfg = json.loads(json.dumps(_DEFAULTS))
        cfg.update(
            cluster_name="idtl-fake",
            max_workers=self.max_workers,
            idle_timeout_minutes=self.idle_timeout_minutes,
            upscaling_speed=2.0,
        )
        cfg["provider"]["gcs_address"] = self.gcs_address  # the provider assumes port 6379 without it
        cfg["available_node_types"] = {
            "ray.head.default": {"resources": {"CPU": 0, "GPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 256 * 1024**2},
                          "node_config": {}, "min_workers": 0, "max_workers": self.max_workers},
        }  # fmt: skip
        return cfg

    def start(self, timeout_s: float = 240.0) -> None:
        import ray._private.services as services

        self.ip = services.get_node_ip_address()
        self.port, self.dashboard_port, client, agent, agent_grpc, env_agent, metrics = free_ports(7)
        cfg_path = self.temp_dir / "autoscaling.json"
        cfg_path.write_text(json.dumps(self.config(), indent=1))
        env = self.cli_env()
        env.update(gloo_env(self.temp_dir / "site"))
        env.update({
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
            "RAY_DEDUP_LOGS": "1",
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        })  # fmt: skip
        cmd = [RAY, "start", "--head", "--block", "--num-cpus=0", "--num-gpus=0", "--disable-usage-stats",
               f"--autoscaling-config={cfg_path}", f"--temp-dir={self.temp_dir}", f"--port={self.port}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
               f"--metrics-export-port={metrics}", f"--object-store-memory={256 * 1024**2}"]  # fmt: skip
        self._log = open(self.temp_dir / "ray-start.log", "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(self.cwd),
                                     start_new_session=True)  # fmt: skip
        deadline = time.time() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start --head exited with {self.proc.returncode}:\n{self.head_log()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/version", timeout=3) as r:
                    if r.status == 200 and self.nodes():
                        break
            except Exception:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"the fake cluster's head did not come up within {timeout_s:.0f} s:\n"
                                   f"{self.head_log()[-3000:]}")  # fmt: skip
            time.sleep(1)
        self.remember_pids()

    def head_log(self) -> str:
        try:
            return (self.temp_dir / "ray-start.log").read_text(errors="replace")
        except OSError:
            return ""

    def monitor_log(self, n: int = 4000) -> str:
        """The autoscaler's log (what it launched or refused), for failure messages."""
        parts = []
        for name in ("monitor.log", "monitor.out", "monitor.err"):
            for p in sorted(self.temp_dir.glob(f"session_2*/logs/{name}")):
                parts.append(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}")
        return "\n".join(parts)

    def _live(self) -> dict[int, Proc]:
        """The processes of this cluster now: the head's descendants, whatever names our temp dir, and
        those seen before that are still the same processes (same pid *and* start time)."""
        table = _proc_table()
        same = {pid for pid, start in self._seen.items() if pid in table and table[pid].start == start}
        named = {pid for pid, p in table.items() if str(self.temp_dir) in p.cmd}
        head = {self.proc.pid} if self.proc is not None and self.proc.poll() is None else set()  # not yet reaped
        roots = same | named | head
        me = os.getpid()
        return {pid: table[pid] for pid in _descendants(roots, table) if pid != me and not table[pid].zombie}

    def pids(self) -> set[int]:
        return set(self._live())

    def remember_pids(self) -> None:
        """Note the cluster's processes now (job drivers come and go; stop() ends those still alive)."""
        self._seen.update({pid: p.start for pid, p in self._live().items()})

    def stop(self) -> None:
        """End every process of this cluster, by process id, and remove its temp dir."""
        try:
            self.remember_pids()
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node on SIGTERM
                try:
                    self.proc.wait(timeout=8)
                except subprocess.TimeoutExpired:
                    pass
            if self.proc is not None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)  # the head's own session: only its processes
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            deadline = time.time() + 30
            while (left := self._live()) and time.time() < deadline:
                for pid, p in left.items():
                    if _proc_table().get(pid, p).start == p.start:  # still that process, not a new one
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except (ProcessLookupError, PermissionError):
                            pass
                time.sleep(0.5)
            self.leftover = sorted(self._live())
        finally:
            if self._log is not None:
                self._log.close()
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    # ── State API (over the dashboard's HTTP address: this process never joins the cluster) ───

    def nodes(self, alive_only: bool = True) -> list[Any]:
        from ray.util.state import list_nodes

        nodes = list_nodes(address=self.url, detail=True, raise_on_missing_output=False)
        return [n for n in nodes if not alive_only or n.state == "ALIVE"]

    def workers(self, alive_only: bool = True) -> list[Any]:
        """The worker nodes (every node but the head)."""
        return [n for n in self.nodes(alive_only) if not n.is_head_node]

    def actors(self, ray_job_id: str | None = None) -> list[Any]:
        from ray.util.state import list_actors

        filters = [("job_id", "=", ray_job_id)] if ray_job_id else None
        return list_actors(address=self.url, filters=filters, detail=True, limit=10_000, raise_on_missing_output=False)

    # ── jobs (the ray CLI, as a user submits them) ──────────────────────────────────────────────

    def submit(self, entrypoint: str, *, job_id: str, env_vars: dict[str, str] | None = None) -> str:
        """``ray job submit --no-wait`` of ``entrypoint`` (a command line, run in the head's directory);
        returns the job id. No ``--working-dir``: see the module docstring."""
        runtime_env: dict[str, Any] = {"env_vars": {"PYTHONUNBUFFERED": "1", **(env_vars or {})}}
        cmd = [RAY, "job", "submit", f"--address={self.url}", f"--submission-id={job_id}", "--no-wait",
               f"--runtime-env-json={json.dumps(runtime_env)}", "--", *shlex.split(entrypoint)]  # fmt: skip
        r = subprocess.run(cmd, env=self.cli_env(), capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"ray job submit failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        return job_id

    def job_logs(self, job_id: str) -> str:
        """``ray job logs`` of the job (what its driver printed)."""
        r = subprocess.run([RAY, "job", "logs", f"--address={self.url}", job_id], env=self.cli_env(),
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        return r.stdout + (f"\n[ray job logs exited {r.returncode}: {r.stderr[-1000:]}]" if r.returncode else "")

    def wait(self, job_id: str, timeout_s: float, *, poll_s: float = 3.0,
             on_poll: Callable[[dict[str, Any]], None] | None = None) -> JobRun:  # fmt: skip
        """Poll the job until it ends (or ``timeout_s``: then stop it); ``on_poll(info)`` runs on every poll."""
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.url)
        t0 = time.time()
        polls: list[dict[str, Any]] = []
        status = "PENDING"
        while True:
            try:
                info = client.get_job_info(job_id)
                status = str(info.status.value if hasattr(info.status, "value") else info.status)
            except Exception as e:  # the dashboard can be slow to answer on a loaded machine: poll again
                status = f"unknown ({type(e).__name__}: {e})"[:200]
            row = {"t": round(time.time() - t0, 1), "status": status}
            try:
                row["workers"] = sorted(n.node_id for n in self.workers())
            except Exception as e:  # the State API can time out on a loaded machine: not fatal here
                row["workers_error"] = f"{type(e).__name__}: {e}"
            polls.append(row)
            self.remember_pids()
            if on_poll is not None:
                on_poll(row)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            if time.time() - t0 > timeout_s:
                try:
                    client.stop_job(job_id)
                except Exception:
                    pass
                status = f"TIMEOUT after {timeout_s:.0f} s (was {status}; stopped)"
                break
            time.sleep(poll_s)
        info = client.get_job_info(job_id)
        return JobRun(job_id, status, self.job_logs(job_id), time.time() - t0, getattr(info, "job_id", None), polls)

    # ── nodes' processes ────────────────────────────────────────────────────────────────────────

    def raylet_pid(self, node_id: str) -> int:
        """The process id of a node's raylet (its command line names the node id)."""
        table = _proc_table()
        for pid, p in table.items():
            exe = p.cmd.split(" ", 1)[0]
            if exe.endswith("/raylet") and f"--node_id={node_id}" in p.cmd and str(self.temp_dir) in p.cmd:
                return pid
        raise LookupError(f"no raylet of node {node_id} under {self.temp_dir}")

    def kill_node(self, node_id: str) -> dict[str, Any]:
        """Kill a worker node as a machine failure would: its raylet first (SIGKILL, by process id), then
        every process the raylet started (its workers and agents), by process id.

        The raylet alone is not enough on this machine: Ray marks the node dead (~15 s of failed health
        checks) but its workers live on as orphans for minutes, and a Train worker would go on training
        and reporting while a new one starts; on a dead machine they are gone with it.
        """
        table = _proc_table()
        raylet = self.raylet_pid(node_id)
        started = sorted(_descendants([raylet], table) - {raylet})
        os.kill(raylet, signal.SIGKILL)
        killed = [raylet]
        for pid in started:
            p = table[pid]
            if _proc_table().get(pid, p).start == p.start:  # still that process
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
        return {"node": node_id, "raylet_pid": raylet, "killed_pids": killed,
                "killed": [table[pid].cmd.split(" ", 1)[0].rsplit("/", 1)[-1][:40] for pid in killed]}

