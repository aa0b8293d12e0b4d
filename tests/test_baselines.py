"""Selection baselines (issue 10): the functional core on small arrays, and `compare --baselines`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from idtl_ray import data as D
from idtl_ray import models as M
from idtl_ray.baselines import (
    baseline_masks,
    cleanlab_drop,
    cross_validated_probs,
    features_and_logits,
    loss_drop,
    parse_methods,
    random_drop,
    stratified_folds,
)
from idtl_ray.errors import InputError, MaskError
from idtl_ray.finetune import FinetuneConfig, make_plan, run_compare
from idtl_ray.mask import read_mask, write_mask

DIGITS = (10, 1, 8)  # num_classes, in_channels, image_size of `digits`


# ── functional core ───────────────────────────────────────────────────────────────────────────────


def test_loss_drop_drops_exactly_the_top_k_losses_with_stable_ties() -> None:
    losses = np.array([0.1, 5.0, 0.3, 2.0, 5.0, 0.2, 2.0])
    keep = loss_drop(losses, 3)
    assert keep.dtype == bool and keep.shape == (7,)
    assert np.flatnonzero(~keep).tolist() == [1, 3, 4]  # both 5.0s, then the first of the tied 2.0s
    assert loss_drop(losses, 0).all() and not loss_drop(losses, 7).any()


def test_random_drop_is_seeded_and_drops_exactly_k() -> None:
    a, b, c = random_drop(50, 7, seed=1), random_drop(50, 7, seed=1), random_drop(50, 7, seed=2)
    assert (~a).sum() == 7 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert random_drop(5, 0, 0).all() and random_drop(5, 5, 0).sum() == 0


def test_cleanlab_drop_finds_confident_disagreements_first() -> None:
    rng = np.random.default_rng(0)
    n, k = 60, 3
    truth = rng.integers(0, 3, n)
    probs = np.full((n, 3), 0.05)
    probs[np.arange(n), truth] = 0.9  # a confident model that agrees with the true class
    labels = truth.copy()
    flipped = np.array([14, 27, 41])
    labels[flipped] = (truth[flipped] + 1) % 3  # labels that disagree with a confident prediction
    probs[:10] = [0.5, 0.3, 0.2]  # a few unsure, but correctly labelled rows: less suspicious
    labels[:10] = 0
    keep = cleanlab_drop(labels, probs, k)
    assert sorted(np.flatnonzero(~keep).tolist()) == flipped.tolist()


def test_cross_validated_probs_sum_to_one_and_are_out_of_fold() -> None:
    rng = np.random.default_rng(0)
    n, d, classes = 60, 80, 3
    feats = rng.normal(size=(n, d))  # more dimensions than samples: any labels can be memorised
    labels = rng.integers(0, classes, n)  # random labels: nothing to learn out of sample
    probs = cross_validated_probs(feats, labels, classes, folds=3, seed=0, steps=20)
    assert probs.shape == (n, classes) and np.allclose(probs.sum(1), 1.0) and (probs >= 0).all()
    own = probs[np.arange(n), labels].mean()
    assert own < 0.5  # about chance (1/3): no sample's own label was seen when predicting it
    # the same probe fitted on all samples memorises them, so the folds are what keeps it honest
    from idtl_ray.baselines import _fit_probe

    f = torch.from_numpy(feats.astype(np.float32))
    probe = _fit_probe(f, torch.from_numpy(labels), classes, steps=20, weight_decay=1e-4)
    with torch.no_grad():
        assert torch.softmax(probe(f), 1)[np.arange(n), labels].mean() > 0.9
    assert np.array_equal(probs, cross_validated_probs(feats, labels, classes, folds=3, seed=0, steps=20))


def test_folds_are_stratified_so_a_rare_class_is_learnt_in_every_fold() -> None:
    labels = np.array([0] * 50 + [1] * 3 + [2] * 7)
    folds = stratified_folds(labels, 3, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(labels)))  # disjoint, all covered
    for held in folds:
        counts = np.bincount(labels[held], minlength=3)
        assert all(c // 3 <= got <= -(-c // 3) for c, got in zip((50, 3, 7), counts)), counts
    assert all(np.array_equal(a, b) for a, b in zip(folds, stratified_folds(labels, 3, seed=1)))  # seeded
    assert not all(np.array_equal(a, b) for a, b in zip(folds, stratified_folds(labels, 3, seed=2)))
    # the outcome: a class of 2 samples, 2 folds. Each sample is predicted by a probe that learnt the class from
    # the other one; the former unstratified folds of seed 2 held both in one fold, and a probe that never saw the
    # class gives its own label a probability near 0, which cleanlab reads as a label error
    rng = np.random.default_rng(0)
    y = np.array([0] * 98 + [1] * 2)
    order = np.random.default_rng(2).permutation(100)
    assert {98, 99} <= set(np.array_split(order, 2)[1].tolist())  # the former folds' bad draw
    probs = cross_validated_probs(rng.normal(size=(100, 4)) + 4.0 * np.eye(4)[y], y, 2, folds=2, seed=2, steps=50)
    assert probs[y == 1, 1].min() > 0.2, probs[y == 1, 1]


def test_features_and_logits_are_the_heads_input_and_output_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = M.build_model("resnet18", *DIGITS).train()  # BatchNorm: train and eval mode give other outputs
    x = np.random.default_rng(0).integers(0, 17, (5, 8, 8, 1), dtype=np.uint8)
    with torch.no_grad():
        model(D.to_tensor(x, (0.3,), (0.4,)))  # running statistics away from their defaults
        in_train_mode = model(D.to_tensor(x, (0.3,), (0.4,))).numpy()
    feats, logits = features_and_logits(model, x, (0.3,), (0.4,), batch_size=2)
    assert feats.shape == (5, 512) and logits.shape == (5, 10) and model.training  # mode restored
    with torch.no_grad():
        assert np.allclose(M.head_module(model)(torch.from_numpy(feats)).numpy(), logits, atol=1e-5)
        want = model.eval()(D.to_tensor(x, (0.3,), (0.4,))).numpy()
    assert np.allclose(logits, want, atol=1e-5) and not np.allclose(logits, in_train_mode, atol=1e-3)


def test_baseline_masks_drop_k_each_and_errors_name_the_fix() -> None:
    torch.manual_seed(0)
    model = M.build_model("sample-cnn", *DIGITS)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 17, (40, 8, 8, 1), dtype=np.uint8)
    y = np.arange(40) % 10
    masks = baseline_masks(model, x, y, (0.3,), (0.4,), 6, methods=("random", "loss", "cleanlab"), seed=0)
    assert list(masks) == ["random", "loss", "cleanlab"] and all((~m).sum() == 6 for m in masks.values())
    _, logits = features_and_logits(model, x, (0.3,), (0.4,))
    losses = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y), reduction="none")
    assert np.array_equal(masks["loss"], loss_drop(losses.numpy(), 6))

    assert parse_methods("Loss, random,loss") == ("loss", "random") and parse_methods(None) == ()
    with pytest.raises(InputError, match=r"unknown baseline 'lossy'; choose from random, loss, cleanlab"):
        parse_methods("random,lossy")
    with pytest.raises(InputError, match=r"unknown baseline 'influence'; choose from"):
        baseline_masks(model, x, y, (0.3,), (0.4,), 6, methods=("influence",))
    with pytest.raises(InputError, match=r"k \(samples to drop\) must be in 0\.\.39 so that at least one"):
        baseline_masks(model, x, y, (0.3,), (0.4,), 40)
    with pytest.raises(InputError, match=r"must be in 0\.\.5 for 5 samples, got -1"):
        random_drop(5, -1, 0)
    with pytest.raises(InputError, match=r"labels must be in 0\.\.9 \(the model has 10 outputs\), got 12: use the model"):
        baseline_masks(model, x, np.where(y == 3, 12, y), (0.3,), (0.4,), 2, methods=("random",))
    with pytest.raises(InputError, match="NaN or inf"):
        loss_drop(np.array([0.1, np.nan]), 1)


# ── compare --baselines ───────────────────────────────────────────────────────────────────────────


def _score_dir(root: Path, source: Path) -> tuple[Path, int]:
    """What `idtl-ray score` leaves for digits: split.json, a mask dropping every 7th id, model.pt."""
    data = D.load_dataset("digits")
    split = D.make_split(data, 0.1, seed=0)
    split.save(root / "split.json")
    ids = split.train_ids
    keep = ids % 7 != 3
    meta = {"dataset": "digits", "dataset_fingerprint": data.fingerprint(), "split_fingerprint": split.fingerprint()}
    write_mask(root / "mask.parquet", ids, data.train.y[ids], np.random.default_rng(0).normal(size=len(ids)), keep, meta)
    model, _ = M.load_checkpoint(source)
    M.save_checkpoint(root / "model.pt", model, {"dataset": "digits", "dataset_fingerprint": data.fingerprint()})
    return root / "mask.parquet", int((~keep).sum())


def _source(path: Path) -> Path:
    torch.manual_seed(123)
    M.save_checkpoint(path, M.build_model("sample-cnn", *DIGITS), {"dataset": "test"})
    return path


def test_compare_writes_baseline_masks_that_finetune_accepts(ray_session, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Orchestration without Train runs: each baseline mask drops the instance mask's k, passes make_plan,
    and equals the in-process selection (the ranking ran in a Ray worker that read the images itself)."""
    import idtl_ray.finetune as F

    mask, k = _score_dir(tmp_path / "score", _source(tmp_path / "src.pt"))
    seen: list[FinetuneConfig] = []

    def fake_run(cfg: FinetuneConfig, progress=False) -> dict:
        seen.append(cfg)
        n = len(make_plan(cfg).train_ids)  # the real plan: refuses a mask with foreign fingerprints
        return {"strategy": cfg.strategy, "model": cfg.model, "test_error": 1.0, "n_train_samples": n, "epochs": 1}

    monkeypatch.setattr(F, "run_finetune", fake_run)
    out = tmp_path / "cmp"
    weights = tmp_path / "w.pt"
    weights.touch()  # compare checks that a --weights PATH exists before any work; fake_run never loads it
    res = run_compare("digits", "sample-cnn", str(weights), 1, out=out, mask=str(mask), baselines="loss,cleanlab")
    assert [c.strategy for c in seen] == ["scratch", "model", "instance", "instance", "instance"]
    assert [c.out for c in seen[3:]] == [str(out / "baseline-loss"), str(out / "baseline-cleanlab")]
    assert {c.split for c in seen} == {str(tmp_path / "score" / "split.json")}
    inst = res["rows"][2]["n_train_samples"]
    for name in ("loss", "cleanlab"):
        m = read_mask(out / f"mask-{name}.parquet")
        assert (~m.keep).sum() == k and m.meta["baseline"] == name
        assert m.meta["split_fingerprint"] == read_mask(mask).meta["split_fingerprint"]
    data = D.load_dataset("digits")
    train, _, ids = D.apply_split(data, D.Split.load(tmp_path / "score" / "split.json"))
    scored, _ = M.load_checkpoint(tmp_path / "score" / "model.pt")
    local = baseline_masks(scored, train.x, train.y, data.mean, data.std, k, ["loss", "cleanlab"], seed=0)
    for name in ("loss", "cleanlab"):
        m = read_mask(out / f"mask-{name}.parquet")
        assert np.array_equal(m.kept_ids, np.sort(ids[local[name]])), name
    assert [r["n_train_samples"] for r in res["rows"][3:]] == [inst, inst]
    md = (out / "compare.md").read_text()
    assert f"| Baseline: drop {k} highest-loss | sample-cnn | 1.00 | {inst} | 1 |" in md
    assert f"| Baseline: drop {k} cleanlab label issues |" in md
    assert json.loads((out / "compare.json").read_text())["rows"][3]["baseline"] == "loss"

    before = (out / "mask-loss.parquet").stat().st_mtime_ns
    run_compare("digits", "sample-cnn", str(weights), 1, out=out, mask=str(mask), baselines=["loss"])
    assert (out / "mask-loss.parquet").stat().st_mtime_ns == before  # a rerun reuses the same selection

    (tmp_path / "score" / "model.pt").unlink()
    with pytest.raises(MaskError, match="no .*model.pt; re-run `idtl-ray score`"):
        run_compare("digits", "sample-cnn", str(weights), 1, out=tmp_path / "cmp2", mask=str(mask), baselines=["random"])


