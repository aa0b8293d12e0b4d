"""Frozen-layer sweep (issue 4): Ray Tune over Ray Train runs, results table with errors kept."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from idtl_ray.errors import InputError
from idtl_ray.finetune import FinetuneConfig
from idtl_ray.sweep import check_frozen, results_table, run_sweep


def test_invalid_frozen_counts_are_refused_before_any_trial() -> None:
    base = FinetuneConfig(strategy="scratch")
    with pytest.raises(InputError, match=r"sample-cnn has 6 layers: cannot freeze \[6, 9\]; use counts in 0..5"):
        check_frozen(base, [1, 6, 9])
    with pytest.raises(InputError, match="repeat"):
        check_frozen(base, [1, 1])
    assert check_frozen(base, [0, 5]) == [0, 5]


def test_failed_trials_stay_in_the_table_with_their_error() -> None:
    try:
        try:
            raise InputError("--freeze 3: boom")
        except InputError as inner:
            raise RuntimeError("Trial raised") from inner
    except RuntimeError as outer:
        err = outer
    df = results_table([
        SimpleNamespace(config={"freeze": 3}, metrics={}, error=err),
        SimpleNamespace(config={"freeze": 1}, metrics={"test_error": 4.0, "val_acc": 95.0}, error=None),
    ])  # fmt: skip
    assert df["frozen"].tolist() == [1, 3] and df["status"].tolist() == ["ok", "error"]
    assert df.loc[1, "error"] == "InputError: --freeze 3: boom"


def test_cli_sweep_takes_space_separated_counts_and_refuses_bad_ones_up_front(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from idtl_ray.cli_train import register

    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["sweep", "--strategy", "scratch", "--frozen", "2", "9", "--out", str(tmp_path)])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: sample-cnn has 6 layers: cannot freeze [9]")


def test_relative_paths_reach_the_trials_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tune runs each trial in its own directory: every path the trials read is made absolute first."""
    monkeypatch.chdir(tmp_path)
    for name in ("m.parquet", "w.pt", "split.json", "x.npz"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "prep").mkdir()
    cfg = FinetuneConfig(strategy="instance", mask="m.parquet", weights="w.pt", split="split.json", data_dir="data",
                         dataset="npz:x.npz").with_absolute_paths()
    assert (cfg.mask, cfg.weights, cfg.split, cfg.data_dir, cfg.dataset) == (
        str(tmp_path / "m.parquet"), str(tmp_path / "w.pt"), str(tmp_path / "split.json"), str(tmp_path / "data"),
        f"npz:{tmp_path / 'x.npz'}")
    assert FinetuneConfig(dataset="prep", strategy="scratch").with_absolute_paths().dataset == str(tmp_path / "prep")
    kept = FinetuneConfig(dataset="digits", strategy="model", weights="imagenet", split="none").with_absolute_paths()
    assert (kept.dataset, kept.weights, kept.split) == ("digits", "imagenet", "none")


