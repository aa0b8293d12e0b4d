"""Shared fixtures: one small local Ray session per test module that needs one (ray-2.60-notes §6)."""

from __future__ import annotations

import os

# Before `import ray` anywhere: quiet, no usage stats, no token auth for throwaway local clusters.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

# Datasets given by name are prepared into a cache (idtl_ray.data.cache): the suite's own, removed at the
# end, so that it neither fills the user's ~/.cache/idtl-ray with its throwaway files nor depends on
# what is there. Set IDTL_CACHE_DIR to keep one across runs.
if "IDTL_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["IDTL_CACHE_DIR"] = tempfile.mkdtemp(prefix="idtl-test-cache-")
    atexit.register(shutil.rmtree, os.environ["IDTL_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def ray_session():
    """A 2-CPU local Ray for the module, shut down afterwards.

    ``address="local"``: always a fresh Ray of its own. Without it, ``ray.init`` joins any cluster
    registered on the machine (``ray start --head`` records itself in ``/tmp/ray/ray_current_cluster``,
    dead or alive) and refuses ``num_cpus`` there.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _start_local_ray()
    yield ray
    ray.shutdown()


def _start_local_ray() -> None:
    import ray

    from idtl_ray.scoring.session import local_ray_options

    ray.init(**local_ray_options(2), object_store_memory=400 * 1024**2, log_to_driver=False, include_dashboard=True,
             logging_level="ERROR")


@pytest.fixture()
def fresh_ray_after(ray_session):
    """For a test that kills or interrupts Ray's workers: the module's Ray is restarted after it.

    Ray Data ends an interrupted or failed run by cancelling its tasks, with a KeyboardInterrupt raised in
    the worker. One that lands inside ``logging``'s module lock leaves it held in a worker that Ray keeps and
    reuses: a later read task's threads then block on it forever (seen once in CI: a ListFiles task stuck in
    ``import fsspec`` -> ``logging.getLogger``, the test timed out). Fresh workers keep the faults apart.
    """
    yield ray_session
    import ray

    ray.shutdown()
    _start_local_ray()
