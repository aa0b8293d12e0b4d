"""Joining or starting Ray for a command."""

from __future__ import annotations

import logging
import os
from typing import Any


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join a running cluster, or start an embedded local Ray, unless Ray is up already.

    ``address`` given: join it. ``RAY_ADDRESS`` set (inside `ray job submit`): join that. Otherwise
    start a fresh local Ray, never attaching by accident to another instance on the machine.
    """
    import ray

    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if ray.is_initialized():
        return
    global _JOINED, _EMBEDDED_GCS
    from ..cli_common import check_ray_address

    check_ray_address(address)  # an unreachable host:port fails in seconds, not after minutes of retries
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Tune's new console output prints a boxed configuration and TensorBoard hints even at verbose=0;
    # our Tune runs (--drop auto, sweep) print their own progress lines
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR"}
    if address:
        kwargs["address"] = address
    elif not os.environ.get("RAY_ADDRESS"):
        kwargs.update(local_ray_options(num_cpus))
    ray.init(**kwargs)
    _JOINED = kwargs.get("address") != "local"
    _EMBEDDED_GCS = None if _JOINED else ray.get_runtime_context().gcs_address


_JOINED = False
_EMBEDDED_GCS: str | None = None  # the embedded local Ray this process started, while it runs


def runs_embedded_ray() -> bool:
    """Whether the Ray this process is connected to is the embedded local Ray :func:`ensure_ray` started
    (not a cluster, and not a Ray the caller started with its own ``ray.init``)."""
    import ray

    return ray.is_initialized() and _EMBEDDED_GCS == ray.get_runtime_context().gcs_address


def drop_embedded_ray() -> bool:
    """After an interruption, shut down the embedded local Ray this process started (True if it did).

    Ray cancels an interrupted run's tasks with a KeyboardInterrupt raised in their workers; one that lands
    inside ``logging``'s module lock leaves it held in a worker Ray keeps, and a resume in this process
    that reuses that worker hangs (seen in CI: the pre-scoring task's read threads blocked on the lock).
    The next run then starts a fresh embedded Ray. A Ray the caller started is theirs to manage.
    """
    import ray

    if not runs_embedded_ray():
        return False
    ray.shutdown()
    return True


def local_ray_options(num_cpus: int | None = None) -> dict[str, Any]:
    """``ray.init`` arguments of an embedded local Ray (the tests' sessions use them too).

    Ray keeps one idle worker process per CPU. While the scoring actors hold every CPU, each short
    Ray Data task (a Parquet writer takes no CPU, a decode task a quarter) would then start a fresh
    Python worker that exits a second later: ~90 starts for 45,000 images, eating half the CPU the
    actors need (docs/benchmarks.md). Keeping as many idle workers as such tasks can run at once ends that.
    """
    from ..data.samples import READ_CPUS

    cpus = num_cpus or os.cpu_count() or 1
    options: dict[str, Any] = {"address": "local",
                               "_system_config": {"num_workers_soft_limit": int(cpus / READ_CPUS) + 4}}
    if num_cpus:
        options["num_cpus"] = num_cpus
    return options


def joined_cluster() -> bool:
    """Whether :func:`ensure_ray` joined an existing cluster (an address, or ``RAY_ADDRESS``, which
    ``ray job submit`` sets for its entrypoint) instead of starting the embedded local Ray."""
    return _JOINED or bool(os.environ.get("RAY_ADDRESS"))


# Lines Ray's C++ core prints at error level for conditions that are not errors in our use. Ray Data
# passes every pool actor's constructor arguments by reference, so each run logs this one once
# (ray-project/ray#57733); our actors' arguments stay referenced by the pipeline for its whole life.
# Ray Train's PreemptionWatcher logs it too. The GCS logs a failed kill when it ends an actor whose
# worker has already exited (a finished Train worker group, a drained pool): nothing is left to kill.
KNOWN_RAY_NOISE = (b"has constructor arguments in the object store and max_restarts > 0",
                   b"KillActor RPC failed for actor",
                   # the raylet's hint when many workers start: what our small-CPU read tasks and the idle
                   # workers kept for them (local_ray_options) are meant to do; nothing a user can act on
                   b"the maximum expected startup concurrency")
_filtering = False


def filter_ray_noise(patterns: tuple[bytes, ...] = KNOWN_RAY_NOISE) -> None:
    """Drop Ray's known-harmless error lines from this process's stderr (the CLI installs it once).

    C++ writes straight to file descriptor 2, so the filter sits there: a pipe whose reader thread
    forwards every other line unchanged, and hands fd 2 back at exit.
    """
    global _filtering
    if _filtering:
        return
    import atexit
    import threading

    real = os.dup(2)
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)

    def pump() -> None:
        rest = b""
        while chunk := os.read(r, 65536):
            *lines, rest = (rest + chunk).split(b"\n")
            out = b"".join(ln + b"\n" for ln in lines if not any(p in ln for p in patterns))
            # a partial line that is no Ray log line (nor one relayed from a worker, which starts with a
            # colour code) is passed on now: progress lines end in \r, not \n
            if rest and not rest.startswith((b"[", b"\x1b[")):
                out, rest = out + rest, b""
            try:
                if out:
                    os.write(real, out)
            except OSError:  # the reader went away (`| head`): keep draining, or every writer would block
                pass
        if rest:
            os.write(real, rest)

    thread = threading.Thread(target=pump, name="idtl-stderr", daemon=True)
    thread.start()
    import faulthandler

    faulthandler.enable(file=real)  # a crash's report goes straight to the terminal, not into the pipe

    def restore() -> None:
        import sys

        sys.stderr.flush()
        os.dup2(real, 2)  # closes our end of the pipe: the reader drains what is left and stops
        thread.join(1.0)

    atexit.register(restore)
    _filtering = True


def stop_on_sigterm() -> None:
    """SIGTERM (``ray job stop``, a scheduler, ``kill``) ends the command as Ctrl-C does: its ``finally``
    blocks run, so no temporary file stays; the autoscaler request is withdrawn first, at once. Python's default
    for SIGTERM is to exit at once, skipping them. Main thread only, where Python delivers signals."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum: int, frame: object) -> None:
        # withdraw the autoscaler request before anything else: `ray job stop` kills the whole process
        # tree 3 s after its SIGTERM (RAY_JOB_STOP_WAIT_TIME_S), before slow finally blocks (Ray Data's
        # shutdown, Ray Train's abort) reach theirs, and a request left standing keeps GPU nodes up
        from .. import resources

        t = threading.Thread(target=resources.release, name="idtl-release", daemon=True)
        t.start()
        t.join(2.0)  # a GCS that does not answer must not keep the command from ending
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
