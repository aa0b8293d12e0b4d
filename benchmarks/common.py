"""Shared helpers for the benchmarks: real CIFAR-10 images when ../shared has them, timing by ratio."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

CIFAR_NPZ = Path(os.environ.get("IDTL_CIFAR_NPZ", Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10_jpegbytes.npz"))


def load_cifar_jpeg(n: int, split: str = "train", path: Path = CIFAR_NPZ, seed: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """``n`` images of the CIFAR-10 JPEG file, drawn at random (seeded), as uint8 (n,32,32,3) and labels.

    The file is sorted by class, so the first ``n`` would hold only a few classes. None if absent.
    """
    if not path.exists():
        return None
    from PIL import Image

    z = np.load(path)
    data, offs, y = z[f"{split}_jpeg"], z[f"{split}_offsets"], z[f"y_{split}"]
    idx = np.random.default_rng(seed).permutation(len(y))[: min(n, len(y))]
    x = np.stack([np.asarray(Image.open(io.BytesIO(data[offs[i]:offs[i + 1]].tobytes())).convert("RGB")) for i in idx])
    return x, y[idx].astype(np.int64)


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Minimum wall time of ``repeats`` calls after one warm-up (the least noisy estimate on shared CPUs)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
