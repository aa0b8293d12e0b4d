"""Paper Table 2 (section 4.2): ImageNet -> CIFAR-10 / CIFAR-100 with VGG-16, ResNet-50, DenseNet-121.

Full mode: fine-tune 100 epochs (DenseNet-121 150), scratch 200 (300), batch 128 (64), Adam 1e-3 x0.1
at 50%, hflip + translation. Needs CIFAR under --data-dir and torchvision's ImageNet weights in the torch cache.

Usage (local; --smoke runs a tiny variant on offline data (digits, Debian's dataset-fashion-mnist), same code path, < 5 min on 2 CPUs):
    python jobs/table2.py --smoke --out /tmp/smoke

On a cluster (see cluster.yaml; results and data on the shared EFS mount):
    ray job submit --working-dir . -- python jobs/table2.py --data-dir /mnt/cluster_storage/data \\
        --out /mnt/cluster_storage/results --seeds 0 1 2

Writes <out>/table2.md (the paper's layout, its numbers beside ours), <out>/table2.json, <out>/table2.png
and <out>/table2_curves.png; run directories under <out>/table2/
(<out>/table2-smoke/ with --smoke). Running it again resumes.
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
    sys.exit(E.job_main(2, __doc__, init=ray.init))
