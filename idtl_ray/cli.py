"""`idtl-ray` command line: score, inspect, datasets (and pretrain/finetune/compare/sweep from cli_train).

Every command prints a user error as one line (`error: ...`, exit code 2) and never leaves a partial
output file behind.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from .config import ScoreConfig, help_of
from .cli_common import quiet_ray, user_errors
from .influence import InfluenceConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Instance-based deep transfer learning on Ray: score the target data, drop what hurts, fine-tune.")


S, I = ScoreConfig, InfluenceConfig  # short names for the help lookups below


@app.command()
@user_errors
def score(
    dataset: str = typer.Option("digits", help=help_of(S, "dataset")),
    model: str = typer.Option("sample-cnn", help=help_of(S, "model")),
    weights: str = typer.Option("none", help=help_of(S, "weights")),
    data_dir: Optional[str] = typer.Option(None, help=help_of(S, "data_dir")),
    image_size: Optional[int] = typer.Option(None, help="Resize the images to this size (pixels)."),
    val_fraction: float = typer.Option(0.1, help=help_of(S, "val_fraction")),
    target_class: Optional[list[int]] = typer.Option(None, help="Repeatable. " + help_of(S, "target_classes")),
    head: str = typer.Option("auto", help=help_of(S, "head")),
    score: str = typer.Option("self", help=help_of(I, "score")),
    head_params: str = typer.Option("bias", help=help_of(I, "head_params")),
    head_damping: float = typer.Option(0.1, help=help_of(I, "head_damping")),
    solver: str = typer.Option("cg", help=help_of(I, "solver")),
    hessian: str = typer.Option("ggn", "--hessian", "--curvature", help=help_of(I, "curvature")),
    damping: float = typer.Option(0.1, help=help_of(I, "damping")),
    curvature_samples: int = typer.Option(512, help=help_of(I, "curvature_samples") + " 0 = all."),
    max_iter: int = typer.Option(30, help=help_of(I, "max_iter")),
    tol: float = typer.Option(1e-2, help=help_of(I, "tol")),
    lissa_scale: float = typer.Option(10.0, help=help_of(I, "lissa_scale")),
    params: Optional[list[str]] = typer.Option(None, "--param", help="Repeatable. " + help_of(S, "params")),
    drop: str = typer.Option("auto", help=help_of(S, "drop")),
    drop_threshold: float = typer.Option(0.0, help=help_of(S, "drop_threshold")),
    drop_budget: Optional[float] = typer.Option(None, help=help_of(S, "drop_budget")),
    auto_budget: Optional[list[float]] = typer.Option(None, help="Repeatable. " + help_of(S, "auto_budgets") + " Default 0 0.05 0.1 0.2 0.3."),
    auto_epochs: int = typer.Option(10, help=help_of(S, "auto_epochs")),
    batch_size: int = typer.Option(256, help=help_of(I, "batch_size")),
    actors: Optional[int] = typer.Option(None, help=help_of(S, "actors")),
    shard_size: int = typer.Option(1024, help=help_of(S, "shard_size")),
    out: Optional[str] = typer.Option(None, help=help_of(S, "out")),
    seed: int = typer.Option(0, help=help_of(S, "seed")),
    resume: bool = typer.Option(False, "--resume", help=help_of(S, "resume")),
    address: Optional[str] = typer.Option(None, help=help_of(S, "address")),
) -> None:
    """Score every training sample with influence functions on Ray and write a Parquet mask."""
    quiet_ray()
    from .workflow import format_summary, run_score

    cfg = ScoreConfig(
        dataset=dataset, model=model, weights=weights, data_dir=data_dir, image_size=image_size,
        val_fraction=val_fraction, target_classes=list(target_class) if target_class else None, head=head,
        influence=InfluenceConfig(score=score, head_params=head_params, head_damping=head_damping,  # type: ignore[arg-type]
                                  solver=solver, curvature=hessian, damping=damping,  # type: ignore[arg-type]
                                  curvature_samples=curvature_samples or None, max_iter=max_iter, tol=tol,
                                  lissa_scale=lissa_scale, batch_size=batch_size, seed=seed),
        params=list(params) if params else None, drop=drop, drop_threshold=drop_threshold, drop_budget=drop_budget,
        **({"auto_budgets": list(auto_budget)} if auto_budget else {}), auto_epochs=auto_epochs,
        actors=actors, shard_size=shard_size, out=out, seed=seed, resume=resume, address=address,
    )
    summary = run_score(cfg, progress=True)
    typer.echo(format_summary(summary))
    typer.echo(f"mask: {summary['mask']}")


@app.command()
@user_errors
def inspect(
    mask: str = typer.Argument(..., help="A mask.parquet (or the directory holding it)."),
    png: Optional[str] = typer.Option(None, help="Where to write the score plot (default: beside the mask)."),
) -> None:
    """Print a mask's summary again and plot its score distribution per class."""
    from .workflow import inspect_mask

    text, path = inspect_mask(mask, png)
    typer.echo(text)
    typer.echo(f"plot: {path}")


@app.command()
def datasets() -> None:
    """List the dataset names `--dataset` accepts."""
    from .data import DATASETS

    for name, info in DATASETS.items():
        typer.echo(f"{name:<16} {info.description}")
    typer.echo(f"{'npz:PATH':<16} arrays x_train, y_train, x_test, y_test [, x_val, y_val] (uint8 images)")
    typer.echo(f"{'folder:PATH':<16} images in train/<class>/*, test/<class>/* [, val/<class>/*]")


@app.command()
@user_errors
def prepare(
    dataset: str = typer.Option(..., help="Dataset to prepare: a registry name (see `idtl-ray datasets`), npz:PATH or folder:PATH."),
    out: str = typer.Option(..., help="Directory to write: a local path or a URI pyarrow opens (s3://bucket/prefix)."),
    data_dir: Optional[str] = typer.Option(None, help=help_of(S, "data_dir")),
    image_size: Optional[int] = typer.Option(None, help="Resize the images to this size (pixels)."),
    val_fraction: float = typer.Option(0.1, help=help_of(S, "val_fraction")),
    seed: int = typer.Option(0, help="Seed of the train/validation split written into the `split` column."),
    shard_mb: int = typer.Option(192, help="Target payload of one Parquet shard in MiB (small datasets give one per split)."),
) -> None:
    """Write a dataset as Parquet shards plus manifest.json; every command accepts the directory as --dataset."""
    from .data.prepare import format_summary, prepare_dataset

    manifest = prepare_dataset(dataset, out, data_dir=data_dir, image_size=image_size, val_fraction=val_fraction,
                               seed=seed, shard_bytes=shard_mb * 2**20)
    typer.echo(format_summary(manifest, out))
    typer.echo(f"manifest: {out.rstrip('/')}/manifest.json")


try:  # training commands (Ray Train / Tune) live in their own module
    from .cli_train import register as _register_train

    _register_train(app)
except ImportError as _e:  # pragma: no cover - only while the module is missing
    if "cli_train" not in str(_e):
        raise


def main() -> None:  # pragma: no cover
    """The `idtl-ray` command: Ray's known-harmless error lines are kept off the terminal
    (scoring.session.KNOWN_RAY_NOISE), then the typer app runs."""
    from .scoring.session import filter_ray_noise

    filter_ray_noise()
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
