"""The paper's six experiments (Tables 1-6) as data, and one runner per table (what `jobs/` call).

Each table is a :class:`TableSpec`: the target datasets, models, epochs, batch sizes, schedules, frozen
layers, hybrid init and FC-only training of docs/design.md section 4, plus the paper's reported test errors.
``table_spec(n, smoke=True)`` is a tiny variant on small offline data (sample-cnn on 8x8 digits,
1 epoch, a source model pre-trained for 1 epoch on a Fashion-MNIST subset standing in for ImageNet /
EMNIST) that runs exactly the same code path as the full table.

Stages of :func:`run_table` (per seed, per setting):
  1. source    pre-train the source model when the table has one (Table 1; every smoke table)
  2. score     ``workflow.run_score``: influence of every training sample at the adapted pre-trained
               model; Table 5 scores against the validation samples of class A only
  3. train     ``finetune.run_finetune`` per strategy (scratch / model-based / instance-based), with the
               setting's freezing (Tables 3, 6) or hybrid init (Table 4)
  4. evaluate  Table 5 only: the final models on the CIFAR-10+/CIFAR-100+ test set (:func:`build_cifar_plus`)
  5. report    ``<out>/tableN.md`` (paper layout, paper numbers beside ours), ``tableN.json`` (every
               setting, seed and number; mean/std over seeds), ``tableN.png`` (test error per strategy)
               and ``tableN_curves.png`` (test error per epoch), all written atomically

Run directories live under ``<out>/tableN/seed<S>/<setting>/``; running the same command again reuses
finished scores and runs (both stages resume).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import DataError, IdtlError, InputError, WeightsError
from .storage import save_figure_atomic, save_npz_atomic, write_json_atomic, write_text_atomic

STRATEGY_TITLES = {"scratch": "from Scratch", "model": "Model-based TL", "instance": "Instance-based TL"}
PAPER_MODEL_NAMES = {"sample-cnn": "sample-CNN", "vgg16": "VGG-16", "resnet50": "ResNet-50", "densenet121": "DenseNet-121"}


class ExperimentError(IdtlError, RuntimeError):
    """A table cannot be set up or run (unknown table, bad seeds, a test set that cannot be built)."""


# ── Settings as data ──────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class SourceSpec:
    """A source model the table pre-trains itself (Table 1: EMNIST-letters; smoke: a stand-in for ImageNet)."""

    dataset: str = field(metadata={"help": "Source dataset (registry name)."})
    model: str = field(metadata={"help": "Architecture; the same one every setting of the table fine-tunes."})
    epochs: int = field(metadata={"help": "Pre-training epochs (paper Table 1: 2)."})
    batch_size: int = field(default=128, metadata={"help": "Mini-batch size (paper: 128)."})
    image_size: int | None = field(default=None, metadata={"help": "Resize the source images (None: native size)."})
    classes: tuple[int, ...] | None = field(default=None, metadata={"help": "Keep only these source classes (smoke: fewer classes than the target, so a new head is fitted as with ImageNet)."})
    max_train: int | None = field(default=None, metadata={"help": "Keep at most this many training images (smoke)."})
    via_ray: bool = field(default=True, metadata={"help": "Pre-train with Ray Train (finetune.pretrain), or in-process when the model only stands in for a downloaded weights file (smoke of Tables 2-6)."})


@dataclass(frozen=True)
class PlusSpec:
    """The non-uniform test set of paper 4.4 (CIFAR-10+ / CIFAR-100+); None counts follow the paper."""

    rounds: int | None = field(default=None, metadata={"help": "Rounds of class-A draws (paper: 91 for CIFAR-10, 901 for CIFAR-100)."})
    per_round: int | None = field(default=None, metadata={"help": "Class-A test images drawn per round (paper: 100 / 10)."})
    per_other: int | None = field(default=None, metadata={"help": "Untransformed test images of every other class (paper: 100 / 10)."})
    max_degrees: float = field(default=15.0, metadata={"help": "Largest rotation of a class-A copy (the paper does not say; 15 degrees)."})
    class_a: int | None = field(default=None, metadata={"help": "Class A (None: drawn from the seed, as the paper 'randomly chooses a class')."})


@dataclass(frozen=True)
class Setting:
    """One cell group of a paper table: a target dataset and a model, trained with each strategy."""

    key: str = field(metadata={"help": "Unique name inside the table; also the run directory name."})
    paper_model: str = field(metadata={"help": "Model as the paper's table names it (row label)."})
    paper_column: str = field(metadata={"help": "Dataset column of the paper's table (e.g. CIFAR-10+)."})
    dataset: str = field(metadata={"help": "Target dataset actually used (registry name or npz:PATH)."})
    model: str = field(metadata={"help": "Architecture actually used."})
    weights: str = field(metadata={"help": "imagenet, or 'source' for the table's own pre-trained source model."})
    epochs: int = field(metadata={"help": "Fine-tuning epochs of the model and instance strategies."})
    batch_size: int = field(metadata={"help": "Mini-batch size (paper: 128; 64 for DenseNet-121; 16 in Table 6)."})
    scratch_epochs: int | None = field(default=None, metadata={"help": "Epochs from scratch (paper: 2x fine-tuning); None: no scratch arm."})
    strategies: tuple[str, ...] = field(default=("scratch", "model", "instance"), metadata={"help": "Strategies to train."})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate (paper: 1e-3)."})
    lr_drop_at: float = field(default=0.5, metadata={"help": "lr x0.1 from this fraction of the epochs (paper: 0.5; 1 = never, Table 1)."})
    freeze: int | None = field(default=None, metadata={"help": "Freeze the first N layers (Table 3)."})
    freeze_conv: bool = field(default=False, metadata={"help": "Train only the FC layers (Table 6)."})
    hybrid_init: int | None = field(default=None, metadata={"help": "Load only the first K layers, Xavier the rest (Table 4)."})
    image_size: int | None = field(default=None, metadata={"help": "Resize the target images (None: native; folder datasets: 64)."})
    augment: bool = field(default=True, metadata={"help": "Use the dataset's training augmentation (CIFAR: hflip + translation)."})
    plus: PlusSpec | None = field(default=None, metadata={"help": "Table 5: evaluate on a CIFAR+ style test set, score against class A only."})
    row: str = field(default="", metadata={"help": "Extra row label (Table 3: the frozen-layer count)."})
    paper: dict[str, float] = field(default_factory=dict, metadata={"help": "Paper test error (%) per strategy; key '*' when the paper names no strategy."})

    def score_key(self) -> str:
        """Settings that share this key share one influence score (it does not depend on freezing)."""
        return f"{self.dataset.rsplit('/', 1)[-1]}-{self.model}-{self.image_size or 'native'}"


@dataclass(frozen=True)
class TableSpec:
    """One paper table: its settings, the source model it pre-trains (if any) and how to lay it out."""

    number: int = field(metadata={"help": "Table number in the paper."})
    title: str = field(metadata={"help": "What the table shows."})
    section: str = field(metadata={"help": "Paper section."})
    columns: tuple[str, ...] = field(metadata={"help": "Dataset columns of the paper's table, in order."})
    settings: tuple[Setting, ...] = field(metadata={"help": "Every setting the table trains."})
    paper_rows: tuple[tuple[str, str, str, dict[str, float]], ...] = field(default=(), metadata={"help": "(strategy or '*', model, row, {column: paper error}) rows of the paper's table, all of them (smoke runs fewer)."})
    source: SourceSpec | None = field(default=None, metadata={"help": "Source model to pre-train (None: ImageNet weights)."})
    smoke: bool = field(default=False, metadata={"help": "Tiny variant on offline data (numbers not comparable with the paper)."})
    analogue: str = field(default="", metadata={"help": "A real-data analogue at a smaller scale: what it runs instead of the paper's setting (one paragraph)."})
    notes: tuple[str, ...] = field(default=(), metadata={"help": "What the table's protocol leaves open and how it is settled here."})
    selection: str = field(default="paper", metadata={"help": "paper: the paper's score and rule (the jobs); default: idtl-ray's defaults (self-influence, --drop auto)."})


def _paper_rows(models: tuple[str, ...], columns: tuple[str, ...], numbers: dict[str, dict[str, tuple[float, ...]]],
                strategies: tuple[str, ...] = ("scratch", "model", "instance")) -> tuple[tuple[str, str, str, dict[str, float]], ...]:  # fmt: skip
    """Rows (strategy, model, '', {column: error}) from {strategy: {model: (error per column)}}."""
    return tuple((s, m, "", dict(zip(columns, numbers[s][m]))) for s in strategies for m in models)


def _cifar_settings(datasets: tuple[tuple[str, str], ...], models: tuple[str, ...],
                    numbers: dict[str, dict[str, tuple[float, ...]]], plus: dict[str, PlusSpec] | None = None) -> tuple[Setting, ...]:  # fmt: skip
    """Paper 4.2 recipe: fine-tune 100 epochs (DenseNet 150), scratch 200 (300), batch 128 (64), x0.1 at 50%."""
    epochs = {"vgg16": 100, "resnet50": 100, "densenet121": 150}
    batch = {"vgg16": 128, "resnet50": 128, "densenet121": 64}
    out = []
    for ci, (ds, col) in enumerate(datasets):
        for m in models:
            out.append(Setting(
                key=f"{ds}/{m}", paper_model=PAPER_MODEL_NAMES[m], paper_column=col, dataset=ds, model=m,
                weights="imagenet", epochs=epochs[m], scratch_epochs=2 * epochs[m], batch_size=batch[m],
                plus=(plus or {}).get(ds), paper={s: numbers[s][PAPER_MODEL_NAMES[m]][ci] for s in numbers},
            ))  # fmt: skip
    return tuple(out)


_T2 = {  # paper Table 2: {strategy: {model: (CIFAR-10, CIFAR-100)}}
    "scratch": {"VGG-16": (7.81, 28.82), "ResNet-50": (6.93, 27.59), "DenseNet-121": (4.98, 21.19)},
    "model": {"VGG-16": (7.14, 28.01), "ResNet-50": (6.20, 26.90), "DenseNet-121": (4.23, 20.72)},
    "instance": {"VGG-16": (5.01, 25.29), "ResNet-50": (4.11, 24.17), "DenseNet-121": (2.45, 18.67)},
}
_T4 = {"scratch": {"ResNet-50": (2.12,), "DenseNet-121": (1.83,)}, "model": {"ResNet-50": (2.03,), "DenseNet-121": (1.72,)},
       "instance": {"ResNet-50": (1.35,), "DenseNet-121": (1.12,)}}  # fmt: skip
_T5 = {"scratch": {"ResNet-50": (7.05, 28.75), "DenseNet-121": (5.02, 21.97)},
       "model": {"ResNet-50": (6.35, 28.12), "DenseNet-121": (4.41, 21.03)},
       "instance": {"ResNet-50": (4.18, 25.87), "DenseNet-121": (2.80, 19.26)}}  # fmt: skip
_T6 = {"model": {"ResNet-50": (5.01,), "DenseNet-121": (4.64,)}, "instance": {"ResNet-50": (3.38,), "DenseNet-121": (3.17,)}}
_T3 = {20: 10.27, 30: 12.08, 40: 13.98}
TABLE3_FROZEN = (20, 30, 40)
TABLE4_HYBRID = {"resnet50": 10, "densenet121": 31}
_NOTE_AUG_T5 = ("Models train on the registry dataset with its augmentation and are evaluated on the CIFAR+ "
                "test set afterwards (the library's npz: datasets carry no augmentation).")  # fmt: skip


def _full_tables() -> dict[int, TableSpec]:
    t1 = TableSpec(
        1, "Warm-up: EMNIST-letters CNN -> MNIST", "4.1", ("MNIST",),
        settings=(Setting(key="mnist/sample-cnn", paper_model="sample-CNN", paper_column="MNIST", dataset="mnist",
                          model="sample-cnn", weights="source", epochs=1, scratch_epochs=1, batch_size=128,
                          lr_drop_at=1.0, augment=False, paper={"scratch": 1.37, "model": 1.09, "instance": 0.47}),),
        paper_rows=_paper_rows(("sample-CNN",), ("MNIST",), {"scratch": {"sample-CNN": (1.37,)},
                                                               "model": {"sample-CNN": (1.09,)},
                                                               "instance": {"sample-CNN": (0.47,)}}),
        source=SourceSpec("emnist-letters", "sample-cnn", epochs=2, batch_size=128),
        notes=("No lr schedule in 4.1: lr stays 1e-3 (lr_drop_at=1).",),
    )  # fmt: skip
    t2 = TableSpec(
        2, "ImageNet -> CIFAR-10 / CIFAR-100, global fine-tuning", "4.2", ("CIFAR-10", "CIFAR-100"),
        settings=_cifar_settings((("cifar10", "CIFAR-10"), ("cifar100", "CIFAR-100")), ("vgg16", "resnet50", "densenet121"), _T2),
        paper_rows=_paper_rows(("VGG-16", "ResNet-50", "DenseNet-121"), ("CIFAR-10", "CIFAR-100"), _T2),
    )  # fmt: skip
    t3_settings = tuple(
        Setting(key=f"cifar10/resnet50/frozen{n}", paper_model="ResNet-50", paper_column="CIFAR-10", dataset="cifar10",
                model="resnet50", weights="imagenet", epochs=90, batch_size=128, strategies=("model", "instance"),
                freeze=n, row=str(n), paper={"*": _T3[n]})
        for n in TABLE3_FROZEN
    )  # fmt: skip
    t3 = TableSpec(
        3, "ImageNet -> CIFAR-10, ResNet-50 with the first layers frozen (local fine-tuning)", "4.2", ("CIFAR-10",),
        settings=t3_settings, paper_rows=tuple(("*", "ResNet-50", str(n), {"CIFAR-10": _T3[n]}) for n in TABLE3_FROZEN),
        notes=("The paper does not say which strategy Table 3 uses; both model- and instance-based are run.",),
    )  # fmt: skip
    t4 = TableSpec(
        4, "ImageNet shallow layers -> SVHN (hybrid init: first K layers loaded, rest Xavier)", "4.3", ("SVHN",),
        settings=(
            Setting(key="svhn/resnet50", paper_model="ResNet-50", paper_column="SVHN", dataset="svhn", model="resnet50",
                    weights="imagenet", epochs=20, scratch_epochs=40, batch_size=128, hybrid_init=TABLE4_HYBRID["resnet50"],
                    paper={s: _T4[s]["ResNet-50"][0] for s in _T4}),
            Setting(key="svhn/densenet121", paper_model="DenseNet-121", paper_column="SVHN", dataset="svhn",
                    model="densenet121", weights="imagenet", epochs=26, scratch_epochs=40, batch_size=64,
                    hybrid_init=TABLE4_HYBRID["densenet121"], paper={s: _T4[s]["DenseNet-121"][0] for s in _T4}),
        ),
        paper_rows=_paper_rows(("ResNet-50", "DenseNet-121"), ("SVHN",), _T4),
        notes=("Influence is scored with the whole ImageNet model (new head fitted), as the paper estimates it "
               "with the pre-trained models; model/instance then fine-tune the hybrid-initialised network.",),
    )  # fmt: skip
    t5 = TableSpec(
        5, "Non-uniform test sets CIFAR-10+ / CIFAR-100+ (validation reference = class A)", "4.4",
        ("CIFAR-10+", "CIFAR-100+"),
        settings=_cifar_settings((("cifar10", "CIFAR-10+"), ("cifar100", "CIFAR-100+")), ("resnet50", "densenet121"), _T5,
                                 plus={"cifar10": PlusSpec(), "cifar100": PlusSpec()}),
        paper_rows=_paper_rows(("ResNet-50", "DenseNet-121"), ("CIFAR-10+", "CIFAR-100+"), _T5),
        notes=(_NOTE_AUG_T5,),
    )  # fmt: skip
    t6 = TableSpec(
        6, "ImageNet -> Cats vs Dogs (1000+1000 train), all conv frozen, new 2-class FC", "4.5", ("Cats vs Dogs",),
        settings=(
            Setting(key="cats-vs-dogs/resnet50", paper_model="ResNet-50", paper_column="Cats vs Dogs", dataset="cats-vs-dogs",
                    model="resnet50", weights="imagenet", epochs=50, batch_size=16, strategies=("model", "instance"),
                    freeze_conv=True, paper={s: _T6[s]["ResNet-50"][0] for s in _T6}),
            Setting(key="cats-vs-dogs/densenet121", paper_model="DenseNet-121", paper_column="Cats vs Dogs",
                    dataset="cats-vs-dogs", model="densenet121", weights="imagenet", epochs=60, batch_size=16,
                    strategies=("model", "instance"), freeze_conv=True, paper={s: _T6[s]["DenseNet-121"][0] for s in _T6}),
        ),
        paper_rows=_paper_rows(("ResNet-50", "DenseNet-121"), ("Cats vs Dogs",), _T6, ("model", "instance")),
        notes=("The paper gives no image size; the library's folder default (64x64) is used. Validation = the "
               "shipped 400+400 val/ folder.",),
    )  # fmt: skip
    return {t.number: t for t in (t1, t2, t3, t4, t5, t6)}


# Smoke: the same tables on data that ships with the environment. A 6-class Fashion-MNIST subset at 8x8
# stands in for the source domain (ImageNet / EMNIST-letters): its class count differs from the targets',
# so scoring fits a new head exactly as with ImageNet weights. Targets are scikit-learn's 8x8 digits.
SMOKE_SOURCE = SourceSpec("fashion-mnist", "sample-cnn", epochs=1, batch_size=128, image_size=8,
                          classes=(0, 1, 2, 3, 4, 5), max_train=3000)  # fmt: skip
SMOKE_TARGET = "digits"
SMOKE_FROZEN = (2, 3, 4)  # of sample-cnn's 6 layers, standing in for 20/30/40 of ResNet-50's 54
SMOKE_HYBRID = 2
SMOKE_PLUS = PlusSpec(rounds=10, per_round=20, per_other=10)  # digits' test split has ~36 images per class
SMOKE_BINARY_CLASSES = (3, 8)  # Table 6 stand-in: a 2-class target with a shipped validation split


def _smoke_tables(full: dict[int, TableSpec]) -> dict[int, TableSpec]:
    """One setting per paper column (sample-cnn on 8x8 digits, 1 epoch), same fields as the full table."""

    def small(s: Setting, **kw: Any) -> Setting:
        base = dict(dataset=SMOKE_TARGET, model="sample-cnn", weights="source", epochs=1, batch_size=64,
                    scratch_epochs=2 if s.scratch_epochs else None, image_size=None, augment=True)  # fmt: skip
        base.update(kw)
        # e.g. "digits-as-cifar10-resnet50": what ran, and which paper setting it stands in for
        return replace(s, key=f"{base['dataset']}-as-{s.key.replace('/', '-')}", **base)

    out: dict[int, TableSpec] = {}
    t = full[1]
    out[1] = replace(t, settings=(small(t.settings[0], scratch_epochs=1),))
    t = full[2]  # the ResNet-50 / CIFAR-10 cell only: a second setting (mnist-5k@8 for CIFAR-100) doubled the
    # time to ~5 min on 2 CPUs, and its CG solve did not converge after a 1-epoch source (residual 1.14)
    out[2] = replace(t, settings=(small(t.settings[1]),))
    t = full[3]
    out[3] = replace(t, settings=tuple(small(s, freeze=k, row=f"{s.row} (smoke {k} of 6)")
                                       for s, k in zip(t.settings, SMOKE_FROZEN)))  # fmt: skip
    t = full[4]
    out[4] = replace(t, settings=(small(t.settings[0], hybrid_init=SMOKE_HYBRID),))
    t = full[5]
    out[5] = replace(t, settings=(small(t.settings[0], plus=SMOKE_PLUS),))
    t = full[6]
    out[6] = replace(t, settings=(small(t.settings[0], dataset="smoke-binary", batch_size=16),),
                     notes=t.notes + (f"Smoke: 'smoke-binary' = digits {SMOKE_BINARY_CLASSES[0]} vs "
                                      f"{SMOKE_BINARY_CLASSES[1]} (train, a shipped 20% val split, test), standing in "
                                      f"for cats vs dogs.",))  # fmt: skip
    # Table 1 pre-trains its source in full mode too, so its smoke does it the same way (Ray Train);
    # elsewhere the source stands in for ImageNet weights, which are a file, not a training run.
    return {n: replace(v, smoke=True, source=SMOKE_SOURCE if n == 1 else replace(SMOKE_SOURCE, via_ray=False))
            for n, v in out.items()}


_FULL = _full_tables()
_SMOKE = _smoke_tables(_FULL)


def table_spec(n: int, smoke: bool = False) -> TableSpec:
    """The settings of paper Table ``n`` (1-6): full (docs/design.md section 4) or the smoke variant."""
    table = (_SMOKE if smoke else _FULL).get(int(n))
    if table is None:
        raise ExperimentError(f"there is no Table {n}: the paper's experiments are Tables 1-6")
    return table


# ── CIFAR-10+ / CIFAR-100+ (paper 4.4) ────────────────────────────────────────────────────────────


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


# ── Data and weights: preflight and smoke files ───────────────────────────────────────────────────


def _source_npz(src: SourceSpec, data_dir: str | None, cache: Path) -> str:
    """The source dataset name to pre-train on: the registry name, or an npz subset (smoke)."""
    from . import data as D

    if src.classes is None and src.max_train is None:
        return src.dataset
    path = cache / f"source-{src.dataset}-{src.image_size or 'native'}-{len(src.classes or ())}c-{src.max_train}.npz"
    if not path.is_file():
        d = D.load_dataset(src.dataset, data_dir, download=False, image_size=src.image_size)
        keep_tr = np.flatnonzero(np.isin(d.train.y, src.classes)) if src.classes else np.arange(len(d.train))
        keep_te = np.flatnonzero(np.isin(d.test.y, src.classes)) if src.classes else np.arange(len(d.test))
        keep_tr = keep_tr[: src.max_train] if src.max_train else keep_tr
        keep_te = keep_te[: max(1, len(keep_tr) // 5)]
        remap = {c: i for i, c in enumerate(src.classes or range(d.num_classes))}  # labels must be 0..K-1
        relabel = np.vectorize(remap.__getitem__, otypes=[np.int64])
        save_npz_atomic(path, x_train=d.train.x[keep_tr], y_train=relabel(d.train.y[keep_tr]),
                        x_test=d.test.x[keep_te], y_test=relabel(d.test.y[keep_te]))  # fmt: skip
    return f"npz:{path}"


def _binary_npz(data_dir: str | None, cache: Path) -> str:
    """Table 6 smoke target: two digit classes, train / shipped val / test (like cats-vs-dogs' folders)."""
    from . import data as D

    path = cache / f"smoke-binary-{SMOKE_BINARY_CLASSES[0]}v{SMOKE_BINARY_CLASSES[1]}.npz"
    if not path.is_file():
        d = D.load_dataset(SMOKE_TARGET, data_dir, download=False)
        a, b = SMOKE_BINARY_CLASSES

        def pick(arr: Any) -> tuple[np.ndarray, np.ndarray]:
            sel = np.flatnonzero(np.isin(arr.y, (a, b)))
            return arr.x[sel], (arr.y[sel] == b).astype(np.int64)

        xtr, ytr = pick(d.train)
        xte, yte = pick(d.test)
        tr, va = D.split_train_val(len(ytr), 0.2, seed=0, labels=ytr)
        save_npz_atomic(path, x_train=xtr[tr], y_train=ytr[tr], x_val=xtr[va], y_val=ytr[va], x_test=xte, y_test=yte,
                        classes=np.array([str(a), str(b)]))  # fmt: skip
    return f"npz:{path}"


def resolve_dataset(s: Setting, data_dir: str | None, cache: Path) -> str:
    """The dataset name the library loads for a setting (smoke stand-ins become npz: files)."""
    return _binary_npz(data_dir, cache) if s.dataset == "smoke-binary" else s.dataset


def _check_imagenet(model: str) -> None:
    """ImageNet weights must already be in torch's cache: no download from inside a job."""
    from urllib.parse import urlparse

    import torch

    from .models import _imagenet_enum

    url = _imagenet_enum(model).url
    fname = os.path.basename(urlparse(url).path)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    if not (cache / fname).is_file():
        raise WeightsError(f"ImageNet weights for {model} not found: put {fname} (from {url}) into {cache}/ "
                           f"($TORCH_HOME/hub/checkpoints) on the head node before running the full table")  # fmt: skip


_PREFLIGHT_OK: set[tuple[int, bool, str | None]] = set()


def preflight(n: int, smoke: bool = False, data_dir: str | None = None) -> TableSpec:
    """Check every dataset and weights file Table ``n`` needs, before Ray starts (fails in seconds)."""
    table = table_spec(n, smoke)
    if (n, smoke, data_dir) in _PREFLIGHT_OK:  # the job script already checked, before Ray started
        return table
    check_files(table, data_dir)
    _PREFLIGHT_OK.add((n, smoke, data_dir))
    return table


def check_files(table: TableSpec, data_dir: str | None = None) -> TableSpec:
    """Load every dataset of ``table`` from disk and find its ImageNet weights; returns ``table``.

    Datasets are read without downloading (``load_dataset(..., download=False)``), so a missing file
    fails with the library's one-line message naming the expected layout.
    """
    from . import data as D

    seen: set[tuple[str, int | None]] = set()
    needs = [(s.dataset, s.image_size) for s in table.settings if s.dataset != "smoke-binary"]
    if table.source is not None:
        needs.insert(0, (table.source.dataset, table.source.image_size))
    if any(s.dataset == "smoke-binary" for s in table.settings):
        needs.append((SMOKE_TARGET, None))
    for name, size in needs:
        if (name, size) not in seen:
            seen.add((name, size))
            D.load_dataset(name, data_dir, download=False, image_size=size)
    for model in sorted({s.model for s in table.settings if s.weights == "imagenet"}):
        _check_imagenet(model)
    return table


# ── Running a table ───────────────────────────────────────────────────────────────────────────────


@dataclass
class Resources:
    """Ray resources of the training and scoring stages."""

    workers: int = field(default=1, metadata={"help": "Ray Train workers (DDP ranks) per run (default 1)."})
    gpus_per_worker: float = field(default=0.0, metadata={"help": "GPUs per Train worker (default: 1 full, 0 smoke)."})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs per Train worker (default: 4 full, 1 smoke)."})
    score_actors: int | None = field(default=None, metadata={"help": "Scoring actors (default: one per GPU, else one per CPU up to 4 CPUs, then CPUs/2; smoke: 1)."})
    gpus: int = field(default=0, metadata={"help": "GPUs to run on: N Train workers and N scoring actors with one GPU each, asked of the autoscaler at start on a cluster (instead of --workers and --gpus-per-worker; 0: no GPU)."})

    @classmethod
    def default(cls, smoke: bool) -> Resources:
        """Smoke: one CPU worker (fits 2 CPUs beside Ray Data); full: one GPU worker with 4 CPUs."""
        return cls(1, 0.0, 1.0, 1) if smoke else cls(1, 1.0, 4.0, None)

    def declare_gpus(self, gpus: int, workers: int | None = None, gpus_per_worker: float | None = None) -> Resources:
        """``--gpus N``: N Train workers with one GPU each and N scoring actors (one GPU each); 0: no GPU.
        ``workers``/``gpus_per_worker``: what the job's flags also set (refused where they disagree)."""
        from .resources import gpu_workers

        self.gpus = gpus
        self.workers, self.gpus_per_worker = gpu_workers(gpus, workers, gpus_per_worker)
        if gpus:
            self.score_actors = None
        return self

    def bundles(self) -> list[dict[str, float]]:
        """What the autoscaler is asked for at start: one bundle per GPU Train worker (a scoring actor,
        0.5 CPU and one GPU, fits in one too); none for CPU-only runs."""
        from .resources import bundles_of

        return bundles_of(self.workers, self.cpus_per_worker, self.gpus_per_worker) if self.gpus_per_worker > 0 else []


_T0 = time.perf_counter()


def _cluster_address() -> str | None:
    """The cluster a job runs on (``RAY_ADDRESS``), handed to the stages as their ``address``.

    finetune's resource check treats ``address=None`` as "a local Ray" and refuses GPU workers the
    cluster does not have *yet*; on an autoscaling cluster (GPU workers min 0) they arrive on demand.
    """
    return os.environ.get("RAY_ADDRESS") or None


def _request_gpus(res: Resources, timeout_s: float = 900.0) -> None:
    """Ask the autoscaler for the GPU workers up front and wait for them (full tables on a cluster).

    The scoring stage picks GPU actors only when the cluster has GPUs at that moment; with GPU workers
    at min 0 it would otherwise score on CPU. The request stays until :func:`_release_gpus`.
    """
    import ray

    from .resources import request

    need = res.workers * res.gpus_per_worker
    have = ray.cluster_resources().get("GPU", 0.0)
    if need <= 0 or have >= need:
        return
    if _cluster_address() is None:  # a local Ray has no autoscaler to bring GPUs
        raise ExperimentError(f"{res.workers} workers x {res.gpus_per_worker:g} GPUs need {need:g} GPUs but this Ray has "
                              f"{have:g}; pass --gpus 0 (or --gpus-per-worker 0) or submit the job to a GPU cluster")  # fmt: skip
    request(res.bundles())
    _log(f"asked the autoscaler for {need:g} GPU(s); waiting for them to join the cluster (up to {timeout_s:.0f} s)")
    deadline = time.time() + timeout_s
    while (have := ray.cluster_resources().get("GPU", 0.0)) < need:
        if time.time() > deadline:
            raise ExperimentError(f"{have:g} of {need:g} GPU(s) joined the cluster within {timeout_s:.0f} s; check the "
                                  f"gpu_worker type and your EC2 GPU quota, or pass fewer --gpus")  # fmt: skip
        time.sleep(2)
    _log(f"{have:g} GPU(s) in the cluster")


def _release_gpus(res: Resources) -> None:
    """Withdraw the job's request (only a joined cluster has an autoscaler), so idle GPU workers can go."""
    if res.bundles() and _cluster_address() is not None:
        from .resources import release

        release()


def _log(msg: str) -> None:
    print(f"[experiments {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _arms(s: Setting) -> list[tuple[str, int]]:
    """(strategy, epochs) of every run of a setting."""
    return [(st, (s.scratch_epochs or s.epochs) if st == "scratch" else s.epochs) for st in s.strategies
            if st != "scratch" or s.scratch_epochs]  # fmt: skip


@dataclass
class _Context:
    table: TableSpec
    root: Path
    data_dir: str | None
    res: Resources
    cache: Path


def _pretrain_source(ctx: _Context, seed: int) -> str:
    from .finetune import pretrain

    src = ctx.table.source
    assert src is not None
    path = ctx.root / f"seed{seed}" / "source.pt"
    if path.is_file():
        return str(path)
    name = _source_npz(src, ctx.data_dir, ctx.cache)
    _log(f"seed {seed}: pre-training the source model ({src.model} on {src.dataset}, {src.epochs} epochs"
         f"{'' if src.via_ray else ', in-process'})")
    if not src.via_ray:
        _train_in_process(name, src, seed, path, ctx.data_dir)
        return str(path)
    pretrain(name, src.model, src.epochs, path, batch_size=src.batch_size, seed=seed, data_dir=ctx.data_dir,
             image_size=src.image_size if name == src.dataset else None, workers=ctx.res.workers,
             cpus_per_worker=ctx.res.cpus_per_worker, gpus_per_worker=ctx.res.gpus_per_worker,
             address=_cluster_address())  # fmt: skip
    return str(path)


def _train_in_process(name: str, src: SourceSpec, seed: int, path: Path, data_dir: str | None) -> None:
    """A small source model trained in this process (Xavier, Adam 1e-3, as pretrain), saved as a checkpoint."""
    import torch

    from . import data as D
    from . import models as M

    d = D.load_dataset(name, data_dir, download=False)
    h, _, c = d.image_shape
    torch.manual_seed(seed)
    model = M.build_model(src.model, d.num_classes, c, h)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(src.epochs):
        order = rng.permutation(len(d.train))
        for i in range(0, len(order), src.batch_size):
            idx = order[i:i + src.batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(D.to_tensor(d.train.x[idx], d.mean, d.std)),
                                                     torch.as_tensor(d.train.y[idx]))  # fmt: skip
            loss.backward()
            opt.step()
    M.save_checkpoint(path, model, {"dataset": d.name, "classes": list(d.classes),
                                    "dataset_fingerprint": d.fingerprint(), "epochs": src.epochs})  # fmt: skip


def _score(ctx: _Context, s: Setting, dataset: str, weights: str, seed: int, classes: list[int] | None) -> dict[str, Any]:
    from .config import ScoreConfig
    from .influence import InfluenceConfig
    from .workflow import run_score

    tag = "" if classes is None else "-classA" + "_".join(map(str, classes))
    out = ctx.root / f"seed{seed}" / f"score-{s.score_key()}{tag}"
    # The jobs reproduce the paper: its validation-influence score and its rule (drop every score < 0).
    # selection="default" runs idtl-ray's own defaults instead (self-influence, --drop auto).
    rule = ({"influence": InfluenceConfig(score="paper"), "drop": "paper"} if ctx.table.selection == "paper"
            else {"auto_epochs": max(1, s.epochs)})
    cfg = ScoreConfig(dataset=dataset, model=s.model, weights=weights, data_dir=ctx.data_dir, image_size=s.image_size,
                      **rule,  # type: ignore[arg-type]
                      target_classes=classes, seed=seed, out=str(out), resume=True, actors=ctx.res.score_actors,
                      gpus=ctx.res.gpus, address=_cluster_address())  # fmt: skip
    _log(f"seed {seed}: scoring {dataset} with {s.model} ({weights}){'' if classes is None else f' against class {classes}'}")
    summary = run_score(cfg, progress=False)
    return {"dir": str(out), "mask": summary["mask"], "n_train": summary["n_train"], "n_dropped": summary["n_dropped"],
            "validation_reference": summary.get("validation_reference"), "solve": summary.get("solve")}  # fmt: skip


def _evaluate(model_path: str, x: np.ndarray, y: np.ndarray, mean: Any, std: Any, gpus: float) -> float:
    """Test error (%) of a saved model on (x, y), in a Ray task (on a GPU worker when the run had one)."""
    import ray

    @ray.remote(num_cpus=1, num_gpus=gpus)
    def evaluate(path: str, x: np.ndarray, y: np.ndarray) -> float:
        import torch

        from idtl_ray import data as D  # absolute: this function is shipped to a Ray worker by value
        from idtl_ray.models import load_checkpoint

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, _ = load_checkpoint(path)
        model.to(device).eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(y), 512):
                logits = model(D.to_tensor(x[i:i + 512], mean, std).to(device))
                correct += int((logits.argmax(1).cpu().numpy() == y[i:i + 512]).sum())
        return 100.0 * (1.0 - correct / max(1, len(y)))

    return float(ray.get(evaluate.remote(model_path, x, y)))


def _run_setting(ctx: _Context, s: Setting, seed: int, weights: str) -> list[dict[str, Any]]:
    """Score, then train every strategy of one setting for one seed; one result row per run."""
    from . import data as D
    from .finetune import FinetuneConfig, run_finetune

    dataset = resolve_dataset(s, ctx.data_dir, ctx.cache)
    class_a = None
    plus_xy = None
    if s.plus is not None:
        data = D.load_dataset(dataset, ctx.data_dir, download=False, image_size=s.image_size)
        class_a = pick_class_a(s.plus, data.num_classes, seed)
        plus_xy = build_cifar_plus(data.test.x, data.test.y, data.num_classes, class_a, seed, rounds=s.plus.rounds,
                                   per_round=s.plus.per_round, per_other=s.plus.per_other, max_degrees=s.plus.max_degrees)  # fmt: skip
        plus_stats = (data.mean, data.std)
    score = _score(ctx, s, dataset, weights, seed, None if class_a is None else [class_a])
    rows = []
    for strategy, epochs in _arms(s):
        run_dir = ctx.root / f"seed{seed}" / s.key.replace("/", "-") / strategy
        cfg = FinetuneConfig(
            dataset=dataset, model=s.model, strategy=strategy, weights=weights,
            mask=score["mask"] if strategy == "instance" else None, split=str(Path(score["dir"]) / "split.json"),
            data_dir=ctx.data_dir, image_size=s.image_size, epochs=epochs, batch_size=s.batch_size, lr=s.lr,
            lr_drop_at=s.lr_drop_at, freeze=s.freeze, freeze_conv=s.freeze_conv,
            hybrid_init=s.hybrid_init if strategy != "scratch" else None, workers=ctx.res.workers,
            gpus_per_worker=ctx.res.gpus_per_worker, cpus_per_worker=ctx.res.cpus_per_worker, seed=seed,
            augment=s.augment, out=str(run_dir), address=_cluster_address(),
        )  # fmt: skip
        t = time.perf_counter()
        _log(f"seed {seed}: {s.key} {strategy} ({epochs} epochs)")
        final = run_finetune(cfg)
        row = {
            "setting": s.key, "seed": seed, "strategy": strategy, "row": s.row, "epochs": final["epochs"],
            "test_error": final["test_error"], "val_acc": final["val_acc"], "n_train_samples": final["n_train_samples"],
            "n_dropped_by_mask": score["n_dropped"], "n_scored": score["n_train"], "run_dir": str(run_dir),
            "mask": score["mask"], "train_s": round(time.perf_counter() - t, 1),
        }  # fmt: skip
        if plus_xy is not None:
            # the table's number is the CIFAR+ error; the uniform test error stays beside it
            row["uniform_test_error"] = row["test_error"]
            row["test_error"] = _evaluate(str(run_dir / "model.pt"), *plus_xy, *plus_stats, ctx.res.gpus_per_worker)
            row["class_a"] = class_a
            row["plus_test_size"] = int(len(plus_xy[1]))
        rows.append(row)
        _log(f"seed {seed}: {s.key} {strategy}: test error {row['test_error']:.2f}%")
    return rows


def run_table(n: int, smoke: bool = False, data_dir: str | None = None, out: str | Path = "results",
              seeds: list[int] | tuple[int, ...] = (0,), resources: Resources | None = None,
              spec: TableSpec | None = None) -> dict[str, Any]:  # fmt: skip
    """Run paper Table ``n`` for every seed and write ``<out>/tableN.{md,json,png}`` (+ ``_curves.png``).

    ``spec`` replaces the built-in settings of Table ``n`` (a real-data analogue, see
    ``benchmarks/real_analogues.py``). Needs a running Ray (a job's ``ray.init()``) or starts a local one
    through the stages. Returns the JSON document (keys: table, mode, title, seeds, settings, runs,
    summary, paper, notes, timings, ...).
    """
    if not seeds or len(set(seeds)) != len(seeds):
        raise ExperimentError(f"seeds must be distinct and at least one, got {list(seeds)}; e.g. --seeds 0 1 2")
    root = Path(out).expanduser().resolve()
    if _cluster_address() is not None:  # before any work: paths the workers on other nodes could not see
        from .resources import check_shared_storage

        check_shared_storage({"--out": root, "--data-dir": data_dir})
    table = preflight(n, smoke, data_dir) if spec is None else check_files(spec, data_dir)
    n = table.number
    ctx = _Context(table, root / f"table{n}", data_dir, resources or Resources.default(smoke), root / f"table{n}" / "_data")
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    _request_gpus(ctx.res)
    try:
        for seed in seeds:
            weights_src = _pretrain_source(ctx, seed) if table.source is not None else None
            for s in table.settings:
                weights = weights_src if s.weights == "source" else s.weights
                if weights is None:
                    raise ExperimentError(f"{s.key} needs a source model but Table {n} defines none; fix its TableSpec")
                runs.extend(_run_setting(ctx, s, seed, weights))
    finally:
        _release_gpus(ctx.res)
    doc = _document(table, list(seeds), runs, time.perf_counter() - t0, ctx.res)
    write_results(doc, root, table)
    return doc


# ── Results: JSON, Markdown, plots ────────────────────────────────────────────────────────────────


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None with one value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else None)


