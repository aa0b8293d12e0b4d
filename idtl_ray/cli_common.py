"""What every `idtl-ray` command shares: user errors as one line, quiet Ray defaults."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import typer

from .errors import IdtlError


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """IdtlError -> one line `error: ...` on stderr and exit code 2; Ctrl-C -> a resume hint, exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except IdtlError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished work is saved; re-run the same command (score: with --resume)", err=True)
            raise typer.Exit(130) from None

    return wrapper


def quiet_ray() -> None:
    """Defaults that keep Ray's own output out of the way of ours (set before Ray starts)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
