"""`idtl-ray score --head auto` decides by what the classes are, not how many (issue 10, item 3).

A source head is kept only when the checkpoint records class names equal (same names, same order)
to the target's; same count with other or unknown names gets a new head fitted, and the head info
(and the printed summary) says why. Checkpoints written by pretrain / finetune / the experiments'
in-process source record their dataset and class names. No Ray: ``prepare_model`` is called directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import idtl_ray.adapt as A
import idtl_ray.workflow as W
from idtl_ray.config import ScoreConfig
from idtl_ray.data import apply_split, load_dataset, make_split
from idtl_ray.errors import WeightsError
from idtl_ray.models import build_model, head_module, load_checkpoint, save_checkpoint
from idtl_ray.scoring import Preprocess

DIGITS = [str(i) for i in range(10)]
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@pytest.fixture(scope="module")
def digits():
    d = load_dataset("digits")
    train, _, _ = apply_split(d, make_split(d, 0.1, 0))
    return d, train.x[:300], train.y[:300], Preprocess(d.mean, d.std)


@pytest.fixture()
def source_model():
    torch.manual_seed(1)
    return build_model("sample-cnn", 10, in_channels=1, image_size=8)


def _prepare(digits, weights: Path | str, head: str = "auto"):
    d, x, y, pre = digits
    cfg = ScoreConfig(dataset="digits", model="sample-cnn", weights=str(weights), head=head, head_steps=3)
    return W.prepare_model(cfg, d, x, y, pre)


def _no_fit(*_a, **_k):
    raise AssertionError("fit_head must not run: the weights' head fits the target's classes")


def test_same_class_names_keep_the_head(digits, source_model, tmp_path, monkeypatch):
    path = tmp_path / "src.pt"
    save_checkpoint(path, source_model, {"dataset": "mnist-5k@8", "classes": DIGITS})
    monkeypatch.setattr(A, "fit_head", _no_fit)  # adapt.fit_new_head looks it up in adapt
    model, info = _prepare(digits, path)
    h = info["head"]
    assert h["new_head"] is False and h["classes_match"] is True and h["source_dataset"] == "mnist-5k@8"
    assert "kept" in h["reason"] and "warning" not in h
    assert torch.equal(head_module(model).weight, head_module(source_model).weight)
    assert "head: kept the weights' 10-class head (the weights' classes are digits' (0..9))" in W.format_summary(info)


def test_same_count_other_class_names_get_a_new_head(digits, source_model, tmp_path):
    path = tmp_path / "fashion.pt"
    save_checkpoint(path, source_model, {"dataset": "fashion-mnist", "classes": FASHION})
    model, info = _prepare(digits, path)
    h = info["head"]
    assert h["new_head"] is True and h["classes_match"] is False and h["source_classes"] == 10
    assert "differ" in h["reason"] and "fashion-mnist's T-shirt/top" in h["reason"] and "digits' 0..9" in h["reason"]
    assert "probe_train_accuracy" in h  # the fit_head path ran
    assert not torch.equal(head_module(model).weight, head_module(source_model).weight)
    line = [ln for ln in W.format_summary(info).splitlines() if ln.startswith("head:")]
    assert line == ["head: new 10-class head fitted (the weights' classes differ: fashion-mnist's T-shirt/top, "
                    "Trouser, ... vs digits' 0..9)"]
    # the same names in another order are other classes too
    save_checkpoint(path, source_model, {"dataset": "digits", "classes": DIGITS[::-1]})
    _, info = _prepare(digits, path)
    assert info["head"]["new_head"] is True and "another order" in info["head"]["reason"]


def test_plain_state_dict_with_matching_count_gets_a_new_head(digits, source_model, tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(source_model.state_dict(), path)
    model, info = _prepare(digits, path)
    h = info["head"]
    assert h["new_head"] is True and h["classes_match"] is None and h["source_classes"] == 10
    assert "unknown" in h["reason"] and "plain state dict" in h["reason"]
    # every backbone tensor still came from the file
    src = source_model.state_dict()
    assert all(torch.equal(v, src[k]) for k, v in model.state_dict().items() if not k.startswith("fc2."))
    summary = W.format_summary(info)
    assert "head: new 10-class head fitted (the weights' classes are unknown (a plain state dict))" in summary


def test_checkpoint_without_class_names_gets_a_new_head(digits, source_model, tmp_path):
    path = tmp_path / "old.pt"
    save_checkpoint(path, source_model, {"dataset": "digits"})  # written before checkpoints recorded classes
    _, info = _prepare(digits, path)
    assert info["head"]["new_head"] is True and "records no class names" in info["head"]["reason"]


def test_head_keep_and_new(digits, source_model, tmp_path, monkeypatch):
    plain = tmp_path / "plain.pt"
    torch.save(source_model.state_dict(), plain)
    same = tmp_path / "same.pt"
    save_checkpoint(same, source_model, {"dataset": "digits", "classes": DIGITS})
    with monkeypatch.context() as m:
        m.setattr(A, "fit_head", _no_fit)
        model, info = _prepare(digits, plain, head="keep")  # unknown classes: kept, with a warning
        assert info["head"]["new_head"] is False and "unknown" in info["head"]["warning"]
        assert torch.equal(head_module(model).weight, head_module(source_model).weight)
        assert "head: kept the weights' 10-class head (--head keep; WARNING: the weights' classes are unknown" \
            in W.format_summary(info)
        _, info = _prepare(digits, same, head="keep")
        assert info["head"]["new_head"] is False and "warning" not in info["head"]
    _, info = _prepare(digits, same, head="new")
    assert info["head"]["new_head"] is True and info["head"]["reason"].startswith("--head new")
    wide = tmp_path / "wide.pt"
    save_checkpoint(wide, build_model("sample-cnn", 26, in_channels=1, image_size=8), {"dataset": "letters"})
    with pytest.raises(WeightsError, match="26 classes but digits has 10"):
        _prepare(digits, wide, head="keep")
    _, info = _prepare(digits, wide)
    assert info["head"]["new_head"] is True and "26 classes" in info["head"]["reason"]
    _, info = _prepare(digits, "none")  # no weights: the Xavier head, no reason line
    assert info["head"]["new_head"] is False and "reason" not in info["head"]
    assert "head:" not in W.format_summary(info)


def test_a_head_made_at_another_image_size_is_named_as_such(digits, tmp_path):
    """Same classes, another feature width (a resnet18 checkpoint made at 32 px, scored at 8 px): the message
    said "the weights' head has 10 classes but digits has 10"."""
    d, x, y, pre = digits
    path = tmp_path / "r32.pt"
    save_checkpoint(path, build_model("resnet18", 10, in_channels=1, image_size=32), {"dataset": "digits", "classes": DIGITS})
    cfg = ScoreConfig(dataset="digits", model="resnet18", weights=str(path), head="keep", head_steps=1)
    with pytest.raises(WeightsError, match="head takes 2048 features but resnet18 at 8 px gives 512 .*made at 32 px"):
        W.prepare_model(cfg, d, x, y, pre)
    _, info = W.prepare_model(ScoreConfig(dataset="digits", model="resnet18", weights=str(path), head_steps=1), d, x, y, pre)
    assert info["head"]["new_head"] is True and "2048 features" in info["head"]["why"]


def test_pretrain_checkpoint_records_dataset_and_classes(tmp_path, monkeypatch):
    """pretrain's checkpoint (and the finetune run's model.pt under it) carry dataset and class names.

    run_finetune is replaced by the same final write (``write_outputs``) without the Ray Train loop.
    """
    import idtl_ray.finetune as F
    from idtl_ray.finetune.outputs import write_outputs
    from idtl_ray.finetune.plan import arch_of

    def fake_run_finetune(cfg, **_kw):  # progress= as run_finetune takes it
        plan = F.make_plan(cfg)
        model, info = F.build_finetune_model(cfg, *arch_of(plan.data), data=plan.data)
        out = cfg.out_dir.expanduser().resolve()
        out.mkdir(parents=True, exist_ok=True)
        state = {"history": [{"epoch": 0, "lr": 1e-3, "train_loss": 1.0, "val_acc": None, "test_error": 50.0}],
                 "attempts": [0]}
        return write_outputs(cfg, plan, out, model, state, np.asarray(plan.train_ids), info, "fake")

    monkeypatch.setattr(F, "run_finetune", fake_run_finetune)
    meta = F.pretrain("digits", "sample-cnn", 1, tmp_path / "src.pt")
    _, ck = load_checkpoint(tmp_path / "src.pt")
    assert ck["dataset"] == meta["dataset"] == "digits" and ck["classes"] == meta["classes"] == DIGITS
    _, run_ck = load_checkpoint(tmp_path / "src.pt.run" / "model.pt")
    assert run_ck["dataset"] == "digits" and run_ck["classes"] == DIGITS
    assert A._checkpoint_classes(tmp_path / "src.pt", "fc2") == {"num_classes": 10, "classes": DIGITS, "dataset": "digits",
                                                                 "kind": "checkpoint", "head_in": 128, "image_size": 8}


def test_experiments_in_process_source_records_classes(tmp_path):
    from idtl_ray.experiments import SourceSpec
    from idtl_ray.experiments.runner import _train_in_process

    src = SourceSpec("digits", "sample-cnn", epochs=1, batch_size=512)
    _train_in_process("digits", src, 0, tmp_path / "s.pt", None)
    _, ck = load_checkpoint(tmp_path / "s.pt")
    assert ck["dataset"] == "digits" and ck["classes"] == DIGITS


def test_fitting_a_head_leaves_each_layers_mode_and_no_gradients() -> None:
    """A frozen BatchNorm held in eval inside a training model stays in eval (model.train(True) reset it)."""
    from idtl_ray.head import fit_head

    model = build_model("resnet18", 3, in_channels=3, image_size=32)
    model.train()
    model.bn1.eval()
    x = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    fit_head(model, x, np.arange(12) % 3, Preprocess((0.5,) * 3, (0.25,) * 3), steps=3)
    assert model.training and not model.bn1.training and model.layer1[0].bn1.training
    assert all(p.grad is None for p in head_module(model).parameters())
