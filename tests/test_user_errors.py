"""Mistakes a new user makes (issue 11, item 7): each gives one clear line, early, naming the fix.

No test here starts Ray except where it says so; the settings checks must fail before Ray or the data.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from idtl_ray.config import ScoreConfig
from idtl_ray.errors import InputError, WeightsError
from idtl_ray.influence import InfluenceConfig, InfluenceEngine, score_samples

PAPER = InfluenceConfig(score="paper")


# ── a. settings checked before any data loads or Ray starts ──────────────────────────────────────


@pytest.mark.parametrize("kw, match", [
    ({"drop": "budget", "drop_budget": -1}, "drop budget must be a finite number >= 0"),
    ({"drop_budget": 0.2}, "--drop-budget applies to --drop budget and --drop paper"),  # --drop auto would ignore it
    ({"shard_size": 0}, "--shard-size must be >= 1"),
    ({"params": ["fc2"]}, "--param chooses the parameters of --score paper"),
    ({"params": ["fc2", "fc3"], "influence": PAPER}, "--param fc3: sample-cnn has no such module.*fc1, fc2"),
    ({"params": ["layer9"], "model": "resnet50", "influence": PAPER}, r"--param layer9: .*layer4.*e\.g\. layer4\.2\."),
    ({"model": "resnet"}, "unknown model 'resnet': use one of"),
    ({"drop_threshold": -0.5}, "--drop-threshold applies to --drop paper only"),
    ({"drop": "paper", "influence": PAPER, "drop_threshold": float("nan")}, "--drop-threshold must be a finite number"),
    ({"head_steps": 0}, "--head-steps must be >= 1"),
    ({"target_classes": [-1], "influence": PAPER}, "--target-class takes class indices >= 0"),
    ({"target_classes": [3]}, "--target-class picks the validation samples .*--score self.*add --score paper"),
    ({"drop": "budget", "drop_budget": 0.1, "auto_epochs": 3}, "--auto-epochs applies to --drop auto only, not --drop budget"),
    ({"drop": "budget", "drop_budget": 0.1, "auto_budgets": [0.5], "auto_epochs": 3},
     "--auto-budget and --auto-epochs apply to --drop auto only"),
    ({"auto_budgets": [float("inf")]}, "a drop budget must be a finite number >= 0, got inf"),
    ({"influence": {"tol": -1.0}}, "--tol must be a finite number > 0"),
    ({"seed": -1}, "--seed must be >= 0, got -1"),
    ({"influence": {"lissa_scale": float("nan")}}, "--lissa-scale must be a finite number > 0, got nan"),
])
def test_score_settings_fail_at_construction(kw, match) -> None:
    with pytest.raises(InputError, match=match):
        ScoreConfig(**kw)


def test_score_api_refuses_classes_without_the_papers_score(monkeypatch) -> None:
    """idtl_ray.score(classes=...) with self-influence (no validation gradient) would silently ignore them."""
    import ray

    import idtl_ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.arange(8) % 2)
    with pytest.raises(InputError, match="classes picks the validation samples .*InfluenceConfig\\(score='paper'\\)"):
        idtl_ray.score(nn.Linear(3, 2), data, data, classes=[1])


@pytest.mark.parametrize("kw, labels, match", [
    ({"drop_budget": 8}, torch.arange(8) % 2, "drop_budget 8 would drop all 8 training samples"),
    ({"drop_threshold": -0.1}, torch.arange(8) % 2, "drop_threshold is the paper's rule"),
    ({"drop_threshold": float("nan"), "config": PAPER}, torch.arange(8) % 2, "drop_threshold must be a finite number"),
    ({}, torch.arange(8) % 2 + 0.7, "labels must be integers .*float"),  # 1.7 would have become class 1
])
def test_score_api_refuses_what_the_cli_refuses_before_ray(monkeypatch, kw, labels, match) -> None:
    """The Python API applies the CLI's rules: no mask that keeps nothing, no ignored threshold, no truncated labels."""
    import ray

    import idtl_ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    data = torch.utils.data.TensorDataset(torch.randn(8, 3), labels)
    with pytest.raises(InputError, match=match):
        idtl_ray.score(nn.Linear(3, 2), data, torch.utils.data.TensorDataset(torch.randn(4, 3), torch.arange(4) % 2), **kw)


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


