"""Training augmentation for a whole batch on the worker's device.

:func:`idtl_ray.data.augmentation` returns torchvision transforms that run per sample on the CPU:
at GPU speed the CPU, not the GPU, becomes the bottleneck. :class:`BatchAugment` is the same recipe
applied to a float (N, C, H, W) batch wherever it lives: per-sample parameters drawn as torchvision's
``RandomHorizontalFlip`` and ``RandomAffine`` draw them, the flip by one ``torch.where`` and the
affine part by ONE batched ``affine_grid`` + ``grid_sample`` (nearest, zero fill: ``RandomAffine``'s
defaults). :func:`batch_augmentation` maps a dataset name to its recipe, mirroring
:func:`~idtl_ray.data.augmentation` (its docstring holds the table of recipes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import DataError
from .arrays import _DIGIT_SETS, recipe_name


@dataclass(frozen=True)
class BatchAugment:
    """One dataset's augmentation recipe, applied per batch (flip first, then the affine part, as Compose).

    ``flip``: horizontal flip with probability 0.5. ``translate``: integer pixel shifts uniform within
    +-``translate`` x the image's width (x) and height (y). ``scale``: zoom uniform in (lo, hi), or None.
    ``shear_deg``: x-shear angle uniform in +-``shear_deg`` degrees (0 = none).
    """

    flip: bool = False
    translate: float = 0.0
    scale: tuple[float, float] | None = None
    shear_deg: float = 0.0

    @property
    def affine(self) -> bool:
        """Whether the recipe has an affine part (a batch needs ``grid_sample`` at all)."""
        return self.translate > 0 or self.scale is not None or self.shear_deg > 0

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a float (N, C, H, W) batch in [0, 1]: fresh parameters per sample, drawn from ``generator``
        (which must live on ``x``'s device; None: torch's default generator of that device)."""
        n = x.shape[0]
        if self.flip:
            flip = self._uniform(n, 0.0, 1.0, x, generator) < 0.5  # RandomHorizontalFlip: rand(1) < p
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if not self.affine:
            return x
        h, w = x.shape[-2:]
        tx, ty = self._shifts(n, w, h, x, generator)
        scale = self._uniform(n, *self.scale, x, generator) if self.scale else torch.ones_like(tx)
        shear = self._uniform(n, -self.shear_deg, self.shear_deg, x, generator) if self.shear_deg > 0 else None
        return warp(x, tx, ty, scale, shear)

    def _shifts(self, n: int, w: int, h: int, x: torch.Tensor,
                g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Integer pixel shifts (x, y) as RandomAffine.get_params: round(uniform(-max, max)), max = translate x size."""
        if self.translate <= 0:
            zero = torch.zeros(n, dtype=x.dtype, device=x.device)
            return zero, zero
        max_dx, max_dy = self.translate * w, self.translate * h
        # torch.round rounds halves to even, as Python's round() in torchvision does
        return (torch.round(self._uniform(n, -max_dx, max_dx, x, g)),
                torch.round(self._uniform(n, -max_dy, max_dy, x, g)))  # fmt: skip

    @staticmethod
    def _uniform(n: int, lo: float, hi: float, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        # drawn in float32 on x's device: no host round trip, and the generator's device decides where
        u = torch.rand(n, generator=g, device=x.device, dtype=torch.float32)
        return (lo + (hi - lo) * u).to(x.dtype)


def warp(x: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, scale: torch.Tensor,
         shear_deg: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Per-sample ``torchvision.transforms.functional.affine`` (angle 0, centre of the image, nearest,
    fill 0) for a whole batch: shifts ``tx``/``ty`` in pixels, ``scale``, x-shear in degrees; each (N,).

    torchvision samples output pixel p (centred pixel coordinates) at M^-1 (p - t), with
    M^-1 = [[1, tan(shear)], [0, 1]] / scale; ``affine_grid`` works in coordinates normalised by half
    the size, so the x/y cross term is rescaled by h/w and the shifts by 2/size.
    """
    n, _, h, w = x.shape
    inv = 1.0 / scale
    tan = torch.tan(torch.deg2rad(shear_deg)) if shear_deg is not None else torch.zeros_like(scale)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = inv
    theta[:, 0, 1] = inv * tan * (h / w)
    theta[:, 0, 2] = (-inv * tx - inv * tan * ty) * (2.0 / w)
    theta[:, 1, 1] = inv
    theta[:, 1, 2] = -inv * ty * (2.0 / h)
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


_CIFAR = BatchAugment(flip=True, translate=0.1)


def batch_augmentation(name: str) -> BatchAugment | None:
    """The batch form of :func:`idtl_ray.data.augmentation`'s recipe for dataset ``name`` (same table,
    same errors): None where that gives None."""
    name = recipe_name(name)
    if name in ("cifar10", "cifar100"):
        return _CIFAR
    if name == "svhn":
        return BatchAugment(translate=0.1)
    if name == "cats-vs-dogs" or name.startswith("folder:"):
        return BatchAugment(flip=True, scale=(0.8, 1.2), shear_deg=math.degrees(0.2))  # Keras 1: 0.2 rad
    if name in _DIGIT_SETS or name.startswith("npz:"):
        return None
    from .readers import is_prepared_location, read_manifest  # lazy: both build on the arrays module
    from .registry import DATASETS

    if is_prepared_location(name):  # a prepared directory: the recipe of the dataset it holds
        return batch_augmentation(read_manifest(name).dataset)
    raise DataError(f"no augmentation recipe for unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