def summarize(table: TableSpec, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setting, strategy): per-seed errors, mean, std, and the paper's number."""
    rows = []
    for s in table.settings:
        for strategy, epochs in _arms(s):
            mine = sorted((r for r in runs if r["setting"] == s.key and r["strategy"] == strategy), key=lambda r: r["seed"])
            if not mine:
                continue
            errs = [float(r["test_error"]) for r in mine]
            m, sd = mean_std(errs)
            rows.append({"setting": s.key, "strategy": strategy, "paper_model": s.paper_model, "column": s.paper_column,
                         "row": s.row, "epochs": epochs, "seeds": [r["seed"] for r in mine], "per_seed": errs,
                         "mean": m, "std": sd, "paper": s.paper.get(strategy, s.paper.get("*")),
                         "n_train_samples": [r["n_train_samples"] for r in mine]})  # fmt: skip
    return rows


def _direction(summary: list[dict[str, Any]], table: TableSpec) -> list[dict[str, Any]]:
    """Per setting: does ours order the strategies as the paper does (instance < model < scratch)?"""
    out = []
    for s in table.settings:
        ours = {r["strategy"]: r["mean"] for r in summary if r["setting"] == s.key}
        order = [st for st in ("instance", "model", "scratch") if st in ours]
        if len(order) < 2:
            continue
        pairs = list(zip(order, order[1:]))
        out.append({"setting": s.key, "ours": ours,
                    "same_direction_as_paper": all(ours[a] < ours[b] for a, b in pairs)})  # fmt: skip
    return out


