"""The paper's settings as data, the CIFAR-10+/CIFAR-100+ builder and the results writer (no Ray)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from idtl_ray import experiments as E
from idtl_ray.experiments import report
from idtl_ray.errors import DataError, IdtlError


def _cifar_like(num_classes: int, per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 32x32x3 images (noise: no image equals its own flip or rotation)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (num_classes * per_class, 32, 32, 3), dtype=np.uint8)
    return x, np.repeat(np.arange(num_classes, dtype=np.int64), per_class)


def _smooth_like(num_classes: int, per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random low-frequency images (4x4 noise blown up to 32x32): a small rotation keeps them close."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (num_classes * per_class, 4, 4, 3), dtype=np.uint8)
    x = np.ascontiguousarray(coarse.repeat(8, axis=1).repeat(8, axis=2))
    return x, np.repeat(np.arange(num_classes, dtype=np.int64), per_class)


def _h(img: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


# ── CIFAR+ builder ────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(("num_classes", "per_class", "rounds", "per"), [(10, 100, 91, 100), (100, 10, 901, 10)])
def test_cifar_plus_counts_follow_the_paper(num_classes: int, per_class: int, rounds: int, per: int) -> None:
    x, y = _cifar_like(num_classes, per_class)
    assert E.plus_counts(num_classes) == (rounds, per, per)
    px, py = E.build_cifar_plus(x, y, num_classes, class_a=3, seed=0)
    assert px.shape == (10_000, 32, 32, 3) and px.dtype == np.uint8
    counts = np.bincount(py, minlength=num_classes)
    assert counts[3] == rounds * per  # 9,100 or 9,010
    assert (np.delete(counts, 3) == per).all()  # 9 x 100 or 99 x 10
    assert counts.sum() == 10_000


def test_class_a_copies_are_flipped_or_rotated_and_the_others_are_untouched_originals() -> None:
    x, y = _smooth_like(10, 100)
    px, py = E.build_cifar_plus(x, y, 10, class_a=7, seed=1)
    originals = {_h(img): int(lab) for img, lab in zip(x, y)}
    flipped_originals = {_h(img[:, ::-1]) for img in x[y == 7]}
    a = px[py == 7]
    assert not any(_h(img) in originals for img in a), "a class-A copy equals an original test image"
    n_flip = sum(_h(img) in flipped_originals for img in a)
    assert 0.4 * len(a) < n_flip < 0.6 * len(a)  # flips and rotations, about half each
    # the rotated ones are neither originals nor flips, but their centre is close to one class-A original
    rotated = [img for img in a[:300] if _h(img) not in flipped_originals]
    src = x[y == 7].astype(np.float32)[:, 8:24, 8:24]
    for img in rotated[:20]:
        d = np.sort(np.abs(src - img[8:24, 8:24].astype(np.float32)).mean(axis=(1, 2, 3)))
        assert d[0] < 0.5 * d[1]  # much nearer its source than any other image (5-15 degrees moves little)
    others = px[py != 7]
    assert all(originals.get(_h(img)) == int(lab) for img, lab in zip(others, py[py != 7]))
    assert len({_h(img) for img in others}) == len(others)  # 100 *different* images per class


def test_cifar_plus_is_deterministic_per_seed() -> None:
    x, y = _cifar_like(10, 100)
    a1, b1 = E.build_cifar_plus(x, y, 10, 2, seed=5, rounds=5)
    a2, b2 = E.build_cifar_plus(x, y, 10, 2, seed=5, rounds=5)
    a3, _ = E.build_cifar_plus(x, y, 10, 2, seed=6, rounds=5)
    assert np.array_equal(a1, a2) and np.array_equal(b1, b2)
    assert not np.array_equal(a1, a3)


def test_cifar_plus_refuses_too_few_test_images() -> None:
    x, y = _cifar_like(10, 20)
    with pytest.raises(DataError, match="per_round"):
        E.build_cifar_plus(x, y, 10, 0, seed=0)
    with pytest.raises(DataError, match="outside"):
        E.build_cifar_plus(x, y, 10, 10, seed=0)


def test_class_a_is_drawn_from_the_seed_unless_fixed() -> None:
    picks = {E.pick_class_a(E.PlusSpec(), 10, s) for s in range(20)}
    assert len(picks) > 1 and picks <= set(range(10))
    assert E.pick_class_a(E.PlusSpec(), 10, 4) == E.pick_class_a(E.PlusSpec(), 10, 4)
    assert E.pick_class_a(E.PlusSpec(class_a=6), 10, 4) == 6


# ── Settings match design.md section 4 ────────────────────────────────────────────────────────────


def _by_key(n: int) -> dict[str, E.Setting]:
    return {s.key: s for s in E.table_spec(n).settings}


def test_table1_settings() -> None:
    t = E.table_spec(1)
    assert t.source == E.SourceSpec("emnist-letters", "sample-cnn", epochs=2, batch_size=128)
    (s,) = t.settings
    assert (s.dataset, s.model, s.weights, s.epochs, s.scratch_epochs, s.batch_size, s.lr) == \
        ("mnist", "sample-cnn", "source", 1, 1, 128, 1e-3)  # fmt: skip
    assert s.paper == {"scratch": 1.37, "model": 1.09, "instance": 0.47}


def test_table2_settings() -> None:
    s = _by_key(2)
    assert len(s) == 6
    for ds in ("cifar10", "cifar100"):
        for m, ep, sc, bs in (("vgg16", 100, 200, 128), ("resnet50", 100, 200, 128), ("densenet121", 150, 300, 64)):
            x = s[f"{ds}/{m}"]
            assert (x.epochs, x.scratch_epochs, x.batch_size, x.lr, x.lr_drop_at, x.weights, x.augment) == \
                (ep, sc, bs, 1e-3, 0.5, "imagenet", True)  # fmt: skip
    assert s["cifar10/resnet50"].paper == {"scratch": 6.93, "model": 6.20, "instance": 4.11}
    assert s["cifar100/resnet50"].paper == {"scratch": 27.59, "model": 26.90, "instance": 24.17}


def test_table3_settings() -> None:
    s = E.table_spec(3).settings
    assert [x.freeze for x in s] == [20, 30, 40]
    assert all((x.model, x.dataset, x.epochs, x.scratch_epochs) == ("resnet50", "cifar10", 90, None) for x in s)
    assert [x.paper["*"] for x in s] == [10.27, 12.08, 13.98]


def test_table4_settings() -> None:
    s = _by_key(4)
    r, d = s["svhn/resnet50"], s["svhn/densenet121"]
    assert (r.hybrid_init, r.epochs, r.batch_size, r.scratch_epochs, r.lr_drop_at) == (10, 20, 128, 40, 0.5)
    assert (d.hybrid_init, d.epochs, d.batch_size, d.scratch_epochs) == (31, 26, 64, 40)


def test_table5_settings() -> None:
    s = _by_key(5)
    assert set(s) == {"cifar10/resnet50", "cifar10/densenet121", "cifar100/resnet50", "cifar100/densenet121"}
    assert all(x.plus is not None for x in s.values())
    assert s["cifar10/resnet50"].paper == {"scratch": 7.05, "model": 6.35, "instance": 4.18}
    assert s["cifar10/densenet121"].epochs == 150 and s["cifar10/densenet121"].batch_size == 64


def test_table6_settings() -> None:
    s = _by_key(6)
    r, d = s["cats-vs-dogs/resnet50"], s["cats-vs-dogs/densenet121"]
    for x, ep in ((r, 50), (d, 60)):
        assert (x.freeze_conv, x.batch_size, x.epochs, x.scratch_epochs, x.strategies) == (True, 16, ep, None, ("model", "instance"))
    assert r.paper == {"model": 5.01, "instance": 3.38}


@pytest.mark.parametrize("n", range(1, 7))
def test_smoke_variant_keeps_the_table_shape_on_small_offline_data(n: int) -> None:
    full, smoke = E.table_spec(n), E.table_spec(n, smoke=True)
    assert smoke.smoke and smoke.source is not None and smoke.paper_rows == full.paper_rows
    full_cols = {s.paper_column for s in full.settings}
    for s in smoke.settings:
        assert s.model == "sample-cnn" and s.epochs == 1
        assert s.paper_column in full_cols
        twin = next(f for f in full.settings if s.key.endswith(f.key.replace("/", "-")))
        assert s.strategies == twin.strategies and s.freeze_conv == twin.freeze_conv
        assert (s.plus is None) == (twin.plus is None) and (s.hybrid_init is None) == (twin.hybrid_init is None)


def test_unknown_table_is_a_one_line_error() -> None:
    with pytest.raises(IdtlError, match="Tables 1-6"):
        E.table_spec(7)


@pytest.mark.parametrize("n", [1, 2, 6])
def test_full_mode_fails_fast_with_the_librarys_missing_file_message(n: int, tmp_path: Path) -> None:
    t = time.perf_counter()
    with pytest.raises(DataError) as e:
        E.preflight(n, smoke=False, data_dir=str(tmp_path))
    assert time.perf_counter() - t < 30
    msg = str(e.value)
    assert "\n" not in msg and "not found" in msg and str(tmp_path) in msg


# ── Results writer ────────────────────────────────────────────────────────────────────────────────


def test_results_report_mean_std_and_paper_numbers(tmp_path: Path) -> None:
    table = E.table_spec(2, smoke=True)
    s = table.settings[0]
    runs = []
    for seed, errs in ((0, (30.0, 20.0, 10.0)), (1, (32.0, 22.0, 14.0))):
        for strategy, err in zip(("scratch", "model", "instance"), errs):
            runs.append({"setting": s.key, "seed": seed, "strategy": strategy, "row": "", "epochs": 1, "test_error": err,
                         "val_acc": 90.0, "n_train_samples": 100, "n_dropped_by_mask": 5, "n_scored": 105,
                         "run_dir": str(tmp_path / "none"), "mask": "m"})  # fmt: skip
    doc = report._document(table, [0, 1], runs, 1.0, E.Resources.default(True))
    files = E.write_results(doc, tmp_path)
    saved = json.loads(Path(files["json"]).read_text())
    row = next(r for r in saved["summary"] if r["strategy"] == "instance")
    assert row["per_seed"] == [10.0, 14.0] and row["mean"] == 12.0 and row["std"] == pytest.approx(np.std([10, 14], ddof=1))
    assert row["paper"] == 4.11
    md = Path(files["md"]).read_text()
    assert "| Instance-based TL | ResNet-50 | 4.11 | 12.00 ± 2.83 |" in md
    assert "not run" in md  # VGG-16 / DenseNet-121 rows of the paper are kept
    assert saved["direction"][0]["same_direction_as_paper"] is True
    assert Path(files["png"]).stat().st_size > 0
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries
    assert saved["selection"] == "paper" and "**Selection**: the paper's" in md
    assert any("randomly initialised head" in n for n in saved["notes"])  # where we depart from the paper's 4.5


def test_report_says_which_selection_ran_and_claims_no_order_the_paper_does_not_give(tmp_path: Path) -> None:
    from dataclasses import replace

    t5 = replace(E.table_spec(5, smoke=True), selection="default")
    doc = report._document(t5, [0], [], 1.0, E.Resources.default(True))
    md = report.render_markdown(doc, t5)
    assert doc["selection"] == "default" and "idtl-ray's default (self-influence" in md and "no validation reference" in md
    # Table 3's paper rows give one error per frozen count and compare no strategies: no verdict on the order
    t3 = E.table_spec(3, smoke=True)
    summary = [{"setting": s.key, "strategy": st, "mean": m} for s in t3.settings for st, m in (("model", 1.0), ("instance", 2.0))]
    assert report._direction(summary, t3) == []
    # no figure of an empty run, and no stale one of an older run listed or left
    (tmp_path / "table5_curves.png").write_bytes(b"old")
    files = E.write_results(report._document(t5, [0], [], 1.0, E.Resources.default(True)), tmp_path, t5)
    assert set(files) == {"json", "md"} and not (tmp_path / "table5_curves.png").exists()


def test_the_papers_batch_is_split_over_the_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each DDP worker takes batch_size rows per step: --gpus 4 trained Table 5 with 512 per step, not 128."""
    from idtl_ray.experiments import runner

    s = E.table_spec(5).settings[0]
    assert s.batch_size == 128
    assert [runner._per_worker_batch(s, w) for w in (1, 2, 4)] == [128, 64, 32]
    with pytest.raises(E.ExperimentError, match="batch of 128 does not split evenly over 3 workers.*--gpus 2"):
        runner._per_worker_batch(s, 3)
    # refused before any work: no GPU request, no run directory
    monkeypatch.setattr(runner, "_request_gpus", lambda res: pytest.fail("GPUs requested"))
    spec = E.table_spec(5, smoke=True)
    with pytest.raises(E.ExperimentError, match="does not split evenly"):
        runner.run_table(5, smoke=True, out=tmp_path, spec=replace(spec, settings=tuple(
            replace(x, batch_size=63) for x in spec.settings)), resources=E.Resources(workers=2))
    assert not (tmp_path / "table5-smoke").exists()


