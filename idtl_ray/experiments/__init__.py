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

Modules: ``specs`` (the tables as data), ``cifar_plus`` (the Table 5 test sets), ``files`` (preflight:
every file a table needs), ``runner`` (:func:`run_table`), ``report`` (JSON, Markdown, plots), ``job``
(the jobs' parser and main).

Run directories live under ``<out>/tableN/seed<S>/<setting>/``; running the same command again reuses
finished scores and runs (both stages resume).
"""

from __future__ import annotations

from .cifar_plus import build_cifar_plus, pick_class_a, plus_counts
from .files import check_files, preflight
from .job import job_main, job_parser, resources_from_args
from .report import mean_std, render_markdown, summarize, write_results
from .runner import Resources, run_table
from .specs import (
    PAPER_MODEL_NAMES,
    STRATEGY_TITLES,
    TABLE3_FROZEN,
    TABLE4_HYBRID,
    ExperimentError,
    PlusSpec,
    Setting,
    SourceSpec,
    TableSpec,
    table_spec,
)

__all__ = [
    "PAPER_MODEL_NAMES", "STRATEGY_TITLES", "TABLE3_FROZEN", "TABLE4_HYBRID", "ExperimentError", "PlusSpec",
    "Resources", "Setting", "SourceSpec", "TableSpec", "build_cifar_plus", "check_files", "job_main", "job_parser",
    "mean_std", "pick_class_a", "plus_counts", "preflight", "render_markdown", "resources_from_args", "run_table",
    "summarize", "table_spec", "write_results",
]  # fmt: skip