def _document(table: TableSpec, seeds: list[int], runs: list[dict[str, Any]], wall_s: float, res: Resources) -> dict[str, Any]:
    summary = summarize(table, runs)
    return {
        "table": table.number,
        "mode": "smoke" if table.smoke else "analogue" if table.analogue else "full",
        "title": table.title,
        "analogue": table.analogue,
        "section": table.section,
        "seeds": seeds,
        "settings": [asdict(s) for s in table.settings],
        "source": asdict(table.source) if table.source else None,
        "resources": asdict(res),
        "runs": runs,
        "summary": summary,
        "direction": _direction(summary, table),
        "paper": [{"strategy": st, "model": m, "row": r, "errors": e} for st, m, r, e in table.paper_rows],
        "notes": list(table.notes),
        "timings": {"wall_s": round(wall_s, 1)},
        "idtl_ray_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def render_markdown(doc: dict[str, Any], table: TableSpec | None = None) -> str:
    """The paper's table with the paper's numbers beside ours, then every run (``table``: the spec that ran)."""
    table = table or table_spec(doc["table"], doc["mode"] == "smoke")
    summ = doc["summary"]
    n_seeds = len(doc["seeds"])
    lines = [f"# Table {table.number}: {table.title} (paper {table.section})", ""]
    if table.smoke:
        s0 = table.settings[0]
        lines += [f"**Smoke run**: {s0.model} on {', '.join(dict.fromkeys(s.dataset for s in table.settings))} "
                  f"({s0.epochs} epoch; source model pre-trained on "
                  f"{table.source.dataset if table.source else '-'}), standing in for the paper's settings. It checks the "
                  f"pipeline; its numbers are not comparable with the paper's.", ""]  # fmt: skip
    if table.analogue:
        lines += [f"**Real-data analogue at a smaller scale**: {table.analogue} Compare the order of the "
                  f"strategies with the paper's, not the numbers.", ""]  # fmt: skip
    lines += [f"Test error (%). Ours: mean ± std over {n_seeds} seeds {doc['seeds']}" if n_seeds > 1
              else f"Test error (%). Ours: seed {doc['seeds'][0]} (one seed, no std)", ""]  # fmt: skip

    def ours(strategy: str, model: str, row: str, column: str) -> list[dict[str, Any]]:
        return [r for r in summ if r["paper_model"] == model and r["column"] == column
                and (r["row"].split(" ")[0] == row if row else True) and (strategy == "*" or r["strategy"] == strategy)]  # fmt: skip

    if table.number == 3:
        lines += ["| Model | Frozen Layers | " + " | ".join(f"{c} paper | {c} ours model-based | {c} ours instance-based"
                                                          for c in table.columns) + " |",
                  "|---|---|" + "---|---|---|" * len(table.columns)]  # fmt: skip
        for _, model, row, errs in table.paper_rows:
            cells = []
            for c in table.columns:
                got = {r["strategy"]: r for r in ours("*", model, row, c)}
                cells += [f"{errs[c]:.2f}"] + [_fmt(got[st]["mean"], got[st]["std"]) if st in got else "not run"
                                               for st in ("model", "instance")]  # fmt: skip
            lines.append(f"| {model} | {row} | " + " | ".join(cells) + " |")
    else:
        lines += ["| Strategy | Model | " + " | ".join(f"{c} paper | {c} ours" for c in table.columns) + " |",
                  "|---|---|" + "---|---|" * len(table.columns)]  # fmt: skip
        for strategy, model, row, errs in table.paper_rows:
            cells = []
            for c in table.columns:
                got = ours(strategy, model, row, c)
                cells += [f"{errs[c]:.2f}", _fmt(got[0]["mean"], got[0]["std"]) if got else "not run"]
            lines.append(f"| {STRATEGY_TITLES[strategy]} | {model} | " + " | ".join(cells) + " |")
    lines.append("")
    for d in doc.get("direction", []):
        verdict = "same as the paper" if d["same_direction_as_paper"] else "NOT as in the paper"
        order = ", ".join(f"{STRATEGY_TITLES[k]} {v:.2f}" for k, v in d["ours"].items())
        lines.append(f"- {d['setting']}: {order} -> strategy order {verdict} (paper: instance < model < scratch)")
    lines += ["", "## Runs", "",
              "| setting | seed | strategy | epochs | training samples | dropped by mask | test error (%) |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in doc["runs"]:
        extra = f" (uniform test {r['uniform_test_error']:.2f}, class A = {r['class_a']})" if "class_a" in r else ""
        lines.append(f"| {r['setting']}{' frozen ' + r['row'] if r['row'] else ''} | {r['seed']} | {r['strategy']} | "
                     f"{r['epochs']} | {r['n_train_samples']} | {r['n_dropped_by_mask']} of {r['n_scored']} | "
                     f"{r['test_error']:.2f}{extra} |")  # fmt: skip
    if doc.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {x}" for x in doc["notes"]]
    lines += ["", f"Wall time {doc['timings']['wall_s']:.0f} s; idtl-ray {doc['idtl_ray_version']}; {doc['created_utc']}.", ""]
    return "\n".join(lines)






def plot_errors(doc: dict[str, Any], path: Path) -> None:
    """Bar chart: test error per strategy (mean, std bars) for every setting, paper numbers as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = doc["summary"]
    groups = list(dict.fromkeys(r["setting"] for r in summ))
    strategies = [s for s in ("scratch", "model", "instance") if any(r["strategy"] == s for r in summ)]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups) * max(1, len(strategies)) / 2), 3.8))
    w = 0.8 / max(1, len(strategies))
    for i, st in enumerate(strategies):
        xs, ms, sds, ps = [], [], [], []
        for g, key in enumerate(groups):
            r = next((r for r in summ if r["setting"] == key and r["strategy"] == st), None)
            if r is not None:
                xs.append(g + (i - (len(strategies) - 1) / 2) * w)
                ms.append(r["mean"])
                sds.append(r["std"] or 0.0)
                ps.append(r["paper"])
        ax.bar(xs, ms, w, yerr=sds, capsize=3, label=f"{STRATEGY_TITLES[st]} (ours)")
        px = [x for x, p in zip(xs, ps) if p is not None]
        ax.scatter(px, [p for p in ps if p is not None], marker="_", s=200, color="k", zorder=3,
                   label="paper" if i == 0 else None)  # fmt: skip
    ax.set_xticks(range(len(groups)), groups, rotation=15, fontsize=8)
    ax.set_ylabel("test error (%)")
    ax.set_title(f"Table {doc['table']} ({doc['mode']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def plot_curves(doc: dict[str, Any], path: Path) -> bool:
    """Test error per epoch of each run (first seed), from the runs' metrics.json; False when none exist."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = doc["seeds"][0]
    series = []
    for r in doc["runs"]:
        p = Path(r["run_dir"]) / "metrics.json"
        if r["seed"] == seed and p.is_file():
            hist = json.loads(p.read_text(encoding="utf-8"))
            pts = [(h["epoch"] + 1, h["test_error"]) for h in hist if h.get("test_error") is not None]
            if pts:
                series.append((f"{r['setting']} {r['strategy']}", pts))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, pts in series:
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)" + (" (uniform test set)" if doc["table"] == 5 else ""))
    ax.set_title(f"Table {doc['table']} ({doc['mode']}), seed {seed}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    return True


def write_results(doc: dict[str, Any], out: str | Path, table: TableSpec | None = None) -> dict[str, str]:
    """Write ``tableN.json``, ``tableN.md``, ``tableN.png`` and ``tableN_curves.png`` atomically."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    n = doc["table"]
    paths = {"json": root / f"table{n}.json", "md": root / f"table{n}.md", "png": root / f"table{n}.png",
             "curves": root / f"table{n}_curves.png"}  # fmt: skip
    if doc["summary"]:
        plot_errors(doc, paths["png"])
    if not plot_curves(doc, paths["curves"]):
        paths.pop("curves")
    doc["files"] = {k: str(v) for k, v in paths.items()}
    write_json_atomic(doc, paths["json"])
    write_text_atomic(render_markdown(doc, table), paths["md"])
    return doc["files"]


# ── Job scripts ───────────────────────────────────────────────────────────────────────────────────


def job_parser(n: int, doc: str | None = None) -> Any:
    """The argparse parser every ``jobs/tableN.py`` uses (same flags for all six tables)."""
    import argparse

    p = argparse.ArgumentParser(prog=f"jobs/table{n}.py", description=(doc or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="Tiny variant on bundled offline data (< 5 min on 2 CPUs).")
    p.add_argument("--data-dir", default=None, help="Dataset root (default $IDTL_DATA_DIR or ~/.cache/idtl-ray/data; "
                   "on the cluster e.g. /mnt/cluster_storage/data).")  # fmt: skip
    p.add_argument("--out", default="results", help="Results directory (on the cluster use shared storage, e.g. "
                   "/mnt/cluster_storage/results: a job's working dir is deleted afterwards).")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="Seeds (mean and std reported with several).")
    for f in dataclasses.fields(Resources):  # declared once, in Resources: None = the table's default
        kind = int if "int" in str(f.type) else float
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None, help=f.metadata["help"])
    return p


def resources_from_args(args: Any) -> Resources:
    """Resources.default(smoke) with the job's overrides (``--gpus`` first: it sets workers and GPUs)."""
    res = Resources.default(bool(args.smoke))
    gpus = getattr(args, "gpus", None)
    if gpus is not None:
        res.declare_gpus(gpus, args.workers, args.gpus_per_worker)
    set_by_gpus = {"gpus"} if gpus is None else {"gpus", "workers", "gpus_per_worker"}
    for f in dataclasses.fields(Resources):
        if f.name not in set_by_gpus and getattr(args, f.name, None) is not None:
            setattr(res, f.name, getattr(args, f.name))
    if res.workers < 1 or res.cpus_per_worker <= 0 or res.gpus_per_worker < 0:
        raise InputError("--workers must be >= 1, --cpus-per-worker > 0 and --gpus-per-worker >= 0")
    if res.score_actors is not None and res.score_actors < 1:
        raise InputError(f"--score-actors must be >= 1, got {res.score_actors}")
    return res


__all__ = [
    "ExperimentError", "PlusSpec", "Resources", "Setting", "SourceSpec", "TableSpec", "build_cifar_plus", "check_files",
    "job_parser", "mean_std", "pick_class_a", "plus_counts", "preflight", "render_markdown", "resources_from_args",
    "run_table", "summarize", "table_spec", "write_results",
]  # fmt: skip


def job_main(table: int, doc: str | None, init: Callable[[], Any], argv: list[str] | None = None) -> int:
    """Body of every ``jobs/tableN.py``: parse, check the files, ``init()`` Ray, run, print; 2 on a user error.

    ``init`` is the job script's plain ``ray.init`` (inside ``ray job submit`` it joins the cluster through
    RAY_ADDRESS, else it starts a local Ray); it runs only after the preflight found every file.
    """
    from .scoring.session import filter_ray_noise

    args = job_parser(table, doc).parse_args(argv)
    filter_ray_noise()  # as the CLI: Ray's known-harmless error lines stay out of the job's log
    try:
        resources = resources_from_args(args)
        preflight(table, args.smoke, args.data_dir)  # missing data or weights fail here, before Ray starts
        init()
        result = run_table(table, args.smoke, args.data_dir, args.out, args.seeds, resources)
    except IdtlError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render_markdown(result))
    print(f"wrote {', '.join(result['files'].values())}")
    return 0
