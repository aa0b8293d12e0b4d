"""The stderr filter that keeps Ray's known-harmless error lines off the terminal (CLI and jobs)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_known_lines_are_dropped_even_when_split_and_the_rest_passes_unchanged() -> None:
    # written straight to fd 2 as Ray's C++ core does; the relayed worker line arrives in two pieces
    script = textwrap.dedent(r'''
        import os, sys, time
        sys.path.insert(0, sys.argv[1])
        from idtl_ray.scoring.session import filter_ray_noise
        filter_ray_noise()
        relayed = (b"\x1b[36m(TrainController pid=1)\x1b[0m [2026-12-02 14:07:32,952 E 1 2] core_worker.cc:2465: "
                   b"Actor with class name: 'PreemptionWatcher' has constructor arguments in the object store "
                   b"and max_restarts > 0. See ray#53727\n")
        os.write(2, relayed[:40]); time.sleep(0.3); os.write(2, relayed[40:])
        os.write(2, b"[2026 E 3 3] gcs_actor_scheduler.cc:538: Failed to kill actor, KillActor RPC failed for actor 1\n")
        os.write(2, b"\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started on node: 71b8 with "
                    b"address: 192.0.2.2, which is 4x the maximum expected startup concurrency (2). This could be\n")
        os.write(2, b"[2026 E 4 4] a real error\n")
        os.write(2, b"progress 50%\r"); time.sleep(0.3); os.write(2, b"progress 100%\n")
    ''')
    r = subprocess.run([sys.executable, "-c", script, str(ROOT)], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b"[2026 E 4 4] a real error\nprogress 50%\rprogress 100%\n"