def test_a_missing_mask_or_weights_file_is_refused_before_ray_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import idtl_ray.scoring as scoring
    from idtl_ray.errors import MaskError, WeightsError

    monkeypatch.setattr(scoring, "ensure_ray", lambda *a, **k: pytest.fail("Ray started"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(MaskError, match=f"mask {tmp_path}/runs/score/mask.parquet not found"):
        run_sweep(FinetuneConfig(strategy="instance", mask="runs/score/mask.parquet", weights="w.pt"), [1], tmp_path / "s")
    with pytest.raises(WeightsError, match=f"weights file {tmp_path}/nope.pt not found"):
        run_sweep(FinetuneConfig(strategy="model", weights="nope.pt"), [1], tmp_path / "s")


def test_another_sweep_into_the_same_out_is_refused_before_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    """Every trial writes <out>/frozen-N: a sweep of other epochs into a finished sweep's out retrained those
    directories over it (a new Tune experiment, new Train run names, so no check saw the old runs)."""
    import idtl_ray.scoring as scoring
    import idtl_ray.sweep as S
    from idtl_ray.errors import IdtlError

    ran: list[int] = []
    monkeypatch.setattr(scoring, "ensure_ray", lambda *a, **k: None)
    monkeypatch.setattr("idtl_ray.finetune.run.check_local_resources", lambda cfg, driver: None)
    monkeypatch.setattr(S, "_tune", lambda base, frozen, root, k, failures: ran.append(k) or pd.DataFrame())
    four = FinetuneConfig(strategy="scratch", epochs=4)
    assert S.experiment_name(four, [2, 3]) == S.experiment_name(four, [3, 2])  # the order of --frozen is no new sweep
    run_sweep(four, [2, 3], tmp_path / "s")
    with pytest.raises(InputError, match="holds another sweep .*pass another --out"):
        run_sweep(replace(four, epochs=2), [2, 3], tmp_path / "s")
    # the same sweep with more trials at once: Tune's restored experiment keeps its first run's, and says so
    run_sweep(four, [3, 2], tmp_path / "s", max_concurrent=2)
    assert ran == [1, 1] and "first run's 1 trial(s) at once" in capsys.readouterr().err
    with pytest.raises(IdtlError, match="cannot write /proc/nope/sweep.md"):  # before Ray, one line
        run_sweep(four, [2], "/proc/nope")


def test_sweep_gpus_is_a_budget_shared_by_trials_of_workers_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sweep --gpus 4 --workers 2` was refused ("--gpus 4 sets the Train workers"), and `--gpus 2 --workers 2`
    ran 2 trials of 1 worker each: --gpus is the sweep's GPU budget, --workers each trial's DDP ranks."""
    import typer
    from typer.testing import CliRunner

    import idtl_ray.scoring as scoring
    import idtl_ray.sweep as S
    from idtl_ray.cli_train import register

    seen: list[tuple[int, int, float, int, list]] = []

    def claim(address, root, dataset, bundles):
        seen.append((0, 0, 0.0, 0, bundles()))
        return False

    monkeypatch.setattr(scoring, "ensure_ray", lambda *a, **k: None)
    checked: list[int] = []
    monkeypatch.setattr("idtl_ray.finetune.run.check_local_resources", lambda cfg, driver: checked.append(cfg.workers))
    monkeypatch.setattr("idtl_ray.resources.claim_cluster", claim)
    monkeypatch.setattr(S, "_tune", lambda base, frozen, root, k, failures: seen.append(
        (base.workers, base.gpus, base.gpus_per_worker, k, [])) or pd.DataFrame({"status": ["ok"]}))
    app = typer.Typer()
    register(app)
    run = CliRunner().invoke
    for i, (argv, want) in enumerate(((["--gpus", "4", "--workers", "2"], (2, 2, 1.0, 2)),
                                      (["--gpus", "2", "--workers", "2"], (2, 2, 1.0, 1)),
                                      (["--gpus", "3"], (1, 1, 1.0, 3)))):
        seen.clear()
        res = run(app, ["sweep", "--strategy", "scratch", "--frozen", "1", "2", "--out", str(tmp_path / f"s{i}"), *argv])
        assert res.exit_code == 0, res.output
        assert seen[1] == (*want, []), seen
        per_trial = [{"CPU": 0.5}] + [{"CPU": 0.5, "GPU": 1.0}] * want[0]
        assert seen[0][4] == per_trial * want[3]  # the autoscaler request: every trial at once
        assert checked[-1] == want[0]  # one trial's workers checked once, by the driver (not in every trial)
    for argv, msg in ((["--gpus", "3", "--workers", "2"], "--gpus 3 does not split into trials of --workers 2"),
                      (["--gpus", "4", "--workers", "2", "--max-concurrent", "3"], "runs 2 trial(s) at once"),
                      (["--gpus", "2", "--gpus-per-worker", "0.5"], "leave out --gpus-per-worker 0.5")):
        res = run(app, ["sweep", "--strategy", "scratch", "--frozen", "1", "--out", str(tmp_path / "bad"), *argv])
        assert res.exit_code == 2 and res.stderr.startswith("error: ") and msg in res.stderr, res.output


def test_the_trial_drivers_cpu_counts_in_the_local_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """sweep --workers 4 (x 0.5 CPU) on 2 local CPUs passed the check, then waited forever: each trial's driver
    holds 0.5 CPU beside its workers."""
    import ray

    from idtl_ray.finetune.run import check_local_resources

    monkeypatch.setattr("idtl_ray.resources.joined_cluster", lambda: False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    cfg = FinetuneConfig(strategy="scratch", workers=4, cpus_per_worker=0.5)
    check_local_resources(cfg)  # a finetune run: 2 CPUs for its 4 workers
    with pytest.raises(InputError, match=r"4 workers x 0.5 CPUs \+ 0.5 for the trial's driver need 2.5 CPUs"):
        check_local_resources(cfg, 0.5)


def test_a_trial_reads_the_copy_its_driver_prepared(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trial gets the driver's prepared location apart from its config, whose dataset stays as given."""
    import ray.tune

    import idtl_ray.sweep as S

    seen: dict = {}
    monkeypatch.setattr(S, "run_finetune", lambda cfg, **kw: seen.update(cfg=cfg, **kw) or
                        {"test_error": 1.0, "val_acc": 2.0, "train_loss": 0.1, "epochs": 1})
    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t1"))
    monkeypatch.setattr(ray.tune, "report", lambda metrics: seen.update(reported=metrics))
    import ray.tune.integration.ray_train as tune_train

    monkeypatch.setattr(tune_train, "TuneReportCallback", lambda: "callback")  # needs a Tune session
    base = FinetuneConfig(strategy="scratch").to_dict()
    S._trial({"freeze": 2}, base, "/tmp/sweep-out", prepared="/shared/cache/prepared/digits-abc")
    assert seen["prepared"] == "/shared/cache/prepared/digits-abc" and seen["cfg"].dataset == "digits"
    assert seen["cfg"].freeze == 2 and seen["reported"]["test_error"] == 1.0


# ── fault tolerance and reruns (issue 12 item 2): the trial's Train worker kills itself once in epoch 1 ──


def _faulty(**kw) -> FinetuneConfig:
    """2 epochs; rank 0 is killed once in epoch 1 (after epoch 0's checkpoint); Train itself does not retry."""
    return FinetuneConfig(strategy="scratch", epochs=2, batch_size=64, cpus_per_worker=0.5, max_failures=0,
                          fault_inject_kill_epoch=1, **kw)  # fmt: skip


def _final(root: Path, n: int) -> dict:
    import json

    return json.loads((root / f"frozen-{n}" / "final.json").read_text())


def _trial_reports(root: Path) -> dict[str, int]:
    """Tune's trial directories and how many reports each has recorded (lines of its result.json)."""
    [exp] = (root / "ray").glob("sweep-*")
    return {p.parent.name: len(p.read_text().splitlines()) for p in exp.glob("*/result.json")}


@pytest.mark.slow
def test_a_failed_trial_is_retried_and_its_train_run_continues_from_its_checkpoint(ray_session, tmp_path: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from idtl_ray import data as D
    from idtl_ray.data.cache import ensure_prepared
    from idtl_ray.data.samples import open_target

    # the split is given by a relative path, as a user types it: the trial runs in Tune's trial directory
    monkeypatch.chdir(tmp_path)
    D.make_split(open_target(ensure_prepared("digits", None, None)), 0.1, 3).save(tmp_path / "mine.json")
    df = run_sweep(_faulty(split="mine.json"), [0], tmp_path, trial_failures=1)
    assert df["status"].tolist() == ["ok"], df.to_string()
    assert (tmp_path / "frozen-0" / ".fault_injected").is_file()  # the fault did happen
    final = _final(tmp_path, 0)
    # the retry began at epoch 1 (epoch 0's checkpoint), not at 0: every epoch ran once
    assert final["start_epochs"] == [0, 1] and final["epochs"] == 2


@pytest.mark.slow
def test_a_rerun_restores_the_sweep_and_never_trains_an_epoch_twice(ray_session, tmp_path: Path, monkeypatch) -> None:
    from idtl_ray.finetune import FAULT_MARKER

    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")  # Tune writes result.json: a line per report
    (tmp_path / "frozen-4").mkdir()
    (tmp_path / "frozen-4" / FAULT_MARKER).write_text("spared\n")  # only the trial with 0 frozen layers is killed
    first = run_sweep(_faulty(), [0, 4], tmp_path, max_concurrent=2, trial_failures=0)
    # no retries: the killed trial failed in epoch 1 (after epoch 0's checkpoint), the other one finished
    assert first["status"].tolist() == ["error", "ok"], first.to_string()
    assert not (tmp_path / "frozen-0" / "final.json").exists() and _final(tmp_path, 4)["start_epochs"] == [0]
    before = _trial_reports(tmp_path)
    assert len(before) == 2 and all(before.values()), before

    second = run_sweep(_faulty(), [0, 4], tmp_path, max_concurrent=2, trial_failures=0)
    assert second["status"].tolist() == ["ok", "ok"], second.to_string()
    # both trials reported: the table, its files, and a complete run per frozen count
    assert second["frozen"].tolist() == [0, 4]
    assert second["test_error"].between(0, 100).all() and second["val_acc"].between(0, 100).all()
    assert pd.read_csv(tmp_path / "sweep.csv")["frozen"].tolist() == [0, 4]
    assert "| 4 |" in (tmp_path / "sweep.md").read_text()
    assert _final(tmp_path, 4)["trainable_params"] < _final(tmp_path, 0)["trainable_params"]
    assert _final(tmp_path, 0)["start_epochs"] == [0, 1] and _final(tmp_path, 0)["epochs"] == 2  # resumed at epoch 1
    after = _trial_reports(tmp_path)
    assert set(after) == set(before)  # the same trials, restored: none started afresh
    [finished] = [t for t in before if "freeze=4" in t]
    assert after[finished] == before[finished]  # the finished trial did not run again: not one more report
    pd.testing.assert_frame_equal(second.iloc[[1]], first.iloc[[1]])  # and its numbers are kept
    # each trial's config keeps the dataset as given (its identity, compared on every rerun), while the
    # driver prepared it once and the trials read that copy (a GPU node preparing "digits" itself would hash
    # its own view of the source files: another key, another copy)
    import json

    assert json.loads((tmp_path / "frozen-4" / "config.json").read_text())["dataset"] == "digits"
