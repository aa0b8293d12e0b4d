"""What every `idtl-ray` command shares: user errors as one line (bad settings and command lines that
do not parse alike), quiet Ray defaults."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import socket
import sys
import traceback
import typing
from collections.abc import Callable, Iterator
from typing import Any

import typer
from typer._click.exceptions import BadParameter, MissingParameter, NoSuchOption, UsageError
from typer.core import TyperGroup

from .cli_options import strip_none
from .errors import IdtlError


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """IdtlError -> one line `error: ...` on stderr and exit code 2; Ctrl-C -> a resume hint, exit 130.

    Ray failing to start or to join ``--address`` (anything raised inside ``ray.init``) is a user
    error too: one line naming the fix instead of Ray's traceback. A command with an ``address``
    argument first checks that a ``host:port`` address answers at all, since ``ray.init`` retries an
    unreachable one for minutes.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        address = kwargs.get("address")
        try:
            check_ray_address(address if isinstance(address, str) else None)
            return fn(*args, **kwargs)
        except IdtlError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished work is saved; re-run the same command (score: with --resume)", err=True)
            raise typer.Exit(130) from None
        except Exception as e:
            msg = ray_start_error(e, address if isinstance(address, str) else None)
            if msg is None:
                raise
            typer.echo(f"error: {msg}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _raised_in_ray_init(e: BaseException) -> bool:
    """Whether ``e`` came out of ``ray.init`` (the function itself or anything it called)."""
    ray = sys.modules.get("ray")
    init = getattr(ray, "init", None)
    code = getattr(inspect.unwrap(init), "__code__", None) if init is not None else None
    return code is not None and any(frame.f_code is code for frame, _ in traceback.walk_tb(e.__traceback__))


def ray_start_error(e: BaseException, address: str | None = None) -> str | None:
    """The one-line message for Ray failing to start or to connect, or None for any other error."""
    if not _raised_in_ray_init(e):
        return None
    lines = str(e).strip().splitlines()
    first = (lines[0] if lines else type(e).__name__)[:200]
    address = address or os.environ.get("RAY_ADDRESS")
    if "timed out during startup" in first:
        return (f"the local Ray did not start in time ({first.split('. ')[0]}): the machine is overloaded; retry, or "
                "start one with `ray start --head` and pass --address auto")
    if address and address != "local":
        return (f"could not join the Ray cluster at {address} ({first}): pass --address host:port of the head node "
                "(or auto for one started on this machine with `ray start --head`), or leave --address out (and unset "
                "RAY_ADDRESS) to start a local Ray")
    return (f"the local Ray did not start ({type(e).__name__}: {first}): retry; if it fails again, start one with "
            "`ray start --head` (its logs say why) and pass --address auto")


def check_ray_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Refuse a ``host:port`` (or ``ray://host:port``) address that does not accept connections.

    ``ray.init`` retries an unreachable cluster for minutes before it gives up; a TCP connect says
    the same in seconds. Other forms (``auto``, ``local``, malformed ones) are left to Ray.
    """
    if not address or address in ("auto", "local"):
        return
    host, sep, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise IdtlError(f"cannot reach the Ray cluster at --address {address} ({why}): check the head node's host:port "
                        "and that its Ray is running (`ray status` there), or leave --address out to start a local "
                        "Ray") from None


def quiet_ray() -> None:
    """Defaults that keep Ray's own output out of the way of ours (set before Ray starts)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


class OneLineErrorsGroup(TyperGroup):
    """The app's command group: a command line that does not parse (``--drop-budget abc``, a bad choice,
    an unknown option or command, a missing required option) prints one line ``error: ...`` and exits
    with 2, like every other user error, instead of the parser's boxed message."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        with _usage_errors_as_one_line():
            return super().parse_args(ctx, args)

    def resolve_command(self, ctx: typer.Context, args: list[str]) -> Any:
        name, cmd, rest = super().resolve_command(ctx, args)
        ctx.meta["idtl_ray.command"] = f"{ctx.command_path} {name}"  # for errors that carry no context
        return name, cmd, rest

    def invoke(self, ctx: typer.Context) -> Any:
        with _usage_errors_as_one_line(ctx):  # the command's own parsing happens here
            return super().invoke(ctx)


@contextlib.contextmanager
def _usage_errors_as_one_line(ctx: typer.Context | None = None) -> Iterator[None]:
    try:
        yield
    except UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `idtl-ray` alone prints its help
            raise
        command = ctx.meta.get("idtl_ray.command", ctx.command_path) if ctx is not None else None
        typer.echo(f"error: {usage_message(e, command)}", err=True)
        raise typer.Exit(2) from None


def usage_message(e: UsageError, command: str | None = None) -> str:
    """One line for a command line that does not parse: the option, the bad value, what it takes.

    ``command`` names the command when the error carries no context of its own.
    """
    command = e.ctx.command_path if e.ctx is not None else (command or "idtl-ray")
    see = f" (see `{command} --help`)"
    param = getattr(e, "param", None)
    names = " / ".join(param.opts) if param is not None and getattr(param, "opts", None) else None
    if param is not None and getattr(param, "param_type_name", "") == "argument":
        names = str(param.name).upper()
    if isinstance(e, MissingParameter) and names:
        return f"{command} needs {names}: {param.help or ''}".rstrip(": ") + see
    if isinstance(e, BadParameter) and names:
        value = _bad_input(e)
        if value is not None:
            return f"{names} takes {expected_value(param)}, got {value!r}"
        return f"{names}: {e.message}"
    if isinstance(e, NoSuchOption):
        maybe = f"; did you mean {' or '.join(sorted(e.possibilities))}?" if e.possibilities else ""
        return f"{command} has no option {e.option_name}{maybe}{see}"
    msg = e.format_message().strip()
    return (msg[:1].lower() + msg[1:]).rstrip(".") + _repeat_hint(e, msg) + see


def _repeat_hint(e: UsageError, msg: str) -> str:
    """``--auto-budget 0.1 0.2`` leaves ``0.2`` as an extra argument: say that such options are repeated."""
    params = e.ctx.command.params if e.ctx is not None else []
    several = [p.opts[0] for p in params if getattr(p, "multiple", False) and getattr(p, "opts", None)]
    if not several or not msg.startswith("Got unexpected extra argument"):
        return ""
    which = several[0] if len(several) == 1 else f"{', '.join(several[:-1])} and {several[-1]}"
    return f"; {which} take{'s' if len(several) == 1 else ''} one value each time, e.g. {several[-1]} A {several[-1]} B"


def _bad_input(e: BadParameter) -> Any:
    """The value that failed to parse (Typer keeps it on the validation error it raised from)."""
    errors = getattr(e.__cause__, "errors", None)
    try:
        return errors()[0]["input"] if callable(errors) else None
    except (IndexError, KeyError, TypeError):
        return None


def expected_value(param: Any) -> str:
    """What an option takes, in words: ``a whole number``, ``a number``, ``self or paper``, ..."""
    desc = getattr(param, "type_descriptor", None)
    choices = getattr(desc, "choices", None)
    if choices:
        words = [str(c) for c in choices]
        return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
    hint = strip_none(getattr(desc, "annotation", None))
    if typing.get_origin(hint) is list:  # a repeatable option: what each value takes
        hint = strip_none(typing.get_args(hint)[0])
    words = {int: "a whole number", float: "a number", bool: "true or false"}
    return words.get(hint, "a value") if isinstance(hint, type) else "a value"
