"""Paper Table 6 (section 4.5): ImageNet -> Cats vs Dogs (1000+1000 train), all conv frozen, new 2-class FC.

Full mode: model-based and instance-based, batch 16, ResNet-50 50 epochs, DenseNet-121 60, x0.1 at 50%,
hflip / zoom / shear 0.2. Needs <data-dir>/cats-vs-dogs/{train,val,test}/{cat,dog}/ and the ImageNet weights.

Usage (local; --smoke runs a tiny variant on offline data (digits, Debian's dataset-fashion-mnist), same code path, < 5 min on 2 CPUs):
    python jobs/table6.py --smoke --out /tmp/smoke

On a cluster (see cluster.yaml; results and data on the shared EFS mount):
    ray job submit --working-dir . -- python jobs/table6.py --data-dir /mnt/cluster_storage/data \\
        --out /mnt/cluster_storage/results --seeds 0 1 2

Writes <out>/table6.md (the paper's layout, its numbers beside ours), <out>/table6.json, <out>/table6.png
and <out>/table6_curves.png; run directories under <out>/table6/
(<out>/table6-smoke/ with --smoke). Running it again resumes.
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
    sys.exit(E.job_main(6, __doc__, init=ray.init))
