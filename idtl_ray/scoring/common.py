"""What the scoring stages share: the sample arrays, how a worker turns them into model input, the
worker's device set-up, and the result types."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import IdtlError, InputError
from ..influence import SolveInfo


@dataclass
class ArraySet:
    """Samples as arrays: ``x`` (uint8 NHWC images, or float model inputs), ``y`` int64, stable ``ids``."""

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray

    def __post_init__(self) -> None:
        self.y = np.asarray(self.y, dtype=np.int64)
        self.ids = np.asarray(self.ids, dtype=np.int64)
        if not (len(self.x) == len(self.y) == len(self.ids)):
            raise InputError(f"x, y and ids differ in length ({len(self.x)}, {len(self.y)}, {len(self.ids)})")
        if len(np.unique(self.ids)) != len(self.ids):  # scores are merged by id: a duplicate would lose a sample
            raise InputError("sample ids must be unique: give every sample its own id")

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Preprocess:
    """How a worker turns a batch of ``x`` into model input: normalise uint8 NHWC, or pass floats through.

    On a GPU the uint8 batch is pinned, copied without blocking and normalised on the device (a quarter
    of the bytes of a float batch cross the bus, and the CPU does no per-pixel work). On the CPU it is
    exactly :func:`idtl_ray.data.to_tensor`, so scores match the in-process engine bit for bit.
    """

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __call__(self, x: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
        device = device or torch.device("cpu")
        if self.mean is None:
            return torch.as_tensor(np.ascontiguousarray(x)).to(device)
        if device.type != "cuda":
            from ..data import to_tensor

            return to_tensor(x, self.mean, self.std)
        return self.normalise(self.unit(x, device))

    def unit(self, x: np.ndarray, device: torch.device) -> torch.Tensor:
        """uint8 NHWC -> float NCHW in [0, 1] on ``device`` (the step before augmenting and normalising)."""
        if x.ndim != 4:
            raise InputError(f"expected uint8 images (N,H,W,C), got shape {x.shape}")
        return to_device(torch.from_numpy(np.ascontiguousarray(x)), device).permute(0, 3, 1, 2).float().div_(255.0)

    def normalise(self, t: torch.Tensor) -> torch.Tensor:
        """(t - mean) / std in place, on ``t``'s device; NCHW-contiguous."""
        m, s = self._stats(t.device)
        return t.sub_(m).div_(s).contiguous()

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Kept on the device: a fresh host-to-device copy per batch would block the stream each time.
        cached = self.__dict__.get("_on_device")
        if cached is None or cached[0] != device:
            cached = (device, torch.tensor(self.mean, device=device).view(1, -1, 1, 1),
                      torch.tensor(self.std, device=device).view(1, -1, 1, 1))
            self.__dict__["_on_device"] = cached
        return cached[1], cached[2]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; to a GPU from pinned memory without blocking, so the copy overlaps the
    work already queued on the stream (the caching host allocator keeps the pinned block until then)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def worker_device() -> torch.device:
    """CUDA when Ray gave this worker a GPU, else the CPU.

    A worker Ray gave no GPU must not take one it can see: on a GPU node it would share a device Ray
    hands to another worker (a CPU actor on cuda:0 beside the GPU actor that owns it).
    """
    import ray

    if ray.is_initialized() and not ray.get_gpu_ids():
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup_worker(threads: int) -> torch.device:
    """Set a worker's torch threads and, on a GPU, TF32 matmuls and cuDNN autotuning; return its device.

    TF32 keeps the scores in float32 storage and accumulation (design.md §2 rules out bf16, not TF32);
    autotuning pays off because every batch of a run has the same shape.
    """
    torch.set_num_threads(max(1, threads))
    device = worker_device()
    fast_cuda_math(device)
    return device


def fast_cuda_math(device: torch.device) -> None:
    """On a GPU: TF32 matmuls and convolutions, and cuDNN autotuning (no-op on a CPU)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def device_batch_size(batch_size: int, gpu: bool, image_px: int = 0) -> int:
    """Scoring batch for the device: a GPU is only busy with large batches, so small images (up to 64 px)
    are scored at least 1,024 at a time; large images keep the configured batch (their activations
    bound the memory), and so does a CPU, which is not faster with bigger batches."""
    return max(batch_size, 1024) if gpu and 0 < image_px <= 64 else batch_size


def unwrap_ray_error(error: BaseException) -> BaseException:
    """The user-facing error inside a Ray task or actor error (its own type and text), else ``error``."""
    from ray.exceptions import RayTaskError

    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, IdtlError) and type(e).__module__.startswith("idtl_ray"):
            return e
        cause = getattr(e, "cause", None)
        if isinstance(e, RayTaskError) and isinstance(cause, BaseException) and not isinstance(cause, RayTaskError):
            if not isinstance(cause, IdtlError):
                return cause  # a task's own exception (a bug, or torch's OOM): its type and text, no Ray wrapper
        e = cause if isinstance(cause, BaseException) else e.__cause__
    return error


@dataclass
class PipelineResult:
    """Scores aligned with the training set's order, and how they were made."""

    scores: np.ndarray
    solve: SolveInfo
    n_val: int
    timings: dict[str, float]
    shards_reused: int = 0
    samples_scored: int = 0
    actors: int = 1
    device: str = "cpu"


@dataclass
class ScoreOutput:
    """What :func:`idtl_ray.score` returns."""

    scores: np.ndarray
    keep: np.ndarray
    solve: SolveInfo
    timings: dict[str, float] = field(default_factory=dict)
    mask_path: Path | None = None


def _get(ref_or_value: Any) -> Any:
    import ray

    # Ray Data does not resolve ObjectRefs passed through fn_constructor_kwargs (ray-2.60-notes §1.2).
    return ray.get(ref_or_value) if isinstance(ref_or_value, ray.ObjectRef) else ref_or_value
