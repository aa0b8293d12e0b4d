"""Paper Table 5 (section 4.4): non-uniform test sets CIFAR-10+ / CIFAR-100+, validation reference = class A.

Full mode follows Table 2's recipe for ResNet-50 and DenseNet-121, scores against the validation samples of
class A only, and evaluates on CIFAR-10+ (91 x 100 flipped/rotated class-A images + 9 x 100) and CIFAR-100+
(901 x 10 + 99 x 10). Needs CIFAR under --data-dir and the ImageNet weights in the torch cache.

Usage (local; --smoke runs a tiny variant on offline data (digits, Debian's dataset-fashion-mnist), same code path, < 5 min on 2 CPUs):
    python jobs/table5.py --smoke --out /tmp/smoke

On a cluster (see cluster.yaml; results and data on the shared EFS mount):
    ray job submit --working-dir . -- python jobs/table5.py --data-dir /mnt/cluster_storage/data \\
        --out /mnt/cluster_storage/results --seeds 0 1 2

Writes <out>/table5.md (the paper's layout, its numbers beside ours), <out>/table5.json, <out>/table5.png
and <out>/table5_curves.png; run directories under <out>/table5/
(<out>/table5-smoke/ with --smoke). Running it again resumes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Import this checkout's idtl_ray (inside a Ray job: the uploaded working_dir), not another installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

import ray  # noqa: E402

from idtl_ray import experiments as E  # noqa: E402

if __name__ == "__main__":
    sys.exit(E.job_main(5, __doc__, init=ray.init))
