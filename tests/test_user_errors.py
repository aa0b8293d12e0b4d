"""Mistakes a new user makes (issue 11, item 7): each gives one clear line, early, naming the fix.

No test here starts Ray except where it says so; the settings checks must fail before Ray or the data.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from idtl_ray.config import ScoreConfig
from idtl_ray.errors import IdtlError, InputError, WeightsError
from idtl_ray.influence import InfluenceConfig, InfluenceEngine, score_samples

PAPER = InfluenceConfig(score="paper")


# ── a. settings checked before any data loads or Ray starts ──────────────────────────────────────


@pytest.mark.parametrize("kw, match", [
    ({"drop": "budget", "drop_budget": -1}, "drop budget must be >= 0"),
    ({"drop_budget": 0.2}, "--drop-budget applies to --drop budget and --drop paper"),  # --drop auto would ignore it
    ({"shard_size": 0}, "--shard-size must be >= 1"),
    ({"params": ["fc2"]}, "--param chooses the parameters of --score paper"),
    ({"params": ["fc2", "fc3"], "influence": PAPER}, "--param fc3: sample-cnn has no such module.*fc1, fc2"),
    ({"params": ["layer9"], "model": "resnet50", "influence": PAPER}, r"--param layer9: .*layer4.*e\.g\. layer4\.2\."),
    ({"model": "resnet"}, "unknown model 'resnet': use one of"),
    ({"drop_threshold": -0.5}, "--drop-threshold applies to --drop paper only"),
    ({"drop": "paper", "influence": PAPER, "drop_threshold": float("nan")}, "--drop-threshold must be a finite number"),
    ({"head_steps": 0}, "--head-steps must be >= 1"),
    ({"target_classes": [-1]}, "--target-class takes class indices >= 0"),
])
def test_score_settings_fail_at_construction(kw, match) -> None:
    with pytest.raises(InputError, match=match):
        ScoreConfig(**kw)


def test_missing_weights_file_fails_at_construction(tmp_path) -> None:
    with pytest.raises(WeightsError, match="weights file .*nope.pt not found"):
        ScoreConfig(weights=str(tmp_path / "nope.pt"))
    ScoreConfig(weights=str(tmp_path / "nope.pt"), resume=True)  # a resumed run reuses its saved model.pt


def test_good_params_pass() -> None:
    assert ScoreConfig(params=["fc2", "conv1.weight"], influence=PAPER).params == ["fc2", "conv1.weight"]
    assert ScoreConfig(model="resnet50", params=["layer4", "fc"], influence=PAPER).params == ["layer4", "fc"]


def test_cli_refuses_bad_settings_before_ray_starts(tmp_path, monkeypatch) -> None:
    """One `error:` line, exit 2, and neither the data nor Ray was touched."""
    import ray
    from typer.testing import CliRunner

    from idtl_ray import cli

    started: list[str] = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append("ray"))
    for args, match in ((["--shard-size", "0"], "--shard-size must be >= 1"),
                        (["--drop", "budget", "--drop-budget", "1.5"], "must be a whole number"),
                        (["--score", "paper", "--param", "fc9"], "--param fc9: sample-cnn has no such module")):
        res = CliRunner().invoke(cli.app, ["score", "--dataset", "npz:/does/not/exist.npz", "--out", str(tmp_path / "o"),
                                           *args])
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], lines
    assert not started and not (tmp_path / "o").exists()


def test_every_param_name_must_select_something() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert InfluenceEngine(model, params=["2"], device="cpu").space.names == ["2.weight", "2.bias"]
    with pytest.raises(InputError, match=r"params=\['typo'\] matches no trainable parameter"):
        InfluenceEngine(model, params=["2", "typo"], device="cpu")  # the typo is not dropped silently


def test_params_with_self_influence_is_refused() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    data = [(torch.randn(4), i % 2) for i in range(8)]
    with pytest.raises(InputError, match="params chooses the parameters of score='paper'"):
        score_samples(model, data, params=["1"], device="cpu")