def test_cli_unknown_baseline_is_one_line_before_any_work(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from idtl_ray.cli_train import register

    app = typer.Typer()
    register(app)
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, ["compare", "--weights", "w.pt", "--out", str(out), "--baselines", "random,lsos"])
    assert res.exit_code == 2
    assert res.stderr.strip() == ("error: unknown baseline 'lsos'; choose from random, loss, cleanlab "
                                  "(e.g. --baselines random,loss,cleanlab)")  # fmt: skip
    assert not out.exists()


@pytest.mark.slow
def test_compare_trains_baseline_rows_on_as_many_samples_as_instance(ray_session, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Real Ray Train runs for both baselines; the three strategies' training is covered by test_finetune.

    The three arms report their real plan's sample count without training (each Train run costs
    10-20 s on 2 CPUs), so the test stays under a minute.
    """
    import idtl_ray.finetune as F

    real = F.run_finetune

    def baselines_only(cfg: FinetuneConfig, progress=False) -> dict:
        if "baseline-" in Path(cfg.out_dir).name:
            return real(cfg)
        return {"strategy": cfg.strategy, "model": cfg.model, "test_error": 0.0, "epochs": 0,
                "n_train_samples": len(make_plan(cfg).train_ids), "seen_ids_hash": None}  # fmt: skip

    monkeypatch.setattr(F, "run_finetune", baselines_only)
    mask, k = _score_dir(tmp_path / "score", _source(tmp_path / "src.pt"))
    res = run_compare("digits", "sample-cnn", str(tmp_path / "src.pt"), 1, out=tmp_path / "cmp", mask=str(mask),
                      baselines=["random", "loss"], batch_size=256, eval_every=1)  # fmt: skip
    rows = {r.get("label", r["strategy"]): r for r in res["rows"]}
    inst = rows["instance"]["n_train_samples"]
    assert inst == len(read_mask(mask).kept_ids)
    for label in (f"Baseline: drop {k} random", f"Baseline: drop {k} highest-loss"):
        assert rows[label]["n_train_samples"] == inst and rows[label]["strategy"] == "instance"
        assert rows[label]["n_seen_epoch0"] == inst and 0.0 <= rows[label]["test_error"] <= 100.0
        assert f"| {label} | sample-cnn |" in res["table"]
    random_row, loss_row = rows[f"Baseline: drop {k} random"], rows[f"Baseline: drop {k} highest-loss"]
    assert random_row["seen_ids_hash"] != loss_row["seen_ids_hash"]  # same count, other samples
    cmp = (tmp_path / "cmp").resolve()
    assert random_row["mask"] == str(cmp / "mask-random.parquet")
    assert np.array_equal(np.load(cmp / "baseline-loss" / "seen_ids.npy"), read_mask(cmp / "mask-loss.parquet").kept_ids)