def test_a_smoke_run_refuses_to_replace_a_full_runs_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A smoke run into a full run's --out overwrote its table5.md; now it stops before any work."""
    from idtl_ray.experiments import runner

    monkeypatch.setattr(runner, "_request_gpus", lambda res: pytest.fail("work started"))
    full = E.table_spec(5)
    E.write_results(report._document(full, [0], [], 1.0, E.Resources.default(False)), tmp_path, full)
    before = (tmp_path / "table5.md").read_text()
    with pytest.raises(E.ExperimentError, match=r"table5\.md holds a full run's report.*smoke run.*another --out"):
        runner.run_table(5, smoke=True, out=tmp_path)
    assert (tmp_path / "table5.md").read_text() == before and not (tmp_path / "table5-smoke").exists()
    # a smoke report is replaced as before (by a smoke or a full run): the guard stops only at a longer run's
    smoke = E.table_spec(5, smoke=True)
    E.write_results(report._document(smoke, [0], [], 1.0, E.Resources.default(True)), tmp_path / "s", smoke)
    runner._refuse_replacing_report(tmp_path / "s", smoke)
    runner._refuse_replacing_report(tmp_path / "s", full)


def test_a_job_refuses_a_negative_seed_before_ray(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import idtl_ray.scoring.session as session
    from idtl_ray.experiments.job import job_main

    # a job's process-wide set-up (stderr through a filter, a SIGTERM handler) would outlive this test in pytest's process
    monkeypatch.setattr(session, "filter_ray_noise", lambda: None)
    monkeypatch.setattr(session, "stop_on_sigterm", lambda: None)
    code = job_main(3, None, init=lambda: pytest.fail("Ray started"), argv=["--smoke", "--seeds", "-1"])
    assert code == 2 and capsys.readouterr().err.strip().splitlines() == ["error: --seeds must be >= 0, got [-1]"]


@pytest.mark.parametrize("n", [2, 6])
def test_job_script_full_mode_stops_at_once_with_one_line(n: int, tmp_path: Path) -> None:
    """Without the datasets, `jobs/tableN.py` exits 2 with the library's message, before Ray starts."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "jobs" / f"table{n}.py"), "--data-dir", str(tmp_path), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "not found" in last and str(tmp_path) in last
    assert "Traceback" not in p.stderr and "Started a local Ray" not in p.stderr
    assert not (tmp_path / "out").exists()  # and "Started a local Ray" not printed: it stopped before Ray


def test_the_jobs_resource_flags_are_the_resources_fields():
    """Declared once: every Resources field is a job flag with the field's help, and parses into it."""
    import dataclasses

    parser = E.job_parser(5)
    flags = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(E.Resources):
        assert flags[f.name].help == f.metadata["help"], f.name
    res = E.resources_from_args(parser.parse_args(["--smoke", "--score-actors", "2", "--cpus-per-worker", "0.5"]))
    assert (res.score_actors, res.cpus_per_worker, res.workers) == (2, 0.5, 1)


def test_a_job_waiting_for_gpus_holds_a_pending_placement_group_until_they_join(ray_session, monkeypatch) -> None:
    """Ray Data's autoscaling coordinator replaces any autoscaler request when a pipeline starts or ends and every
    20 s (docs/cluster.md), so the job's wait for its GPUs holds a placement group of its bundles, which nothing
    replaces: pending while the GPUs are missing, removed once they joined (its reservation would block the job)."""
    import ray
    from ray.util import placement_group_table

    from idtl_ray.experiments import runner

    monkeypatch.setattr(runner, "_cluster_address", lambda: "10.0.0.1:6379")  # a cluster with an autoscaler
    real, seen = ray.cluster_resources, []

    def gpus_join_on_the_fourth_look() -> dict[str, float]:
        seen.append(sorted(v["state"] for v in placement_group_table().values() if v["name"] == "idtl-ray-await-gpus"))
        return {**real(), "GPU": 2.0 if len(seen) >= 4 else 0.0}

    monkeypatch.setattr(ray, "cluster_resources", gpus_join_on_the_fourth_look)
    runner._request_gpus(E.Resources.default(False).declare_gpus(2))
    assert seen[0] == [] and seen[1:3] == [["PENDING"], ["PENDING"]], seen  # held while the job waited
    states = [v["state"] for v in placement_group_table().values() if v["name"] == "idtl-ray-await-gpus"]
    assert states == ["REMOVED"]  # and gone once the GPUs joined
    bundles = [v["bundles"] for v in placement_group_table().values() if v["name"] == "idtl-ray-await-gpus"][0]
    assert list(bundles.values()) == [{"CPU": 4.0, "GPU": 1.0}] * 2  # the job's Train worker bundles
