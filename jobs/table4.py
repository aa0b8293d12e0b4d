"""Paper Table 4 (section 4.3): ImageNet shallow layers -> SVHN (ResNet-50 first 10, DenseNet-121 first 31 layers).

Full mode: hybrid init (first K layers from ImageNet, rest Xavier), fine-tune 20 / 26 epochs, batch 128 / 64,
x0.1 at 50%; scratch 40 epochs. Needs SVHN under --data-dir and the ImageNet weights in the torch cache.

Usage (local; --smoke runs a tiny variant on offline data (digits, Debian's dataset-fashion-mnist), same code path, < 5 min on 2 CPUs):
    python jobs/table4.py --smoke --out /tmp/smoke

On a cluster (see cluster.yaml; results and data on the shared EFS mount):
    ray job submit --working-dir . -- python jobs/table4.py --data-dir /mnt/cluster_storage/data \\
        --out /mnt/cluster_storage/results --seeds 0 1 2

Writes <out>/table4.md (the paper's layout, its numbers beside ours), <out>/table4.json, <out>/table4.png
and <out>/table4_curves.png; run directories under <out>/table4/
(<out>/table4-smoke/ with --smoke). Running it again resumes.
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
    sys.exit(E.job_main(4, __doc__, init=ray.init))
