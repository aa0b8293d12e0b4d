"""CLI commands of the training stages: ``pretrain``, ``finetune``, ``compare`` and ``sweep``.

``register(app)`` adds them to the project's Typer app. Their options are generated from
:class:`~idtl_ray.finetune.FinetuneConfig` (:mod:`idtl_ray.cli_options`): names, help, defaults and
choices live in its fields, and each command says here only where it differs. Ray starts
(:func:`idtl_ray.scoring.ensure_ray`: embedded local Ray unless ``--address``) only after the checks
that need none (options, dataset, weights, mask), so a typo costs no Ray start-up; a user
error (:class:`~idtl_ray.errors.IdtlError`) prints one line ``error: <message>`` and exits with 2.

Examples::

    idtl-ray pretrain --dataset emnist-letters --model sample-cnn --epochs 2 --out runs/emnist.pt
    idtl-ray finetune --strategy instance --mask runs/score/mask.parquet --weights runs/emnist.pt --dataset mnist
    idtl-ray compare --dataset mnist --weights runs/emnist.pt --epochs 1 --out runs/table1
    idtl-ray compare --dataset digits --weights runs/src.pt --out runs/cmp --baselines random,loss,cleanlab
    idtl-ray sweep --dataset cifar10 --model resnet50 --weights imagenet --strategy model --frozen 20 30 40 --out runs/sweep
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from collections.abc import Callable
from typing import Any, Optional

import typer

from .cli_common import user_errors
from .cli_options import Options, with_options
from .errors import IdtlError, InputError
from .finetune import STRATEGIES, FinetuneConfig, pretrain

# What the command line says about FinetuneConfig beyond its field metadata.
_STRATEGY = {"choices": STRATEGIES}
_TEST_ONLY = ("fault_inject_kill_epoch",)
# pretrain: the FinetuneConfig fields that finetune.pretrain takes (it fixes the strategy, split and schedule).
_PRETRAIN_FIELDS = tuple(p for p in inspect.signature(pretrain).parameters
                         if p in {f.name for f in dataclasses.fields(FinetuneConfig)})  # fmt: skip
PRETRAIN_OPTIONS = Options(FinetuneConfig, build=False, only=_PRETRAIN_FIELDS, override={
    "dataset": {"default": "emnist-letters", "help": "Source dataset (paper 4.1: emnist-letters)."},
    "epochs": {"default": 2, "help": "Training epochs (paper 4.1: 2)."},
    "out": {"required": True, "help": "Checkpoint file to write (the run itself lives in <out>.run/)."},
    "seed": {"help": "Seed of the initialisation and the shuffling (pretrain trains on every sample: no split)."},
})  # fmt: skip
FINETUNE_OPTIONS = Options(FinetuneConfig, skip=_TEST_ONLY, override={"strategy": _STRATEGY})
# compare trains all three strategies on the mask's split; one strategy's freezing or hybrid init does not apply.
COMPARE_OPTIONS = Options(FinetuneConfig, build=False, skip=(*_TEST_ONLY, "strategy", "split", "freeze", "hybrid_init"),
                          override={
    "weights": {"required": True},
    "epochs": {"help": "Fine-tuning epochs of the model, instance and baseline runs, the scratch run's unless "
                       "--scratch-epochs is given, and each --drop auto trial's when compare scores first."},
    "freeze_conv": {"help": "Train only the fully connected layers of the model, instance and baseline runs (paper "
                            "Table 6); the scratch run trains every layer."},
    "out": {"required": True, "help": "Comparison directory (one run directory per strategy, compare.md/json)."},
    "mask": {"help": "Mask to use (default <out>/score/mask.parquet, scored now if missing)."},
})  # fmt: skip
# sweep: one trial per --frozen count (its freeze), each in its own directory under the sweep's --out.
# Its --gpus is the sweep's GPU budget, not one run's workers: declared below, beside --max-concurrent.
SWEEP_OPTIONS = Options(FinetuneConfig, skip=(*_TEST_ONLY, "freeze", "freeze_conv", "out", "gpus"), override={
    "strategy": {**_STRATEGY, "default": "model"},
    "cpus_per_worker": {"default": 0.5},
    "workers": {"help": "Ray Train workers (DDP ranks) per trial; with --gpus, one GPU each."},
})  # fmt: skip


def _score_fn(dataset: str, model: str, weights: str, data_dir: str | None, image_size: int | None,
              val_fraction: float, seed: int, address: str | None, epochs: int = 10,
              gpus: int | None = None) -> Callable[[str], str]:  # fmt: skip
    """``compare`` without a mask: run the scoring stage into the given directory, return the mask path.

    Its ``--drop auto`` trials train as long as the comparison's runs: how much label noise hurts, and so
    which budget pays, depends on the length of training. ``--gpus N`` gives it N scoring actors.
    """

    def score(out_dir: str) -> str:
        from .config import ScoreConfig
        from .workflow import run_score  # lazy: the scoring workflow is another module's stage

        cfg = ScoreConfig(dataset=dataset, model=model, weights=weights, data_dir=data_dir, image_size=image_size,
                          val_fraction=val_fraction, seed=seed, out=out_dir, address=address, auto_epochs=epochs,
                          gpus=gpus or 0, resume=True)  # a rerun reuses (or finishes) this score, never another's
        try:
            return str(run_score(cfg)["mask"])
        except IdtlError as e:
            if not str(e).startswith("cannot resume"):
                raise
            detail = str(e).removeprefix("cannot resume: ").split("; ")[0]
            raise InputError(f"compare reuses the score in {out_dir}, but {detail}; remove {out_dir} to score "
                             "again, or choose another --out") from None

    return score


def _frozen_list(first: list[str], extra: list[str]) -> list[int]:
    """``--frozen 20 30 40`` (extra args), ``--frozen 20 --frozen 30`` or ``--frozen 20,30,40``."""
    vals = []
    for tok in [*first, *extra]:
        for part in str(tok).split(","):
            if part.strip():
                try:
                    vals.append(int(part))
                except ValueError:
                    raise IdtlError(f"--frozen takes layer counts, got {part!r}; e.g. --frozen 20 30 40") from None
    return vals


@user_errors
@with_options(kw=PRETRAIN_OPTIONS)
def pretrain_cmd(kw: dict[str, Any]) -> None:
    """Train a source model from Xavier init on every training sample (paper Table 1 recipe)."""
    from .finetune import pretrain as _pretrain  # looked up now (tests replace it)

    res = _pretrain(kw.pop("dataset"), kw.pop("model"), kw.pop("epochs"), kw.pop("out"), **kw)
    typer.echo(json.dumps(res, indent=2))


@user_errors
@with_options(cfg=FINETUNE_OPTIONS)
def finetune_cmd(
    cfg: FinetuneConfig,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the layer table, trainable params and sample count; train nothing."),
) -> None:
    """Fine-tune with Ray Train: scratch, model-based or instance-based (the samples the mask keeps)."""
    from .finetune import dry_run as _dry_run
    from .finetune import run_finetune

    if dry_run:
        typer.echo(_dry_run(cfg))
        return
    final = run_finetune(cfg, progress=True)  # starts Ray once the data and the mask are checked  # a line per epoch on stderr
    typer.echo(json.dumps(final, indent=2))
    typer.echo(f"test error {final['test_error']:.2f}% after {final['epochs']} epochs on "
               f"{final['n_train_samples']} samples; outputs in {cfg.out_dir}")  # fmt: skip


@user_errors
@with_options(kw=COMPARE_OPTIONS)
def compare_cmd(
    kw: dict[str, Any],
    scratch_epochs: Optional[int] = typer.Option(None, help="Epochs of the scratch run (default --epochs; paper: 2x)."),
    baselines: Optional[str] = typer.Option(
        None, help="Also fine-tune on baseline selections that drop as many samples as the mask: a comma list "
                   "of random, loss (highest loss of the scored model), cleanlab (likely label issues)."),  # fmt: skip
) -> None:
    """Scratch vs model-based vs instance-based on one split: the paper's table of test error (%)."""
    from .baselines import parse_methods
    from .finetune import run_compare

    names = parse_methods(baselines)  # a typo fails here; run_compare starts Ray after its own checks
    dataset, model, weights, epochs = (kw.pop(k) for k in ("dataset", "model", "weights", "epochs"))
    score = _score_fn(dataset, model, weights, kw["data_dir"], kw["image_size"], kw["val_fraction"], kw["seed"],
                      kw["address"], epochs, kw["gpus"])  # fmt: skip
    run_compare(dataset, model, weights, epochs, out=kw.pop("out"), mask=kw.pop("mask"), score_fn=score,
                scratch_epochs=scratch_epochs, baselines=names, **kw)  # fmt: skip


