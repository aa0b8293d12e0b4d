"""CLI commands of the training stages: ``pretrain``, ``finetune``, ``compare`` and ``sweep``.

``register(app)`` adds them to the project's Typer app. Help texts come from the
:class:`~idtl_ray.finetune.FinetuneConfig` field metadata, so they live in one place. Every command
starts Ray with :func:`idtl_ray.scoring.ensure_ray` (embedded local Ray unless ``--address``); a user
error (:class:`~idtl_ray.errors.IdtlError`) prints one line ``error: <message>`` and exits with 2.

Examples::

    idtl-ray pretrain --dataset emnist-letters --model sample-cnn --epochs 2 --out runs/emnist.pt
    idtl-ray finetune --strategy instance --mask runs/score/mask.parquet --weights runs/emnist.pt --dataset mnist
    idtl-ray compare --dataset mnist --weights runs/emnist.pt --epochs 1 --out runs/table1
    idtl-ray compare --dataset digits --weights runs/src.pt --out runs/cmp --baselines random,loss,cleanlab
    idtl-ray sweep --dataset cifar10 --model resnet50 --weights imagenet --strategy model --frozen 20 30 40
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, Optional

import typer

from .config import help_of
from .cli_common import user_errors
from .scoring import ensure_ray
from .errors import IdtlError
from .finetune import FinetuneConfig

_F = FinetuneConfig


def _h(name: str) -> str:
    return help_of(FinetuneConfig, name)


def _score_fn(dataset: str, model: str, weights: str, data_dir: str | None, image_size: int | None,
              val_fraction: float, seed: int, address: str | None, epochs: int = 10) -> Callable[[str], str]:  # fmt: skip
    """``compare`` without a mask: run the scoring stage into the given directory, return the mask path.

    Its ``--drop auto`` trials train as long as the comparison's runs: how much label noise hurts, and so
    which budget pays, depends on the length of training.
    """

    def score(out_dir: str) -> str:
        from .config import ScoreConfig
        from .workflow import run_score  # lazy: the scoring workflow is another module's stage

        res = run_score(ScoreConfig(dataset=dataset, model=model, weights=weights, data_dir=data_dir,
                                    image_size=image_size, val_fraction=val_fraction, seed=seed, out=out_dir,
                                    address=address, auto_epochs=epochs))  # fmt: skip
        return str(res["mask"])

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


def register(app: typer.Typer) -> None:
    """Add the ``pretrain``, ``finetune``, ``compare`` and ``sweep`` commands to ``app``."""

    @app.command("pretrain")
    @user_errors
    def pretrain_cmd(
        dataset: str = typer.Option("emnist-letters", help="Source dataset (paper 4.1: emnist-letters)."),
        model: str = typer.Option("sample-cnn", help=_h("model")),
        epochs: int = typer.Option(2, help="Training epochs (paper 4.1: 2)."),
        out: str = typer.Option(..., help="Checkpoint file to write (the run itself lives in <out>.run/)."),
        batch_size: int = typer.Option(128, help=_h("batch_size")),
        lr: float = typer.Option(1e-3, help=_h("lr")),
        seed: int = typer.Option(0, help=_h("seed")),
        data_dir: Optional[str] = typer.Option(None, help=_h("data_dir")),
        image_size: Optional[int] = typer.Option(None, help=_h("image_size")),
        workers: int = typer.Option(1, help=_h("workers")),
        cpus_per_worker: float = typer.Option(1.0, help=_h("cpus_per_worker")),
        gpus_per_worker: float = typer.Option(0.0, help=_h("gpus_per_worker")),
        address: Optional[str] = typer.Option(None, help=_h("address")),
    ) -> None:
        """Train a source model from Xavier init on every training sample (paper Table 1 recipe)."""
        from .finetune import pretrain

        ensure_ray(address)
        res = pretrain(dataset, model, epochs, out, batch_size=batch_size, lr=lr, seed=seed, data_dir=data_dir,
                       image_size=image_size, workers=workers, cpus_per_worker=cpus_per_worker,
                       gpus_per_worker=gpus_per_worker, address=address)  # fmt: skip
        typer.echo(json.dumps(res, indent=2))

    @app.command("finetune")
    @user_errors
    def finetune_cmd(
        dataset: str = typer.Option(_F.dataset, help=_h("dataset")),
        model: str = typer.Option(_F.model, help=_h("model")),
        strategy: str = typer.Option(_F.strategy, help=_h("strategy")),
        mask: Optional[str] = typer.Option(None, help=_h("mask")),
        weights: str = typer.Option(_F.weights, help=_h("weights")),
        data_dir: Optional[str] = typer.Option(None, help=_h("data_dir")),
        image_size: Optional[int] = typer.Option(None, help=_h("image_size")),
        val_fraction: float = typer.Option(_F.val_fraction, help=_h("val_fraction")),
        split: Optional[str] = typer.Option(None, help=_h("split")),
        epochs: int = typer.Option(_F.epochs, help=_h("epochs")),
        batch_size: int = typer.Option(_F.batch_size, help=_h("batch_size")),
        lr: float = typer.Option(_F.lr, help=_h("lr")),
        lr_drop_at: float = typer.Option(_F.lr_drop_at, help=_h("lr_drop_at")),
        freeze: Optional[int] = typer.Option(None, help=_h("freeze")),
        freeze_conv: bool = typer.Option(False, "--freeze-conv", help=_h("freeze_conv")),
        hybrid_init: Optional[int] = typer.Option(None, help=_h("hybrid_init")),
        workers: int = typer.Option(_F.workers, help=_h("workers")),
        gpus_per_worker: float = typer.Option(_F.gpus_per_worker, help=_h("gpus_per_worker")),
        cpus_per_worker: float = typer.Option(_F.cpus_per_worker, help=_h("cpus_per_worker")),
        eval_every: int = typer.Option(_F.eval_every, help=_h("eval_every")),
        seed: int = typer.Option(_F.seed, help=_h("seed")),
        out: Optional[str] = typer.Option(None, help=_h("out")),
        augment: bool = typer.Option(True, "--augment/--no-augment", help=_h("augment")),
        max_failures: int = typer.Option(_F.max_failures, help=_h("max_failures")),
        address: Optional[str] = typer.Option(None, help=_h("address")),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the layer table, trainable params and sample count; train nothing."),
    ) -> None:
        """Fine-tune with Ray Train: scratch, model-based or instance-based (the samples the mask keeps)."""
        from .finetune import dry_run as _dry_run
        from .finetune import run_finetune

        cfg = FinetuneConfig(dataset=dataset, model=model, strategy=strategy, mask=mask, weights=weights,
                             data_dir=data_dir, image_size=image_size, val_fraction=val_fraction, split=split,
                             epochs=epochs, batch_size=batch_size, lr=lr, lr_drop_at=lr_drop_at, freeze=freeze,
                             freeze_conv=freeze_conv, hybrid_init=hybrid_init, workers=workers,
                             gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, eval_every=eval_every,
                             seed=seed, out=out, augment=augment, max_failures=max_failures, address=address)  # fmt: skip
        if dry_run:
            typer.echo(_dry_run(cfg))
            return
        ensure_ray(address)
        final = run_finetune(cfg, progress=True)  # a line per epoch on stderr
        typer.echo(json.dumps(final, indent=2))
        typer.echo(f"test error {final['test_error']:.2f}% after {final['epochs']} epochs on "
                   f"{final['n_train_samples']} samples; outputs in {cfg.out_dir}")  # fmt: skip

    @app.command("compare")
    @user_errors
    def compare_cmd(
        dataset: str = typer.Option(_F.dataset, help=_h("dataset")),
        model: str = typer.Option(_F.model, help=_h("model")),
        weights: str = typer.Option(..., help=_h("weights")),
        epochs: int = typer.Option(_F.epochs, help="Fine-tuning epochs of the model and instance strategies."),
        scratch_epochs: Optional[int] = typer.Option(None, help="Epochs of the scratch run (default --epochs; paper: 2x)."),
        out: str = typer.Option(..., help="Comparison directory (one run directory per strategy, compare.md/json)."),
        mask: Optional[str] = typer.Option(None, help="Mask to use (default <out>/score/mask.parquet, scored now if missing)."),
        data_dir: Optional[str] = typer.Option(None, help=_h("data_dir")),
        image_size: Optional[int] = typer.Option(None, help=_h("image_size")),
        val_fraction: float = typer.Option(_F.val_fraction, help=_h("val_fraction")),
        batch_size: int = typer.Option(_F.batch_size, help=_h("batch_size")),
        lr: float = typer.Option(_F.lr, help=_h("lr")),
        lr_drop_at: float = typer.Option(_F.lr_drop_at, help=_h("lr_drop_at")),
        freeze_conv: bool = typer.Option(False, "--freeze-conv", help=_h("freeze_conv")),
        workers: int = typer.Option(_F.workers, help=_h("workers")),
        gpus_per_worker: float = typer.Option(_F.gpus_per_worker, help=_h("gpus_per_worker")),
        cpus_per_worker: float = typer.Option(_F.cpus_per_worker, help=_h("cpus_per_worker")),
        eval_every: int = typer.Option(_F.eval_every, help=_h("eval_every")),
        seed: int = typer.Option(_F.seed, help=_h("seed")),
        address: Optional[str] = typer.Option(None, help=_h("address")),
        baselines: Optional[str] = typer.Option(
            None, help="Also fine-tune on baseline selections that drop as many samples as the mask: a comma list "
                       "of random, loss (highest loss of the scored model), cleanlab (likely label issues)."),  # fmt: skip
    ) -> None:
        """Scratch vs model-based vs instance-based on one split: the paper's table of test error (%)."""
        from .baselines import parse_methods
        from .finetune import run_compare

        names = parse_methods(baselines)  # a typo fails here, before Ray starts
        ensure_ray(address)
        run_compare(dataset, model, weights, epochs, out=out, mask=mask,
                    score_fn=_score_fn(dataset, model, weights, data_dir, image_size, val_fraction, seed, address, epochs),
                    scratch_epochs=scratch_epochs, baselines=names, data_dir=data_dir, image_size=image_size,
                    val_fraction=val_fraction,
                    batch_size=batch_size, lr=lr, lr_drop_at=lr_drop_at, freeze_conv=freeze_conv, workers=workers,
                    gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, eval_every=eval_every,
                    seed=seed, address=address)  # fmt: skip

    @app.command("sweep", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
    @user_errors
    def sweep_cmd(
        ctx: typer.Context,
        frozen: list[str] = typer.Option(..., help="Frozen-layer counts: --frozen 20 30 40 (paper Table 3)."),
        out: str = typer.Option(..., help="Sweep directory (one run directory per count, sweep.md/csv)."),
        dataset: str = typer.Option(_F.dataset, help=_h("dataset")),
        model: str = typer.Option(_F.model, help=_h("model")),
        strategy: str = typer.Option("model", help=_h("strategy")),
        mask: Optional[str] = typer.Option(None, help=_h("mask")),
        weights: str = typer.Option(_F.weights, help=_h("weights")),
        data_dir: Optional[str] = typer.Option(None, help=_h("data_dir")),
        image_size: Optional[int] = typer.Option(None, help=_h("image_size")),
        split: Optional[str] = typer.Option(None, help=_h("split")),
        epochs: int = typer.Option(_F.epochs, help=_h("epochs")),
        batch_size: int = typer.Option(_F.batch_size, help=_h("batch_size")),
        lr: float = typer.Option(_F.lr, help=_h("lr")),
        lr_drop_at: float = typer.Option(_F.lr_drop_at, help=_h("lr_drop_at")),
        workers: int = typer.Option(_F.workers, help=_h("workers")),
        gpus_per_worker: float = typer.Option(_F.gpus_per_worker, help=_h("gpus_per_worker")),
        cpus_per_worker: float = typer.Option(0.5, help=_h("cpus_per_worker")),
        eval_every: int = typer.Option(_F.eval_every, help=_h("eval_every")),
        seed: int = typer.Option(_F.seed, help=_h("seed")),
        max_concurrent: int = typer.Option(1, help="Trials at once (cluster GPUs // GPUs per trial)."),
        address: Optional[str] = typer.Option(None, help=_h("address")),
    ) -> None:
        """Ray Tune sweep over frozen-layer counts; prints and saves sweep.md / sweep.csv."""
        from .sweep import run_sweep

        counts = _frozen_list(frozen, list(ctx.args))
        base = FinetuneConfig(dataset=dataset, model=model, strategy=strategy, mask=mask, weights=weights,
                              data_dir=data_dir, image_size=image_size, split=split, epochs=epochs,
                              batch_size=batch_size, lr=lr, lr_drop_at=lr_drop_at, workers=workers,
                              gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                              eval_every=eval_every, seed=seed, address=address)  # fmt: skip
        from .sweep import check_frozen

        check_frozen(base, counts)  # before Ray starts
        ensure_ray(address)
        df = run_sweep(base, counts, out, max_concurrent=max_concurrent)
        if (df["status"] == "error").any():
            sys.exit(1)
