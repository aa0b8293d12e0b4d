"""Command-line options generated from the typed config dataclasses (the style of Kronfluence's arguments).

Each setting is declared once, as a dataclass field whose ``metadata`` carries its one-line help; this
module turns the fields into Typer options (names, types, help, defaults, choices) and the parsed
values back into the dataclass. A command names the dataclasses it takes and declares only its extra
options::

    @app.command("finetune")
    @user_errors
    @with_options(cfg=Options(FinetuneConfig, skip=("fault_inject_kill_epoch",)))
    def finetune_cmd(cfg: FinetuneConfig, dry_run: bool = typer.Option(False, "--dry-run", help="...")) -> None:
        ...

Adding a field to a config dataclass is therefore enough to give every command that takes the
dataclass a new option (``pretrain``, which lists its fields with ``only``, takes the fields that
``finetune.pretrain`` accepts).

What a field's ``metadata`` may say (a command overrides it per field with ``Options.override``, keyed by
the field name, or ``outer.inner`` for a field of a nested dataclass):

- ``help``: the one-line help.
- ``cli``: ``False`` keeps the field off the command line (internal or test-only settings).
- ``flags``: the option's names instead of ``--field-name`` (e.g. ``("--target-class",)``).
- ``aliases``: more names beside those (e.g. ``("--hessian",)`` beside ``--curvature``).
- ``choices``: the values allowed (default: those of a ``Literal`` type).
- ``default``: the command line's default, where a command's differs from the dataclass's.
- ``required``: ``True``: the option must be given.
- ``none_if``: the command-line value that stands for ``None`` (e.g. ``0`` for "all").

Booleans are flags: ``--name`` when the default is False, ``--name/--no-name`` when it is True. A list
field is a repeatable option; given no value, the dataclass's default applies. A field whose type is a
dataclass (``ScoreConfig.influence``) contributes its own fields, under their plain names.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, TypeVar, Union

import typer

R = TypeVar("R")

META_KEYS = frozenset({"help", "cli", "flags", "aliases", "choices", "default", "required", "none_if"})
_NO_DEFAULT = dataclasses.MISSING
MAX_CHOICES_WIDTH = 18  # longest "a|b|c" shown as the option's type in --help


@dataclass(frozen=True)
class OptionField:
    """One leaf field of a config dataclass, as one command-line option."""

    key: str  # "curvature" or "influence.curvature"
    name: str  # the command function's parameter name (the leaf field's name)
    hint: Any  # the field's resolved type
    default: Any  # the dataclass default (``dataclasses.MISSING`` when none)
    meta: Mapping[str, Any]  # the field's metadata merged with the command's overrides
    factory: Callable[[], Any] | None = None  # the dataclass's default_factory, if any

    @property
    def is_list(self) -> bool:
        """Whether the field holds a list (a repeatable option)."""
        return typing.get_origin(strip_none(self.hint)) is list

    def choices(self) -> tuple[Any, ...] | None:
        """The values allowed: metadata ``choices``, else the values of a ``Literal`` type."""
        if self.meta.get("choices"):
            return tuple(self.meta["choices"])
        inner = strip_none(self.hint)
        if self.is_list:
            inner = typing.get_args(inner)[0]
        return typing.get_args(inner) if typing.get_origin(inner) is Literal else None

    def cli_default(self) -> Any:
        """The default the command line shows and passes (``...`` for a required option)."""
        if self.meta.get("required"):
            return ...
        if "default" in self.meta:
            return self.meta["default"]
        if self.is_list or self.factory is not None:  # not given: the dataclass's default (see make)
            return None
        return ... if self.default is _NO_DEFAULT else self.default

    def flags(self) -> tuple[str, ...]:
        """The option's names: metadata ``flags`` (or ``--field-name``, a flag pair for a True boolean), then aliases."""
        names = tuple(self.meta.get("flags") or ())
        if not names:
            dashed = "--" + self.name.replace("_", "-")
            is_on = self.hint is bool and self.cli_default() is True
            names = (f"{dashed}/--no-{dashed[2:]}",) if is_on else (dashed,)
        return names + tuple(self.meta.get("aliases") or ())

    def help(self) -> str:
        """The help line: the field's, marked repeatable for a list, with a list default spelled out."""
        text = str(self.meta.get("help", ""))
        if self.is_list:
            text = "Repeatable. " + text
            default = self.meta.get("default", self.factory() if self.factory else self.default)
            if default and default is not _NO_DEFAULT:
                text += " Default: " + " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default) + "."
        return text

    def annotation(self) -> Any:
        """The type Typer parses the value into (choices as a ``Literal``)."""
        choices = self.choices()
        base = strip_none(self.hint)
        if choices:
            lit = Literal.__getitem__(choices)  # type: ignore[attr-defined]
            base = list[lit] if self.is_list else lit  # type: ignore[valid-type]
        return Optional[base] if self.cli_default() is None else base  # noqa: UP007 (a runtime type object)

    def parameter(self) -> inspect.Parameter:
        """The keyword-only parameter whose default is the ``typer.Option`` of this field."""
        choices, text = self.choices(), self.help()
        wide = bool(choices) and len("|".join(map(str, choices))) > MAX_CHOICES_WIDTH
        if wide:  # a long <a|b|c> type would squeeze every help line: the values go into the help instead
            text += " One of: " + ", ".join(map(str, choices or ())) + "."
        option = typer.Option(self.cli_default(), *self.flags(), help=text, show_choices=not wide)
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                 annotation=self.annotation())  # fmt: skip

    def value(self, given: Any) -> Any:
        """The dataclass value for what the command line gave (``none_if`` -> None)."""
        if "none_if" in self.meta and given == self.meta["none_if"]:
            return None
        return list(given) if self.is_list else given