@pytest.mark.parametrize("args, match", [
    (["pretrain", "--dataset", "nosuch", "--out", "{tmp}/src.pt"], "unknown dataset 'nosuch'; valid names"),
    (["pretrain", "--epochs", "0", "--out", "{tmp}/src.pt"], "--epochs must be >= 1, got 0"),
    (["finetune", "--strategy", "scratch", "--dataset", "npz:{tmp}/none.npz", "--out", "{tmp}/o"], "file not found"),
    (["finetune", "--strategy", "instance", "--weights", "imagenet", "--mask", "{tmp}/none", "--out", "{tmp}/o"],
     "mask {tmp}/none not found"),
    (["finetune", "--strategy", "scratch", "--max-failures", "-3", "--dry-run"], "--max-failures must be >= 0, or -1"),
    (["finetune", "--strategy", "scratch", "--model", "densenet121", "--dry-run"],
     "densenet121 cannot take 8px images (a feature map shrinks to nothing): pass --image-size 16 or more"),
    (["compare", "--weights", "imagenet", "--epochs", "0", "--out", "{tmp}/c"], "--epochs must be >= 1, got 0"),
    (["compare", "--dataset", "nosuch", "--weights", "imagenet", "--out", "{tmp}/c"], "unknown dataset 'nosuch'"),
    # a path, not a name: say it does not exist (a shared mount missing on this node), not "unknown dataset"
    (["compare", "--dataset", "{tmp}/mnt/cifar100", "--weights", "imagenet", "--out", "{tmp}/c"],
     "--dataset {tmp}/mnt/cifar100 does not exist; check the path (is the shared storage mounted"),
    (["compare", "--weights", "{tmp}/none.pt", "--mask", "{tmp}/m", "--out", "{tmp}/c"], "weights file {tmp}/none.pt not found"),
    (["prepare", "--dataset", "digits", "--shard-mb", "-1", "--out", "{tmp}/p"], "--shard-mb must be in 1..1024"),
    # Arrow cannot concatenate a binary column over 2 GiB: such a shard read back as "damaged"
    (["prepare", "--dataset", "digits", "--shard-mb", "4096", "--out", "{tmp}/p"], "--shard-mb must be in 1..1024"),
    (["score", "--curvature-samples", "-5"], "--curvature-samples must be >= 1, or 0 for all"),
    # outputs are files: an s3:// --out would become a local folder s3:/...; refused, and not advised by the refusal
    (["score", "--out", "s3://b/run"], "--out s3://b/run: outputs are written as files, so --out must be a local path"),
    (["finetune", "--strategy", "scratch", "--out", "s3://b/run"], "--out must be a local path"),
    (["compare", "--weights", "imagenet", "--out", "s3://b/run"], "--out must be a local path"),
    (["sweep", "--weights", "imagenet", "--frozen", "1", "--out", "s3://b/run"], "--out must be a local path"),
    (["pretrain", "--out", "s3://b/src.pt"], "--out must be a local path"),
])
def test_training_commands_refuse_bad_input_before_ray_starts(args, match, tmp_path, monkeypatch) -> None:
    """pretrain, finetune, compare and prepare check options, dataset and mask first: one line, exit 2, no Ray,
    and no lock file or "preparing" line for a dataset that cannot be prepared."""
    import ray
    from typer.testing import CliRunner

    from idtl_ray import cli
    from idtl_ray.data.cache import cache_root

    started: list[str] = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append("ray"))
    locks = set(cache_root().rglob("*.lock"))
    res = CliRunner().invoke(cli.app, [a.format(tmp=tmp_path) for a in args])
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and match.format(tmp=tmp_path) in errors[0] and "Traceback" not in res.stderr, res.stderr
    assert not re.search(r"preparing (nosuch|npz:)", res.stderr)  # (digits, a real dataset, may be prepared first)
    assert not started and set(cache_root().rglob("*.lock")) <= locks | set(cache_root().rglob(".digits-*.lock"))


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


