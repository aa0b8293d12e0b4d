"""The autoscaler request of every command on a cluster, kept together.

Ray's :func:`ray.autoscaler.sdk.request_resources` holds one value for the whole cluster: each call
replaces the last. Two commands on one cluster (two ``ray job submit``, or a notebook beside a job)
would replace each other's request, and the first to end would withdraw the other's, leaving a job
that waits for its GPUs to join with nothing asking for them. So each command's request goes through a
small detached actor, the registry, which keeps one entry per driver and answers with the sum of all
entries; the command then asks the autoscaler for that sum.

Within one process requests nest (a job asks for its GPUs, then its scoring stage for its pool): the
innermost live one is this process's entry, and releasing it brings the outer one back. A driver
killed without releasing (SIGKILL) leaves an entry behind; it is dropped the next time any command asks,
since the object the dead driver owned (its token) can no longer be read.
"""

from __future__ import annotations

from typing import Any

REGISTRY_NAME = "idtl-ray-autoscaler-requests"
NAMESPACE = "idtl-ray"

Bundles = list[dict[str, float]]


class RequestRegistry:
    """Detached actor: every live driver's request; :meth:`publish` returns what the cluster needs in all."""

    def __init__(self) -> None:
        self.held: dict[str, tuple[list[Any], Bundles]] = {}

    def publish(self, key: str, token: list[Any], bundles: Bundles) -> Bundles:
        """Set (or, with no bundles, remove) ``key``'s request; drop dead drivers'; return every request's bundles."""
        if bundles:
            self.held[key] = (token, bundles)
        else:
            self.held.pop(key, None)
        for other, (tok, _) in list(self.held.items()):
            if other != key and not _owner_alive(tok[0]):
                del self.held[other]
        return [b for _, bs in self.held.values() for b in bs]


def _owner_alive(token: Any) -> bool:
    import ray
    from ray.exceptions import GetTimeoutError

    try:
        ray.get(token, timeout=10)
    except GetTimeoutError:  # a slow owner is not a dead one
        return True
    except Exception:  # OwnerDiedError, ObjectLostError: its driver is gone
        return False
    return True


class _Mine:
    """This process's live requests, innermost last, by handle."""

    def __init__(self) -> None:
        self.stack: list[tuple[int, Bundles]] = []
        self.next = 1
        self.token: tuple[str, Any] | None = None  # (cluster, an object this driver owns)

    def push(self, bundles: Bundles) -> int:
        handle, self.next = self.next, self.next + 1
        self.stack.append((handle, bundles))
        return handle

    def drop(self, handle: int | None) -> None:
        self.stack = [] if handle is None else [(h, b) for h, b in self.stack if h != handle]

    def current(self) -> Bundles:
        return self.stack[-1][1] if self.stack else []


_mine = _Mine()


def push(bundles: Bundles) -> int:
    """Add ``bundles`` as this process's innermost request, ask for every command's; return its handle."""
    handle = _mine.push(bundles)
    _publish()
    return handle


def drop(handle: int | None) -> None:
    """Withdraw the request ``handle`` (None: all of this process's) and ask for what the others need."""
    _mine.drop(handle)
    _publish()


def _publish() -> None:
    from ray.autoscaler.sdk import request_resources

    mine = _mine.current()
    try:
        wanted = _everyones(mine)
    except Exception:  # no registry to reach (Ray not started here, an actor refused): this process's alone
        wanted = mine
    request_resources(bundles=[{k: float(v) for k, v in b.items() if v} for b in wanted])


def _everyones(mine: Bundles) -> Bundles:
    import ray

    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised")
    ctx = ray.get_runtime_context()
    if _mine.token is None or _mine.token[0] != ctx.gcs_address:
        _mine.token = (ctx.gcs_address, ray.put(None))
    # on the head, which never scales down: an actor on a worker node would keep that node from going idle
    registry = ray.remote(RequestRegistry).options(name=REGISTRY_NAME, namespace=NAMESPACE, lifetime="detached",
                                                   get_if_exists=True, num_cpus=0,
                                                   resources={"node:__internal_head__": 0.001})  # fmt: skip
    return ray.get(registry.remote().publish.remote(ctx.get_job_id(), [_mine.token[1]], mine), timeout=30)
