"""The paper's Tables 1-6 as data: settings, table specs, their smoke variants, and :func:`table_spec`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import IdtlError


STRATEGY_TITLES = {"scratch": "from Scratch", "model": "Model-based TL", "instance": "Instance-based TL"}
PAPER_MODEL_NAMES = {"sample-cnn": "sample-CNN", "vgg16": "VGG-16", "resnet50": "ResNet-50", "densenet121": "DenseNet-121"}


class ExperimentError(IdtlError, RuntimeError):
    """A table cannot be set up or run (unknown table, bad seeds, a test set that cannot be built)."""


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

    def arms(self) -> list[tuple[str, int]]:
        """(strategy, epochs) of every run of this setting."""
        return [(st, (self.scratch_epochs or self.epochs) if st == "scratch" else self.epochs)
                for st in self.strategies if st != "scratch" or self.scratch_epochs]  # fmt: skip

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