@user_errors
@with_options(base=SWEEP_OPTIONS)
def sweep_cmd(
    ctx: typer.Context,
    base: FinetuneConfig,
    frozen: list[str] = typer.Option(..., help="Frozen-layer counts: --frozen 20 30 40 (paper Table 3)."),
    out: str = typer.Option(..., help="Sweep directory (one run directory per count, sweep.md/csv)."),
    max_concurrent: int = typer.Option(1, help="Trials at once (cluster GPUs // GPUs per trial; --gpus N runs N // --workers)."),
    gpus: int = typer.Option(0, help="GPUs to sweep on: trials of --workers GPU workers each, N // --workers at once, "
                                     "asked of the autoscaler at start on a cluster (instead of --max-concurrent; 0: CPU)."),
) -> None:
    """Ray Tune sweep over frozen-layer counts; prints and saves sweep.md / sweep.csv."""
    from .sweep import check_frozen, run_sweep

    counts = _frozen_list(frozen, list(ctx.args))
    check_frozen(base, counts)
    df = run_sweep(base, counts, out, max_concurrent=max_concurrent, gpus=gpus)  # starts Ray once its own checks pass
    if (df["status"] == "error").any():
        sys.exit(1)


def register(app: typer.Typer) -> None:
    """Add the ``pretrain``, ``finetune``, ``compare`` and ``sweep`` commands to ``app``."""
    app.command("pretrain")(pretrain_cmd)
    app.command("finetune")(finetune_cmd)
    app.command("compare")(compare_cmd)
    app.command("sweep", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})(sweep_cmd)
