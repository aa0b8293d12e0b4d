"""The command line generated from the config dataclasses (issue 12, item 4).

- ``--help`` of every command is pinned by golden files (tests/golden/help-<cmd>.txt);
- a value that does not parse gets one line ``error: ...`` and exit code 2, like every other user error;
- the generator: a dataclass field is an option (help, default, choices, flags), and the values the
  command line gives come back as the dataclass.

No test here starts Ray.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import pytest
import typer
from typer.testing import CliRunner

from idtl_ray import cli
from idtl_ray.cli_common import OneLineErrorsGroup
from idtl_ray.cli_options import Options, with_options
from idtl_ray.config import ScoreConfig
from idtl_ray.finetune import FinetuneConfig
from idtl_ray.influence import InfluenceConfig

GOLDEN = Path(__file__).parent / "golden"
COMMANDS = ["", "score", "inspect", "datasets", "prepare", "pretrain", "finetune", "compare", "sweep"]
UPDATE = "IDTL_UPDATE_GOLDEN"


def _help(monkeypatch: pytest.MonkeyPatch, command: str) -> str:
    """``idtl-ray <command> --help`` as a 100-column plain terminal shows it (trailing blanks dropped)."""
    from typer import rich_utils

    monkeypatch.setattr(rich_utils, "MAX_WIDTH", 100)  # what COLUMNS=100 gives; TERMINAL_WIDTH would override it
    monkeypatch.setattr(rich_utils, "FORCE_TERMINAL", False)  # CI sets GITHUB_ACTIONS / FORCE_COLOR
    monkeypatch.setattr(rich_utils, "COLOR_SYSTEM", None)
    res = CliRunner().invoke(cli.app, [*([command] if command else []), "--help"],
                             env={"COLUMNS": "100", "TERM": "dumb", "NO_COLOR": "1"}, prog_name="idtl-ray")
    assert res.exit_code == 0, res.output
    return "\n".join(line.rstrip() for line in res.stdout.splitlines()).strip("\n") + "\n"


@pytest.mark.parametrize("command", COMMANDS, ids=[c or "idtl-ray" for c in COMMANDS])
def test_help_matches_golden(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI is pinned: an option that appears, disappears or changes shows up here as a diff."""
    path = GOLDEN / f"help-{command or 'idtl-ray'}.txt"
    text = _help(monkeypatch, command)
    if os.environ.get(UPDATE) == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"{path} is missing: run `{UPDATE}=1 .venv/bin/python -m pytest {__file__}` once"
    want = path.read_text(encoding="utf-8")
    if text != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True), str(path), "now"))
        pytest.fail(f"`idtl-ray {command} --help` changed:\n{diff}\nIf the change is intended, regenerate the golden "
                    f"files with `{UPDATE}=1 .venv/bin/python -m pytest tests/test_cli_options.py -k golden` and "
                    "commit them with the change (review the diff: no option may disappear or change meaning).")


# ── a command line that does not parse: one line, exit 2 ────────────────────────────────────────


@pytest.mark.parametrize("args, line", [
    (["score", "--drop-budget", "abc"], "error: --drop-budget takes a number, got 'abc'"),
    (["finetune", "--epochs", "x"], "error: --epochs takes a whole number, got 'x'"),
    (["finetune", "--epochs", "1.5"], "error: --epochs takes a whole number, got '1.5'"),
    (["score", "--score", "x"], "error: --score takes self or paper, got 'x'"),
    (["score", "--hessian", "newton"], "error: --curvature / --hessian takes ggn or exact, got 'newton'"),
    (["finetune", "--strategy", "both"], "error: --strategy takes scratch, model or instance, got 'both'"),
    (["score", "--target-class", "3", "--target-class", "a"], "error: --target-class takes a whole number, got 'a'"),
    (["sweep", "--frozen", "2", "--out", "o", "--max-concurrent", "two"],
     "error: --max-concurrent takes a whole number, got 'two'"),
    (["prepare", "--dataset", "digits", "--out", "o", "--shard-mb", "big"], "error: --shard-mb takes a whole number, got 'big'"),
    (["sweep", "--out", "o"], "error: idtl-ray sweep needs --frozen: Frozen-layer counts"),
    (["score", "--no-such-flag"], "error: idtl-ray score has no option --no-such-flag"),
    (["score", "--dataset"], "error: option '--dataset' requires an argument (see `idtl-ray score --help`)"),
    (["scroe"], "error: no such command 'scroe'. Did you mean 'score'?"),
    (["score", "--auto-budget", "0.1", "0.2"], "error: got unexpected extra argument(s) (0.2); --target-class, --param "
     "and --auto-budget take one value each time, e.g. --auto-budget A --auto-budget B"),
    (["inspect", "a", "b"], "error: got unexpected extra argument(s) (b) (see"),  # no option to repeat: no hint
])  # fmt: skip
def test_bad_command_line_is_one_error_line(args: list[str], line: str, tmp_path: Path) -> None:
    res = CliRunner().invoke(cli.app, args, prog_name="idtl-ray")
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), lines
    assert "╭" not in res.output and "Usage:" not in res.output


def test_no_arguments_still_prints_the_help() -> None:
    res = CliRunner().invoke(cli.app, [])
    assert "Usage: " in res.output and "score" in res.output and "error:" not in res.output


# ── every field is an option; the options build the same object the API does ───────────────────


def _option_names(command: str) -> set[str]:
    cmd = typer.main.get_command(cli.app).commands[command]  # type: ignore[attr-defined]
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


