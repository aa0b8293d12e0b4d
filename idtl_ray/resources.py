"""What a command asks of the cluster: declared GPUs and CPUs, the autoscaler's request, shared storage.

On a cluster that scales from zero, what Ray reports at start is not what the command will get: a
fresh cluster has a head with no CPU and no GPU. So the commands size their work from what the user
declares (``--gpus N``, ``--cpus N``), ask the autoscaler for it at once
(:func:`ray.autoscaler.sdk.request_resources`), and let Ray place the work when the nodes arrive. Only
the embedded local Ray, this machine, is sized from what it has. The request is a head start: Ray Data's
autoscaling coordinator replaces it when a pipeline starts or ends (docs/cluster.md); the work's own
demand (actors, placement groups) is what keeps the nodes.

On a cluster whose work runs on other nodes, every path a worker reads or writes (``--out``,
``--data-dir``, a prepared ``--dataset``, the dataset cache) must be on storage every node sees:
an ``s3://`` (or other) URI, or a path under a mount the user declares shared on every node with
``IDTL_SHARED_STORAGE`` (``cluster.yaml`` sets ``/mnt/cluster_storage``; several mounts are separated
by ``:``). :func:`check_shared_storage` refuses anything else before any work starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from .errors import InputError

SHARED_ENV = "IDTL_SHARED_STORAGE"


def joined_cluster() -> bool:
    """Whether this process drives an existing cluster (``--address``, ``RAY_ADDRESS``, ``ray job submit``)
    rather than the embedded local Ray :func:`idtl_ray.scoring.ensure_ray` starts."""
    from .scoring import session

    return session.joined_cluster()


def work_runs_elsewhere(bundles: list[dict[str, float]] | None = None) -> bool:
    """On a joined cluster: whether workers run on other nodes than this one (more than one node, this
    node offers no CPU and no GPU, as the head of ``cluster.yaml`` does, or one of ``bundles``, what the
    command declares, does not fit it: a one-node cluster whose head has no GPU scales up for ``--gpus 2``).
    Bundles are judged one by one: those that fit here may queue here (a sweep's second trial)."""
    import ray

    if not joined_cluster():
        return False
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) > 1:
        return True
    here = ray.get_runtime_context().get_node_id()
    mine = next((n["Resources"] for n in alive if n.get("NodeID") == here), {})
    if mine.get("CPU", 0) == 0 and mine.get("GPU", 0) == 0:
        return True
    return any(b.get(k, 0.0) > mine.get(k, 0) for b in bundles or [] for k in ("CPU", "GPU"))


def shared_roots() -> list[Path]:
    """The mounts declared shared by ``IDTL_SHARED_STORAGE``, resolved."""
    raw = os.environ.get(SHARED_ENV, "")
    return [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()]


def is_shared(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a URI other than ``file://`` or lies under a declared shared mount."""
    text = str(path)
    if text.lower().startswith("file://"):  # a local path written as a URI: shared when under a declared mount
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            return False
        text = unquote(parts.path)
    elif "://" in text:
        return True
    p = Path(text).expanduser().resolve()
    return any(p == root or root in p.parents for root in shared_roots())


def check_shared_storage(paths: Mapping[str, str | os.PathLike[str] | None],
                         bundles: list[dict[str, float]] | None = None) -> None:
    """Refuse, in one line, a path workers on other nodes could not see (see the module docstring).

    ``paths``: option name -> path (None: not used). Does nothing off a cluster, or when every worker
    runs on this node (which must hold ``bundles``, what the command declares).
    """
    if not work_runs_elsewhere(bundles):
        return
    roots = shared_roots()
    for option, path in paths.items():
        if path is None or is_shared(path):
            continue
        where = (f"under {SHARED_ENV} ({os.pathsep.join(map(str, roots))})" if roots
                 else f"declared shared with {SHARED_ENV}=/mnt/cluster_storage (cluster.yaml sets it)")
        uri = "s3://... or " if option == "--dataset" else ""  # outputs, the cache and --data-dir are local paths
        raise InputError(f"{option} {path} is not on shared storage, and this cluster runs the work on other nodes: "
                         f"use {uri}a path on a mount every node has, {where}")


def gpu_workers(gpus: int, workers: int | None, gpus_per_worker: float | None) -> tuple[int, float]:
    """``--gpus N`` as (Train workers, GPUs per worker): N workers with one GPU each, one CPU worker for 0.

    ``workers``/``gpus_per_worker``: what the user also set (None: not set); anything that disagrees
    with ``--gpus`` is refused, since ``--gpus`` replaces them.
    """
    if gpus < 0:
        raise InputError(f"--gpus takes a GPU count >= 0, got {gpus}")
    wanted = (gpus or 1, float(min(gpus, 1)))
    if workers not in (None, wanted[0]) or gpus_per_worker not in (None, wanted[1]):
        raise InputError(f"--gpus {gpus} sets the Train workers ({wanted[0]} with {wanted[1]:g} GPU each): leave out "
                         f"--workers and --gpus-per-worker, or use them without --gpus")  # fmt: skip
    return wanted


def bundles_of(count: int, cpus: float, gpus: float) -> list[dict[str, float]]:
    """``count`` identical resource bundles (Train workers or scoring actors), as the autoscaler takes them."""
    return [{"CPU": float(cpus), "GPU": float(gpus)}] * count


def request(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler of a joined cluster for ``bundles`` now (a no-op on the embedded local Ray)."""
    if not joined_cluster() or not bundles:
        return
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{k: float(v) for k, v in b.items() if v} for b in bundles])


def release() -> None:
    """Withdraw this command's request, so that idle nodes can scale down again."""
    if not joined_cluster():
        return
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=[])
    except Exception:  # the cluster is gone: nothing to release
        pass


def dataset_location(dataset: str) -> tuple[str, str | os.PathLike[str]]:
    """Where workers read ``--dataset`` from: a name is prepared into the cache (``IDTL_CACHE_DIR``),
    a prepared directory is read where it is. Returns (what to name in an error, the path)."""
    from .data.cache import cache_root
    from .data.registry import DATASETS

    if dataset in DATASETS or dataset.startswith(("npz:", "folder:")):
        return "IDTL_CACHE_DIR (the cache --dataset NAME is prepared into)", cache_root()
    return "--dataset", dataset


def claim_cluster(address: str | None, out: str | os.PathLike[str], dataset: str,
                  bundles: Callable[[], list[dict[str, float]]]) -> bool:  # fmt: skip
    """On a cluster (``--address``, ``RAY_ADDRESS``, inside ``ray job submit``): join it, refuse paths
    other nodes cannot see, and ask the autoscaler for ``bundles()`` (called once joined) now, so that
    nodes boot while the driver plans. Returns whether it did (then call :func:`release` when done).

    Off a cluster it does nothing: the embedded local Ray starts later, after the checks that need no
    Ray. ``--data-dir`` is read only on this node (a named dataset is prepared here, into the cache), so
    it need not be shared.
    """
    if not (address or os.environ.get("RAY_ADDRESS")):
        return False
    from .scoring import ensure_ray

    ensure_ray(address)
    wanted = bundles()
    check_shared_storage({"--out": out, **dict([dataset_location(dataset)])}, wanted)
    request(wanted)
    return True


def describe(resources: Mapping[str, Any]) -> str:
    """``2 GPUs, 1 CPU`` for a resource dict."""
    parts = [f"{v:g} {k}{'s' if v != 1 else ''}" for k, v in resources.items() if v]
    return ", ".join(parts) or "nothing"