def strip_none(hint: Any) -> Any:
    """``int | None`` -> ``int``; other types unchanged."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _nested(hint: Any) -> type | None:
    """The dataclass a field holds, if it holds one."""
    inner = strip_none(hint)
    return inner if isinstance(inner, type) and dataclasses.is_dataclass(inner) else None


@dataclass(frozen=True)
class Options:
    """The fields of config dataclass ``cls`` as the options of one command.

    ``only``: the top-level fields to offer (default: all but ``skip`` and those with ``cli: False``);
    ``skip``: fields left out (``outer.inner`` for a nested one); ``override``: per-field metadata
    (``{field: {key: value}}``) over the dataclass's; ``build``: ``True`` hands the command a ``cls``
    instance, ``False`` a dict of the field values (for an API that takes them as keyword arguments).
    Unknown field names and metadata keys fail here, when the command is defined.
    """

    cls: type
    only: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()
    override: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    build: bool = True

    def __post_init__(self) -> None:
        known = {of.key for of in self._walk(self.cls, "", everything=True)}
        known |= {f.name for f in dataclasses.fields(self.cls)}
        for key in (*self.skip, *(self.only or ()), *self.override):
            if key not in known:
                raise ValueError(f"{self.cls.__name__} has no field {key!r} (in Options only/skip/override)")
        for key, meta in self.override.items():
            if bad := set(meta) - META_KEYS:
                raise ValueError(f"unknown option metadata {sorted(bad)} for {key!r}; use {sorted(META_KEYS)}")

    def _walk(self, cls: type, prefix: str, everything: bool = False) -> Iterator[OptionField]:
        """The leaf fields of ``cls`` offered on the command line (every leaf with ``everything``)."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = prefix + f.name
            meta = {**f.metadata, **self.override.get(key, {})}
            if not everything and (key in self.skip or meta.get("cli") is False
                                   or (not prefix and self.only is not None and f.name not in self.only)):
                continue
            if (inner := _nested(hints[f.name])) is not None:
                yield from self._walk(inner, key + ".", everything)
                continue
            factory = None if f.default_factory is _NO_DEFAULT else f.default_factory
            yield OptionField(key, f.name, hints[f.name], f.default, meta, factory)

    @functools.cached_property
    def fields(self) -> tuple[OptionField, ...]:
        """The options, in the dataclass's field order (a nested dataclass's at its field)."""
        return tuple(self._walk(self.cls, ""))

    def parameters(self) -> list[inspect.Parameter]:
        """The Typer parameters of the options."""
        return [of.parameter() for of in self.fields]

    def make(self, values: Mapping[str, Any]) -> Any:
        """The ``cls`` instance (or the dict, ``build=False``) from the parsed command-line ``values``."""
        kwargs = self._kwargs(self.cls, "", values)
        return self.cls(**kwargs) if self.build else kwargs

    def _kwargs(self, cls: type, prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
        by_key = {of.key: of for of in self.fields}
        hints = typing.get_type_hints(cls)
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = prefix + f.name
            if (inner := _nested(hints[f.name])) is not None:
                if any(k.startswith(key + ".") for k in by_key):
                    out[f.name] = inner(**self._kwargs(inner, key + ".", values))
            elif key in by_key:
                of, given = by_key[key], values[by_key[key].name]
                if not (of.is_list and not given):  # a repeatable option not given: the dataclass default
                    out[f.name] = of.value(given)
        return out


def with_options(**specs: Options) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Give a command the options of ``specs`` (parameter name -> :class:`Options`).

    The decorated function receives, under each such name, the object the options build; its other
    parameters are its own options (declared with ``typer.Option`` as usual). ``--help`` lists the
    command's own required options first, then the generated ones, then its other own options.
    """

    def decorate(fn: Callable[..., R]) -> Callable[..., R]:
        hints = typing.get_type_hints(fn)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(fn).parameters.values() if p.name not in specs]  # fmt: skip
        first = [p for p in own if _required(p)]
        params = first + [p for spec in specs.values() for p in spec.parameters()] + [p for p in own if p not in first]
        names = [p.name for p in params]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"{fn.__name__}: options declared twice: {', '.join(dupes)}")

        @functools.wraps(fn)
        def command(**values: Any) -> R:
            made = {name: spec.make(values) for name, spec in specs.items()}
            return fn(**{p.name: values[p.name] for p in own}, **made)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def _required(p: inspect.Parameter) -> bool:
    """Whether a command's own parameter is a required option (or the context, listed first)."""
    return getattr(p.default, "default", None) is ... or p.default is inspect.Parameter.empty