def test_every_config_field_is_an_option() -> None:
    """A new ScoreConfig / InfluenceConfig / FinetuneConfig field becomes an option with no CLI edit."""
    score = _option_names("score")
    renamed = {"target_classes": "--target-class", "params": "--param", "auto_budgets": "--auto-budget"}
    for cls, skip in ((ScoreConfig, {"influence"}), (InfluenceConfig, {"seed"})):  # the influence seed is --seed
        for f in fields(cls):
            if f.name not in skip:
                assert renamed.get(f.name, "--" + f.name.replace("_", "-")) in score, f.name
    finetune = _option_names("finetune")
    for f in fields(FinetuneConfig):
        if f.name != "fault_inject_kill_epoch":  # test-only
            assert "--" + f.name.replace("_", "-") in finetune, f.name


def test_score_options_build_the_score_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from idtl_ray import workflow

    got: list[ScoreConfig] = []
    monkeypatch.setattr(workflow, "run_score", lambda cfg, progress: got.append(cfg) or {"mask": "m"})
    monkeypatch.setattr(workflow, "format_summary", lambda s: "")
    args = ["score", "--score", "paper", "--hessian", "exact", "--curvature-samples", "0", "--target-class", "1",
            "--target-class", "2", "--drop", "paper", "--drop-budget", "5", "--seed", "3", "--param", "fc2"]
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    want = ScoreConfig(target_classes=[1, 2], params=["fc2"], drop="paper", drop_budget=5, seed=3,
                       influence=InfluenceConfig(score="paper", curvature="exact", curvature_samples=None))
    assert got == [want]
    assert CliRunner().invoke(cli.app, ["score"]).exit_code == 0 and got[-1] == ScoreConfig()  # defaults = the API's


# ── the generator on its own ─────────────────────────────────────────────────────────────────────


@dataclass
class _Inner:
    kind: Literal["a", "b"] = field(default="a", metadata={"help": "Kind."})
    level: int | None = field(default=3, metadata={"help": "Level; 0 = none.", "none_if": 0})


@dataclass
class _Toy:
    name: str = field(metadata={"help": "Name."})
    gpus: float = field(default=0.0, metadata={"help": "GPUs."})
    sizes: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "A size.", "flags": ("--size",)})
    on: bool = field(default=True, metadata={"help": "On."})
    quick: bool = field(default=False, metadata={"help": "Quick.", "aliases": ("-q",)})
    inner: _Inner = field(default_factory=_Inner, metadata={"help": "Inner."})
    secret: int = field(default=0, metadata={"help": "Test only.", "cli": False})


def _toy_app(got: list[Any], **spec: Any) -> typer.Typer:
    app = typer.Typer(cls=OneLineErrorsGroup)

    @app.command()
    @with_options(cfg=Options(_Toy, **spec))
    def run(cfg: _Toy, extra: int = typer.Option(1, help="Own option.")) -> None:
        got.append((cfg, extra))

    @app.command()
    def other() -> None:  # two commands: a group, as the real app
        pass

    return app


def test_generator_builds_the_dataclass() -> None:
    got: list[Any] = []
    app = _toy_app(got)
    res = CliRunner().invoke(app, ["run", "--name", "n", "--gpus", "2", "--size", "4", "--size", "5", "--no-on", "-q",
                                   "--kind", "b", "--level", "0", "--extra", "7"])
    assert res.exit_code == 0, res.output
    assert got == [(_Toy("n", 2.0, [4, 5], False, True, _Inner("b", None)), 7)]
    res = CliRunner().invoke(app, ["run", "--name", "n"])  # defaults: the dataclass's
    assert res.exit_code == 0 and got[-1] == (_Toy("n"), 1)
    assert "--secret" not in CliRunner().invoke(app, ["run", "--help"]).output


def test_generator_errors_name_option_value_and_expectation() -> None:
    app = _toy_app([])
    for args, line in ((["run"], "error: toy run needs --name: Name. (see `toy run --help`)"),
                       (["run", "--name", "n", "--gpus", "many"], "error: --gpus takes a number, got 'many'"),
                       (["run", "--name", "n", "--kind", "c"], "error: --kind takes a or b, got 'c'")):
        res = CliRunner().invoke(app, args, prog_name="toy")
        assert res.exit_code == 2 and res.stderr.strip() == line, res.output


def test_generator_overrides_and_checks() -> None:
    got: list[Any] = []
    app = _toy_app(got, skip=("inner.level",), override={"name": {"default": "x"}, "gpus": {"aliases": ("--gpu",)}})
    assert CliRunner().invoke(app, ["run", "--gpu", "1"]).exit_code == 0
    assert got[-1][0] == _Toy("x", 1.0)
    assert "--level" not in CliRunner().invoke(app, ["run", "--help"]).output
    with pytest.raises(ValueError, match="has no field 'nmae'"):
        Options(_Toy, override={"nmae": {"help": "typo"}})
    with pytest.raises(ValueError, match="unknown option metadata"):
        Options(_Toy, override={"name": {"hlep": "typo"}})


def test_the_summary_says_how_many_classes_it_leaves_out() -> None:
    """It listed the first 100 classes and silently dropped the rest of a 1,000-class target."""
    from idtl_ray.summary import format_summary

    per = [{"label": c, "name": f"c{c}", "kept": 9, "dropped": 1} for c in range(150)]
    text = format_summary({"dataset": "d", "model": "m", "per_class": per, "n_train": 1500})
    assert "c99 " in text and "c100 " not in text and text.count("\n") < 120
    assert "... and 50 more classes (all in summary.json)" in text
