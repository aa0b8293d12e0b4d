"""Fine-tuning on Ray Train: from scratch, model-based and instance-based (paper 3.2-3.3, section 4).

Stages of :func:`run_finetune`:
  1. plan      open the prepared dataset (a name is prepared once into the cache) for its manifest and
               labels only, load the split (for ``instance``: the split.json beside the mask), check
               that the mask belongs to both, pick the training sample ids. The driver never holds images.
  2. model     build the adapted model on the driver: Xavier (``scratch``) or pre-trained weights
               (``model``/``instance``), optional hybrid init (Table 4) and freezing (Tables 3, 6)
  3. data      Ray Data reads and decodes the training, validation and test samples into the object
               store (:mod:`.data`); the initial weights go there once too
  4. train     a TorchTrainer (Train V2): DDP workers read their shard of ``train`` (shuffled per epoch),
               augment and normalise in the worker, Adam with lr x0.1 at ``lr_drop_at`` of the epochs;
               rank 0 evaluates on ``val`` and ``test``; a checkpoint every epoch, restored after a worker
               failure or when the same command runs again (:mod:`.worker`)
  5. outputs   ``config.json``, ``metrics.json``/``metrics.csv``, ``curves.png``, ``final.json``,
               ``model.pt`` and ``seen_ids.npy`` (the sample ids the workers trained on in epoch 0)

Head policy: when the pre-trained head does not fit the target classes (``load_weights`` reports
``head_replaced``), the ``model`` and ``instance`` strategies start from ``model.pt`` beside the
mask (or beside ``--split``) when that file exists: it is the scoring stage's adapted model whose
new head was fitted by a linear probe, i.e. the very model the influence scores were computed at.
Without that file the new head starts Xavier. ``scratch`` never loads weights.

Modules: ``config`` (:class:`FinetuneConfig`), ``plan`` (stages 1-2), ``data`` (Ray Data sets), ``worker``
(the Train worker loop), ``run`` (stages 3-4: :func:`run_finetune`), ``outputs`` (stage 5), ``progress``
(lines on stderr). ``pretrain``, ``run_compare`` and ``compare_table`` are in :mod:`idtl_ray.compare`.
"""

from __future__ import annotations

from typing import Any

from .config import PRECISIONS, STRATEGIES, STRATEGY_TITLES, FinetuneConfig, TrainingError, config_from
from .outputs import plot_curves
from .plan import Plan, apply_freeze, build_finetune_model, dry_run, make_plan, mask_file, trainable_params
from .progress import epoch_line, say
from .run import run_finetune
from .worker import FAULT_MARKER, ids_hash, lr_at

_COMPARE = ("pretrain", "run_compare", "compare_table")


def __getattr__(name: str) -> Any:
    """``pretrain``, ``run_compare`` and ``compare_table`` live in :mod:`idtl_ray.compare` (which imports
    this package), and are found here too: loaded on first use, so neither imports the other first."""
    if name in _COMPARE:
        from .. import compare

        return getattr(compare, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FAULT_MARKER", "PRECISIONS", "STRATEGIES", "STRATEGY_TITLES", "FinetuneConfig", "Plan", "TrainingError",
    "apply_freeze", "build_finetune_model", "compare_table", "config_from", "dry_run", "epoch_line", "ids_hash",
    "lr_at", "make_plan", "mask_file", "plot_curves", "pretrain", "run_compare", "run_finetune", "say",
    "trainable_params",
]  # fmt: skip
