"""The body of every ``jobs/tableN.py``: its argument parser, resources and main."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

from ..errors import IdtlError, InputError
from .files import preflight
from .report import render_markdown
from .runner import Resources, run_table


def job_parser(n: int, doc: str | None = None) -> Any:
    """The argparse parser every ``jobs/tableN.py`` uses (same flags for all six tables)."""
    import argparse

    p = argparse.ArgumentParser(prog=f"jobs/table{n}.py", description=(doc or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="Tiny variant on offline data: digits and Debian's dataset-fashion-mnist (< 5 min on 2 CPUs).")
    p.add_argument("--data-dir", default=None, help="Dataset root (default $IDTL_DATA_DIR or ~/.cache/idtl-ray/data; "
                   "on the cluster e.g. /mnt/cluster_storage/data).")  # fmt: skip
    p.add_argument("--out", default="results", help="Results directory (on the cluster use shared storage, e.g. "
                   "/mnt/cluster_storage/results: a job's working dir is deleted afterwards).")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="Seeds (mean and std reported with several).")
    for f in dataclasses.fields(Resources):  # declared once, in Resources: None = the table's default
        kind = int if "int" in str(f.type) else float
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None, help=f.metadata["help"])
    return p


def resources_from_args(args: Any) -> Resources:
    """Resources.default(smoke) with the job's overrides (``--gpus`` first: it sets workers and GPUs)."""
    res = Resources.default(bool(args.smoke))
    gpus = getattr(args, "gpus", None)
    if gpus is not None:
        res.declare_gpus(gpus, args.workers, args.gpus_per_worker)
    set_by_gpus = {"gpus"} if gpus is None else {"gpus", "workers", "gpus_per_worker"}
    for f in dataclasses.fields(Resources):
        if f.name not in set_by_gpus and getattr(args, f.name, None) is not None:
            setattr(res, f.name, getattr(args, f.name))
    if res.workers < 1 or res.cpus_per_worker <= 0 or res.gpus_per_worker < 0:
        raise InputError("--workers must be >= 1, --cpus-per-worker > 0 and --gpus-per-worker >= 0")
    if res.score_actors is not None and res.score_actors < 1:
        raise InputError(f"--score-actors must be >= 1, got {res.score_actors}")
    return res


def job_main(table: int, doc: str | None, init: Callable[[], Any], argv: list[str] | None = None) -> int:
    """Body of every ``jobs/tableN.py``: parse, check the files, ``init()`` Ray, run, print; 2 on a user error.

    ``init`` is the job script's plain ``ray.init`` (inside ``ray job submit`` it joins the cluster through
    RAY_ADDRESS, else it starts a local Ray); it runs only after the preflight found every file.
    """
    from ..scoring.session import filter_ray_noise, stop_on_sigterm

    args = job_parser(table, doc).parse_args(argv)
    filter_ray_noise()  # as the CLI: Ray's known-harmless error lines stay out of the job's log
    stop_on_sigterm()  # `ray job stop`: the runs' finally blocks withdraw the GPU request
    from ..cli_common import check_ray_address, ray_start_error

    try:
        if any(seed < 0 for seed in args.seeds):
            raise InputError(f"--seeds must be >= 0, got {args.seeds}")
        resources = resources_from_args(args)
        preflight(table, args.smoke, args.data_dir)  # missing data or weights fail here, before Ray starts
        check_ray_address(os.environ.get("RAY_ADDRESS"))  # an unreachable cluster in seconds, not minutes
        try:
            init()
        except Exception as e:  # Ray failing to start or to join: one line, as the CLI
            if (line := ray_start_error(e)) is None:
                raise
            raise InputError(line) from None
        result = run_table(table, args.smoke, args.data_dir, args.out, args.seeds, resources)
    except IdtlError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished runs are saved; run the same job again to resume", file=sys.stderr)
        return 130
    print(render_markdown(result))
    print(f"wrote {', '.join(result['files'].values())}")
    return 0