# ── b. NaN or inf in the weights or the inputs: named, not reported as a diverged solver ────────────


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _pairs(n: int, seed: int, bad: dict[int, float] | None = None) -> list[tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    for i, v in (bad or {}).items():
        x[i, 1] = v
    return [(x[i], i % 3) for i in range(n)]


def _paper(model: nn.Module, train, val, **kw):
    return score_samples(model, train, val, score="paper", device="cpu", batch_size=16, **kw)


@pytest.mark.parametrize("score", ["paper", "self"])
def test_nan_weights_name_the_tensor(score: str) -> None:
    model = _net()
    with torch.no_grad():
        model[3].weight[1, 2] = float("nan")
    with pytest.raises(InputError, match=r"parameter 3\.weight holds NaN or inf \(1 of 24 values\).*check the weights file"):
        score_samples(model, _pairs(40, 0), _pairs(20, 1), score=score, device="cpu")


def test_nan_validation_input_names_the_sample() -> None:
    with pytest.raises(InputError, match=r"^validation samples 37 hold NaN or inf inputs: check the input data"):
        _paper(_net(), _pairs(40, 0), _pairs(50, 1, {37: float("nan")}))


def test_nan_training_input_names_the_sample() -> None:
    # in the curvature sample (all 40 samples are), then outside it (a 10-sample curvature subsample)
    with pytest.raises(InputError, match=r"^training \(curvature sample\) samples 21 hold NaN or inf inputs"):
        _paper(_net(), _pairs(40, 0, {21: float("inf")}), _pairs(20, 1))
    from idtl_ray.influence import curvature_subsample

    outside = next(i for i in range(40) if i not in set(curvature_subsample(40, 10, 0).tolist()))
    with pytest.raises(InputError, match=rf"^training samples {outside} hold NaN or inf inputs"):
        _paper(_net(), _pairs(40, 0, {outside: float("nan")}), _pairs(20, 1), curvature_samples=10)
    with pytest.raises(InputError, match=r"^training \(curvature sample\) samples 5 hold NaN or inf inputs"):
        score_samples(_net(), _pairs(40, 0, {5: float("nan")}), device="cpu")  # self-influence


def test_overflowing_outputs_are_named_with_finite_inputs() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[1].weight.fill_(1e308)  # finite weights whose logits overflow to inf on most samples
    with pytest.raises(InputError, match=r"^the model's outputs are NaN or inf on validation samples \d+(, \d+)*( and \d+ more)? "
                                         r"although their inputs and the weights are finite"):
        _paper(model, _pairs(40, 0), _pairs(20, 1))


def test_real_divergence_keeps_its_message() -> None:
    from idtl_ray.errors import SolverDivergedError

    with pytest.raises(SolverDivergedError, match="lissa solver diverged.*raise lissa_scale"):
        _paper(_net(), _pairs(40, 0), _pairs(20, 1), solver="lissa", lissa_scale=1e-3, max_iter=500)


def test_a_weights_file_with_nan_is_refused_at_load(tmp_path) -> None:
    from idtl_ray import models as M

    model = M.build_model("sample-cnn", 10, 1, 8)
    state = model.state_dict()
    state["conv2.bias"][3] = float("nan")
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match=r"w\.pt: tensor conv2\.bias holds NaN or inf \(1 of 32 values\)"):
        M.load_weights(M.build_model("sample-cnn", 10, 1, 8), "sample-cnn", str(tmp_path / "w.pt"))


# ── c. datasets whose items are not (input, label) pairs ─────────────────────────────────────────


class _Dicts(torch.utils.data.Dataset):
    """A HuggingFace-style map-style dataset: items are {"image": ..., "label": ...}."""

    def __init__(self, pairs: list) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.pairs[i][0], "label": self.pairs[i][1]}


@pytest.mark.parametrize("score", ["self", "paper"])
def test_dict_items_give_one_clear_error(score: str) -> None:
    train, val = _pairs(40, 0), _pairs(20, 1)
    with pytest.raises(InputError, match=r"^train\[0\] is a dict with keys \['image', 'label'\], but train must be a "
                                         r"map-style dataset of \(input, label\) tuples: wrap it in a Dataset whose "
                                         r"__getitem__\(i\) returns \(train\[i\]\['image'\], train\[i\]\['label'\]\)"):
        score_samples(_net(), _Dicts(train), val, score=score, device="cpu")
    if score == "paper":
        with pytest.raises(InputError, match=r"^val\[0\] is a dict"):
            score_samples(_net(), train, _Dicts(val), score=score, device="cpu")
    # the wrapper the message names works
    class Pairs(torch.utils.data.Dataset):
        def __init__(self, ds):
            self.ds = ds

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            return self.ds[i]["image"], self.ds[i]["label"]

    assert len(score_samples(_net(), Pairs(_Dicts(train)), val, score=score, device="cpu")) == 40


def test_other_item_shapes_are_named() -> None:
    x = torch.randn(8, 4, dtype=torch.float64)
    with pytest.raises(InputError, match=r"^train\[0\] is a torch.Tensor, but train must be .*TensorDataset"):
        score_samples(_net(), x, device="cpu")  # inputs without labels
    triples = [(x[i], 0, i) for i in range(8)]
    with pytest.raises(InputError, match=r"^train\[0\] is a tuple of length 3"):
        score_samples(_net(), triples, device="cpu")
    pil = pytest.importorskip("PIL.Image")
    images = [(pil.new("L", (2, 2)), 0) for _ in range(8)]
    with pytest.raises(InputError, match=r"input is a PIL.Image.Image, not a tensor or array: .*ToTensor"):
        score_samples(_net(), images, device="cpu")


# ── e. Ray that does not start, or an --address that does not answer: one line, exit 2 ──────────────


def _app(body):
    import typer

    from idtl_ray.cli_common import user_errors

    app = typer.Typer()
    app.command()(user_errors(body))
    return app


