"""CIFAR-10+ / CIFAR-100+ (paper 4.4): a test set dominated by flipped or rotated copies of one class A,
plus a few untransformed images of every other class."""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from .specs import PlusSpec


def plus_counts(num_classes: int, total: int = 10_000) -> tuple[int, int, int]:
    """(rounds, per_round, per_other) of paper 4.4: 10 classes -> (91, 100, 100); 100 -> (901, 10, 10)."""
    per = max(1, total // num_classes // 10)  # 10% of a uniform share: 100 of 1,000 per class, 10 of 100
    rounds = (total - (num_classes - 1) * per) // per
    return rounds, per, per


def _rotate(x: np.ndarray, degrees: np.ndarray) -> np.ndarray:
    """Rotate uint8 NHWC images about their centre by per-image angles (bilinear, black corners)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float()
    rad = torch.as_tensor(np.deg2rad(degrees), dtype=torch.float32)
    cos, sin = torch.cos(rad), torch.sin(rad)
    theta = torch.zeros(len(x), 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(theta, list(t.shape), align_corners=False)
    r = F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return r.round().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def build_cifar_plus(test_x: np.ndarray, test_y: np.ndarray, num_classes: int, class_a: int, seed: int, *,
                     rounds: int | None = None, per_round: int | None = None, per_other: int | None = None,
                     max_degrees: float = 15.0, min_degrees: float = 5.0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The non-uniform test set of paper 4.4, built from a uniform test set (uint8 NHWC images).

    ``rounds`` times, draw ``per_round`` distinct class-A test images and add each one horizontally
    flipped or rotated by ``min_degrees``..``max_degrees`` either way (chosen per image); then add
    ``per_other`` distinct untransformed test images of every other class. Defaults follow the paper:
    CIFAR-10+ = 91 x 100 + 9 x 100, CIFAR-100+ = 901 x 10 + 99 x 10 (10,000 images each).
    Deterministic for a seed. Returns ``(x, y)``: class-A copies first, then the other classes.
    """
    x = np.asarray(test_x)
    y = np.asarray(test_y).astype(np.int64)
    if x.ndim == 3:
        x = x[..., None]
    if x.dtype != np.uint8 or x.ndim != 4 or len(x) != len(y):
        raise DataError(f"build_cifar_plus needs uint8 (N,H,W,C) images and N labels, got {x.dtype} {x.shape} "
                        f"and {y.shape}; pass the raw test arrays")  # fmt: skip
    if not 0 <= class_a < num_classes:
        raise DataError(f"class A = {class_a} is outside 0..{num_classes - 1}; pick one of the dataset's classes")
    d_rounds, d_per, d_other = plus_counts(num_classes)
    rounds, per_round, per_other = rounds or d_rounds, per_round or d_per, per_other or d_other
    rng = np.random.default_rng(seed)
    pool_a = np.flatnonzero(y == class_a)
    if len(pool_a) < per_round:
        raise DataError(f"class {class_a} has {len(pool_a)} test images but each round draws {per_round}; "
                        f"lower per_round or use the full test set")  # fmt: skip
    picks = np.concatenate([rng.choice(pool_a, per_round, replace=False) for _ in range(rounds)])
    flip = rng.random(len(picks)) < 0.5
    angles = rng.uniform(min_degrees, max_degrees, len(picks)) * rng.choice([-1.0, 1.0], len(picks))
    xa = x[picks].copy()
    xa[flip] = xa[flip][:, :, ::-1]
    rot = ~flip
    if rot.any():
        xa[rot] = _rotate(xa[rot], angles[rot])
    xs, ys = [xa], [np.full(len(xa), class_a, np.int64)]
    for c in range(num_classes):
        if c == class_a:
            continue
        pool = np.flatnonzero(y == c)
        if len(pool) < per_other:
            raise DataError(f"class {c} has {len(pool)} test images but {per_other} are needed; "
                            f"lower per_other or use the full test set")  # fmt: skip
        xs.append(x[np.sort(rng.choice(pool, per_other, replace=False))])
        ys.append(np.full(per_other, c, np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def pick_class_a(plus: PlusSpec, num_classes: int, seed: int) -> int:
    """Class A of a seed: the spec's, else drawn from the seed (paper: 'we randomly choose a class')."""
    if plus.class_a is not None:
        return int(plus.class_a)
    return int(np.random.default_rng([seed, 4_4]).integers(num_classes))
