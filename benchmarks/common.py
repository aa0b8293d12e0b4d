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


class CpuAccount:
    """CPU-seconds spent by every process of this machine while the block runs, by kind (Linux ``/proc``).

    Samples every process's user + system time a few times a second, so a process that starts and
    exits between two samples is missed and one that exits loses its last fraction of a second: a
    lower bound, good to within ~0.3 s per process. ``kind(cmdline)`` names a process's group; this
    process is counted separately, exactly (``time.process_time``). Use as ``with CpuAccount(kind) as
    acc: ...``, then ``acc.seconds`` (kind → CPU-seconds).
    """

    def __init__(self, kind: Callable[[str], str], every_s: float = 0.25):
        self.kind, self.every_s = kind, every_s
        self.seconds: dict[str, float] = {}

    @staticmethod
    def _snapshot() -> dict[int, tuple[str, float]]:
        tick, out = os.sysconf("SC_CLK_TCK"), {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # it exited between listdir and the read
                continue
            out[int(pid)] = (cmd, (int(stat[11]) + int(stat[12])) / tick)
        return out

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self._last.update(self._snapshot())

    def __enter__(self) -> CpuAccount:
        import threading

        self._base = self._snapshot()
        self._last = dict(self._base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._own = time.process_time()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        own = time.process_time() - self._own
        self._stop.set()
        self._thread.join()
        self._last.update(self._snapshot())
        me, totals = os.getpid(), {"this process (driver)": own}
        for pid, (cmd, cpu) in self._last.items():
            if pid != me:
                name = self.kind(cmd)
                totals[name] = totals.get(name, 0.0) + cpu - self._base.get(pid, (cmd, 0.0))[1]
        self.seconds = {k: v for k, v in sorted(totals.items(), key=lambda kv: -kv[1]) if v > 0.05}
