"""Before any work: every file a table needs (datasets, weights), and the smoke tables' own small files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WeightsError
from ..storage import save_npz_atomic
from .specs import SMOKE_BINARY_CLASSES, SMOKE_TARGET, Setting, SourceSpec, TableSpec, table_spec


def source_npz(src: SourceSpec, data_dir: str | None, cache: Path) -> str:
    """The source dataset name to pre-train on: the registry name, or an npz subset (smoke)."""
    from .. import data as D

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
    from .. import data as D

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
    import torch

    from ..models import imagenet_enum, imagenet_file_name

    url, fname = imagenet_enum(model).url, imagenet_file_name(model)
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
    from .. import data as D

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
