"""`idtl-ray` command line: score, inspect, datasets (and pretrain/finetune/compare/sweep from cli_train).

Every command prints a user error as one line (`error: ...`, exit code 2) and never leaves a partial
output file behind.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from .cli_common import OneLineErrorsGroup, quiet_ray, user_errors
from .cli_options import Options, with_options
from .config import ScoreConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=OneLineErrorsGroup,
                  help="Instance-based deep transfer learning on Ray: score the target data, drop what hurts, fine-tune.")

# `score` takes every ScoreConfig field (and the influence settings inside it); what differs on the
# command line is said here once. The influence seed is ScoreConfig.seed.
SCORE_OPTIONS = Options(ScoreConfig, skip=("influence.seed",), override={
    "influence.curvature": {"aliases": ("--hessian",)},
    "influence.curvature_samples": {"none_if": 0, "help": "Seeded subsample of training samples the curvature is "
                                                          "estimated on; 0 = all."},
})
# `prepare` writes a dataset as `score` would read it: the data settings only.
PREPARE_OPTIONS = Options(ScoreConfig, only=("dataset", "data_dir", "image_size", "val_fraction", "seed", "out"),
                          build=False, override={
    "dataset": {"required": True, "help": "Dataset to prepare: a registry name (see `idtl-ray datasets`), npz:PATH "
                                          "or folder:PATH."},
    "out": {"required": True, "help": "Directory to write: a local path or a URI pyarrow opens (s3://bucket/prefix)."},
    "seed": {"help": "Seed of the train/validation split written into the `split` column."},
})  # fmt: skip


@app.command()
@user_errors
@with_options(cfg=SCORE_OPTIONS)
def score(cfg: ScoreConfig) -> None:
    """Score every training sample with influence functions on Ray and write a Parquet mask."""
    quiet_ray()
    from .workflow import format_summary, run_score

    summary = run_score(cfg, progress=True)
    typer.echo(format_summary(summary))
    typer.echo(f"mask: {summary['mask']}")


@app.command()
@user_errors
def inspect(
    mask: str = typer.Argument(..., help="A mask.parquet (or the directory holding it)."),
    png: Optional[str] = typer.Option(None, help="Where to write the score plot: a .png file, or a directory (existing, or ending in /) for scores.png (default: beside the mask)."),
) -> None:
    """Print a mask's summary again and plot its score distribution per class."""
    from .mask import read_mask
    from .summary import format_summary, plot_path, plot_scores

    m = read_mask(mask)
    where = plot_path(mask, png)  # a --png that is no PNG path is refused before anything prints
    typer.echo(format_summary(m.meta, m))  # first: a mask in a read-only place still shows its summary
    typer.echo(f"plot: {plot_scores(m, where)}")


@app.command()
def datasets() -> None:
    """List the dataset names `--dataset` accepts."""
    from .data import DATASETS

    for name, info in DATASETS.items():
        typer.echo(f"{name:<16} {info.description}")
    typer.echo(f"{'npz:PATH':<16} arrays x_train, y_train, x_test, y_test [, x_val, y_val] (uint8 images)")
    typer.echo(f"{'folder:PATH':<16} images in train/<class>/*, test/<class>/* [, val/<class>/*]")
    typer.echo(f"{'DIR':<16} a directory written by `idtl-ray prepare` (Parquet shards + manifest.json; local, a mount or s3://)")


@app.command()
@user_errors
@with_options(kw=PREPARE_OPTIONS)
def prepare(
    kw: dict,
    shard_mb: int = typer.Option(192, help="Target payload of one Parquet shard in MiB, 1..1024 (small datasets give one per split)."),
) -> None:
    """Write a dataset as Parquet shards plus manifest.json; every command accepts the directory as --dataset."""
    from .data.prepare import format_summary, prepare_dataset

    dataset, out = kw.pop("dataset"), kw.pop("out")
    manifest = prepare_dataset(dataset, out, **kw, shard_bytes=shard_mb * 2**20)
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
    from .scoring.session import filter_ray_noise, stop_on_sigterm

    filter_ray_noise()
    stop_on_sigterm()  # `ray job stop` or `kill`: the same clean end as Ctrl-C
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
