"""Paper Table 3 (section 4.2): ResNet-50 on CIFAR-10 with the first 20 / 30 / 40 layers frozen, 90 epochs.

Full mode trains model-based and instance-based per frozen count (the paper does not say which it used).
Needs CIFAR-10 under --data-dir and the ResNet-50 ImageNet weights in the torch cache.

Usage (local; --smoke runs a tiny variant on offline data (digits, Debian's dataset-fashion-mnist), same code path, < 5 min on 2 CPUs):
    python jobs/table3.py --smoke --out /tmp/smoke

On a cluster (see cluster.yaml; results and data on the shared EFS mount):
    ray job submit --working-dir . -- python jobs/table3.py --data-dir /mnt/cluster_storage/data \\
        --out /mnt/cluster_storage/results --seeds 0 1 2

Writes <out>/table3.md (the paper's layout, its numbers beside ours), <out>/table3.json, <out>/table3.png
and <out>/table3_curves.png; run directories under <out>/table3/
(<out>/table3-smoke/ with --smoke). Running it again resumes.
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
    sys.exit(E.job_main(3, __doc__, init=ray.init))