def test_local_ray_start_timeout_is_one_line(monkeypatch) -> None:
    import ray
    from typer.testing import CliRunner

    from idtl_ray.scoring import ensure_ray

    def init(*args, **kwargs):  # what Ray raises on a loaded machine (ray/_private/node.py)
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)

    def cmd(address: str = None) -> None:  # type: ignore[assignment]
        ensure_ray(address)

    res = CliRunner().invoke(_app(cmd), [])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [
        "error: the local Ray did not start in time (The current node timed out during startup): the machine is "
        "overloaded; retry, or start one with `ray start --head` and pass --address auto"]


def test_other_errors_are_not_taken_for_ray_failures(monkeypatch) -> None:
    from typer.testing import CliRunner

    def cmd() -> None:
        raise RuntimeError("a bug of ours")  # not raised inside ray.init: keeps its traceback

    res = CliRunner().invoke(_app(cmd), [])
    assert isinstance(res.exception, RuntimeError) and res.exit_code == 1


@pytest.mark.parametrize("address, match", [
    ("nonsense", r"^error: could not join the Ray cluster at nonsense \(Invalid address format: nonsense\): pass "
                 r"--address host:port of the head node"),  # raised by ray.init itself
    ("127.0.0.1:1", r"^error: cannot reach the Ray cluster at --address 127\.0\.0\.1:1 \(Connection refused\): check "
                    r"the head node's host:port"),  # ray.init would retry this for minutes
])
def test_bad_address_is_one_line(tmp_path, address: str, match: str) -> None:
    import ray
    import typer
    from typer.testing import CliRunner

    from idtl_ray.cli_train import register

    if ray.is_initialized():
        ray.shutdown()
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["finetune", "--strategy", "scratch", "--address", address, "--out", str(tmp_path)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(match, lines[0]), lines


# ── f. the documentation's links resolve inside the repository ────────────────────────────────────


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def doc_link_problems(root) -> list[str]:
    """Relative links of README.md and docs/*.md whose file (or heading anchor) does not exist, and
    mentions of design.md that are not links to the repository's own docs/design.md."""
    problems = []
    for md in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = md.read_text(encoding="utf-8")
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s):, mailto:
            path = (md.parent / target).resolve() if target else md
            if not path.exists():
                problems.append(f"{md.name}: {target} does not exist")
            elif anchor and path.suffix == ".md":
                heads = {_slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M)}
                if anchor not in heads:
                    problems.append(f"{md.name}: {target}#{anchor} names no heading")
    readme = (root / "README.md").read_text(encoding="utf-8")
    for m in re.finditer(r"design\.md", readme):
        if not readme[max(0, m.start() - 6):m.end()].endswith("docs/design.md"):
            problems.append(f"README.md: a mention of design.md at {m.start()} is not docs/design.md")
    if not (root / "docs" / "design.md").is_file():
        problems.append("docs/design.md is missing")
    return problems


def test_documentation_links_resolve_in_the_repository() -> None:
    from pathlib import Path

    assert doc_link_problems(Path(__file__).resolve().parents[1]) == []


def test_a_parquet_file_that_is_not_a_mask_names_either_score_column(tmp_path) -> None:
    """A mask holds delta_val_loss or self_influence (the default): the message must not ask for the one kind."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from idtl_ray.errors import MaskError
    from idtl_ray.mask import read_mask

    pq.write_table(pa.table({"a": [1]}), tmp_path / "plain.parquet")
    with pytest.raises(MaskError, match=re.escape("missing ['sample_id', 'label', 'delta_val_loss or self_influence', "
                                                  "'keep']")):  # fmt: skip
        read_mask(tmp_path / "plain.parquet")


def test_sigterm_ends_a_command_through_its_finally_blocks(tmp_path) -> None:
    """`ray job stop` sends SIGTERM: the command must end as on Ctrl-C (temporary files removed), not at
    once, which Python's default for SIGTERM does; and withdraw its autoscaler request at the signal,
    since the job supervisor kills the process tree 3 s later, before slow finally blocks get there."""
    import signal
    import subprocess
    import sys

    done, released = tmp_path / "finally-ran", tmp_path / "released"
    code = ("import sys, time\n"
            "import idtl_ray.resources as R\n"
            "from idtl_ray.scoring.session import stop_on_sigterm\n"
            f"R.release = lambda: open({str(released)!r}, 'w').write(str(time.time()))\n"
            "stop_on_sigterm()\n"
            "try:\n"
            "    print('ready', flush=True)\n"
            "    time.sleep(60)\n"
            "except KeyboardInterrupt:\n"
            "    sys.exit(130)\n"
            "finally:\n"
            "    time.sleep(0.5)\n"  # a slow finally block: the request was withdrawn before it, at the signal
            f"    open({str(done)!r}, 'w').write(str(time.time()))\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 130
    assert float(released.read_text()) <= float(done.read_text()) - 0.4  # withdrawn first, not after the finally
