"""Batch augmentation on the device (issue 12 item 3): the same recipes and pixels as torchvision's
per-sample transforms, and the precision a fine-tuning run resolves to. CPU only, no Ray."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

from idtl_ray import data as D
from idtl_ray.data.augment import BatchAugment, warp
from idtl_ray.errors import DataError
from idtl_ray.finetune.worker import _autocast, resolve_precision


def _images(n: int = 8, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    """Random images on the 8-bit grid in [0, 1], as a worker holds them before normalising."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g).float().div_(255.0)


def _torchvision_affine(img: torch.Tensor, translate: list[int], scale: float = 1.0,
                        shear: float = 0.0) -> torch.Tensor:  # fmt: skip
    # RandomAffine's call: angle 0, nearest, fill 0 for every channel
    return TF.affine(img, angle=0.0, translate=translate, scale=scale, shear=[shear, 0.0],
                     interpolation=T.InterpolationMode.NEAREST, fill=[0.0] * img.shape[0])  # fmt: skip


@pytest.mark.parametrize("hw", [(32, 32), (24, 40)])
def test_forced_flip_and_shift_equal_torchvision_exactly(hw: tuple[int, int]) -> None:
    x = _images(h=hw[0], w=hw[1])
    n = len(x)
    ones = torch.ones(n)
    got = warp(x.flip(-1), torch.full((n,), 2.0), torch.full((n,), -1.0), ones)
    want = torch.stack([_torchvision_affine(TF.hflip(s), [2, -1]) for s in x])
    assert torch.equal(got, want)
    assert not torch.equal(got, x)  # the shift did move pixels (and filled the edge with zeros)
    assert (got[..., :, :2] == 0).all() and (got[..., -1:, :] == 0).all()


@pytest.mark.parametrize("shift, scale, shear", [((0, 0), 1.15, 8.0), ((3, -2), 0.85, -11.0)])
def test_zoom_and_shear_match_torchvision_up_to_rounding_ties(shift: tuple[int, int], scale: float,
                                                              shear: float) -> None:  # fmt: skip
    """Scale and shear move pixel centres off the grid: nearest may break a tie the other way, rarely."""
    x = _images(n=4)
    n = len(x)
    got = warp(x, torch.full((n,), float(shift[0])), torch.full((n,), float(shift[1])), torch.full((n,), scale),
               torch.full((n,), shear))  # fmt: skip
    want = torch.stack([_torchvision_affine(s, list(shift), scale=scale, shear=shear) for s in x])
    mismatch = (got != want).float().mean()
    assert mismatch < 0.001, mismatch


def test_identity_parameters_return_the_input_bit_for_bit() -> None:
    x = _images(h=28, w=20)
    n = len(x)
    assert torch.equal(warp(x, torch.zeros(n), torch.zeros(n), torch.ones(n), torch.zeros(n)), x)
    assert torch.equal(BatchAugment()(x), x)  # an empty recipe draws nothing and copies nothing


def _shifts_of(src: torch.Tensor, out: torch.Tensor, m: int) -> np.ndarray:
    """Per image, the integer (dx, dy) with |dx|, |dy| <= m that moves ``src`` onto ``out`` (zeros shifted
    in), or (99, 99); a zero-padded crop is the reference, independent of both affine implementations."""
    h, w = src.shape[-2:]
    padded = torch.nn.functional.pad(src, (m, m, m, m))
    found = np.full((len(src), 2), 99)
    for dx in range(-m, m + 1):
        for dy in range(-m, m + 1):
            moved = padded[..., m - dy:m - dy + h, m - dx:m - dx + w]
            found[(moved == out).flatten(1).all(1).numpy()] = dx, dy
    return found


