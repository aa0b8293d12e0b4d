"""Paper Table 1 (section 4.1): EMNIST-letters sample-CNN -> MNIST; scratch / model-based / instance-based, 1 epoch each.

Full mode pre-trains sample-cnn on emnist-letters (2 epochs, Adam 1e-3, batch 128), scores MNIST and
trains each strategy for 1 epoch. Needs EMNIST and MNIST under --data-dir.

Usage (local; --smoke runs a tiny variant on offline data (digits, Debian's dataset-fashion-mnist), same code path, < 5 min on 2 CPUs):
    python jobs/table1.py --smoke --out /tmp/smoke

On a cluster (see cluster.yaml; results and data on the shared EFS mount):
    ray job submit --working-dir . -- python jobs/table1.py --data-dir /mnt/cluster_storage/data \\
        --out /mnt/cluster_storage/results --seeds 0 1 2

Writes <out>/table1.md (the paper's layout, its numbers beside ours), <out>/table1.json, <out>/table1.png
and <out>/table1_curves.png; run directories under <out>/table1/
(<out>/table1-smoke/ with --smoke). Running it again resumes.
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
    sys.exit(E.job_main(1, __doc__, init=ray.init))