def test_draws_flip_half_the_time_and_shift_by_integers_within_bounds() -> None:
    aug = D.batch_augmentation("cifar10")
    g = torch.Generator().manual_seed(1)
    x = _images(n=2000, h=20, w=20, seed=3)  # 20 px: shifts within +-2 px
    out = aug(x, g)
    plain, mirrored = _shifts_of(x, out, 2), _shifts_of(x.flip(-1), out, 2)
    flipped = mirrored[:, 0] != 99
    assert ((plain[:, 0] != 99) != flipped).all()  # every output is one integer shift of one of the two
    assert 900 <= flipped.sum() <= 1100  # p = 0.5: 1000 +- 4.5 sigma
    dx, dy = np.where(flipped[:, None], mirrored, plain).T
    for d in (dx, dy):
        assert set(d) == {-2, -1, 0, 1, 2}  # both signs, the bound reached, never passed
        # round(uniform(-2, 2)): +-2 only from |u| >= 1.5, half as often as +-1
        assert 0.35 < (np.abs(d) == 2).mean() / (np.abs(d) == 1).mean() < 0.65


def test_draws_follow_the_generator_and_the_scale_range() -> None:
    aug = D.batch_augmentation("cats-vs-dogs")
    x = _images(n=16)
    a = aug(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(6)))
    s = BatchAugment._uniform(10_000, 0.8, 1.2, x, torch.Generator().manual_seed(0))
    assert 0.8 <= s.min() < 0.81 and 1.19 < s.max() <= 1.2


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "cats-vs-dogs", "folder:/any", "digits", "mnist",
                                  "mnist-5k", "emnist-letters", "fashion-mnist", "npz:/any.npz"])  # fmt: skip
def test_every_recipe_is_the_per_sample_recipe(name: str) -> None:
    """The same kind of augmentation as torchvision's recipe for each dataset: which transforms, which ranges."""
    per_sample, batch = D.augmentation(name), D.batch_augmentation(name)
    assert (per_sample is None) == (batch is None)
    if per_sample is None:
        return
    steps = per_sample.transforms if isinstance(per_sample, T.Compose) else [per_sample]
    flips = [t for t in steps if isinstance(t, T.RandomHorizontalFlip)]
    (affine,) = [t for t in steps if isinstance(t, T.RandomAffine)]
    assert batch.flip == bool(flips) and all(t.p == 0.5 for t in flips)
    assert list(affine.degrees) == [0.0, 0.0]
    assert batch.translate == (affine.translate[0] if affine.translate else 0.0)
    assert affine.translate is None or affine.translate[0] == affine.translate[1]
    assert batch.scale == (tuple(affine.scale) if affine.scale else None)
    assert batch.shear_deg == pytest.approx(affine.shear[1] if affine.shear else 0.0)
    assert affine.shear is None or list(affine.shear) == [-batch.shear_deg, batch.shear_deg]
    assert affine.interpolation == T.InterpolationMode.NEAREST and affine.fill == 0


def test_a_prepared_directory_gets_the_recipe_of_its_dataset(tmp_path: Path) -> None:
    data = D.load_dataset("digits")
    for name, want in (("digits", None), ("svhn", BatchAugment(translate=0.1))):  # svhn: a renamed copy
        out = tmp_path / name
        D.write_prepared(replace(data, name=name), D.make_split(replace(data, name=name), 0.1, seed=0), str(out))
        assert D.batch_augmentation(str(out)) == want and (D.augmentation(str(out)) is None) == (want is None)
    with pytest.raises(DataError, match="unknown dataset"):
        D.batch_augmentation("imagenet")
    assert math.isclose(D.batch_augmentation("folder:x").shear_deg, math.degrees(0.2))


def test_precision_auto_is_bf16_on_gpus_and_fp32_on_cpus() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("auto", cpu) is None and resolve_precision("fp32", cpu) is None
    assert resolve_precision("auto", cuda) is torch.bfloat16 and resolve_precision("fp32", cuda) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    conv, x = torch.nn.Conv2d(3, 4, 3), torch.rand(2, 3, 8, 8)
    with _autocast(cpu, resolve_precision("bf16", cpu)):
        assert conv(x).dtype == torch.bfloat16  # the worker's context really autocasts on a CPU
    with _autocast(cpu, resolve_precision("auto", cpu)):
        assert conv(x).dtype == torch.float32
