"""Tests of idtl_ray.models: builds, layer counting, freezing, hybrid init, weights and checkpoints."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from idtl_ray.errors import IdtlError, WeightsError
from idtl_ray.models import (
    LAYER_COUNTS,
    MODELS,
    build_model,
    describe_layers,
    freeze_all_but_head,
    freeze_first,
    head_module,
    hybrid_init,
    imagenet_state_dict,
    last_k_layer_params,
    layers,
    load_checkpoint,
    load_weights,
    replace_head,
    save_checkpoint,
    xavier_init_,
)

_WeightsEnum = torchvision.models.WeightsEnum


@pytest.fixture(scope="module")
def built() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: build_model(name, 10) for name in MODELS}


@pytest.mark.parametrize("name", MODELS)
def test_forward_32x32_and_layer_count(built: dict[str, nn.Module], name: str) -> None:
    model = built[name].eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert len(layers(model)) == LAYER_COUNTS[name]
    assert head_module(model).out_features == 10
    assert layers(model)[-1].name == model.head_name


def test_resnet50_has_54_layers_as_documented(built: dict[str, nn.Module]) -> None:
    import idtl_ray.models as m

    ls = layers(built["resnet50"])
    assert len(ls) == 54 and "resnet50: 54" in m.__doc__
    assert sum(layer.kind == "conv" for layer in ls) == 53
    assert sum("downsample" in layer.name for layer in ls) == 4
    assert ls[0].modules == ["conv1", "bn1"] and ls[-1].modules == ["fc"]
    # the shortcut conv follows the block's conv3 and owns its BN
    names = [layer.name for layer in ls]
    i = names.index("layer1.0.downsample.0")
    assert names[i - 1] == "layer1.0.conv3" and ls[i].modules == ["layer1.0.downsample.0", "layer1.0.downsample.1"]
    assert head_module(built["resnet50"]).in_features == 2048 * 2 * 2


def test_small_image_adaptation_widths(built: dict[str, nn.Module]) -> None:
    assert head_module(built["densenet121"]).in_features == 1024 * 2 * 2
    assert built["vgg16"].classifier[0].in_features == 512
    assert isinstance(built["resnet50"].maxpool, nn.Identity)
    assert isinstance(built["densenet121"].features.pool0, nn.Identity)


@pytest.mark.parametrize("size", [8, 28])
def test_sample_cnn_grey(size: int) -> None:
    model = build_model("sample-cnn", 10, in_channels=1, image_size=size)
    assert model(torch.randn(2, 1, size, size)).shape == (2, 10)
    assert [layer.name for layer in layers(model)] == ["conv1", "conv2", "conv3", "conv4", "fc1", "fc2"]


def test_resnet_one_channel() -> None:
    model = build_model("resnet18", 10, in_channels=1, image_size=28)
    assert model.conv1.weight.shape == (64, 1, 7, 7) and model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_xavier_init_and_unknown_model() -> None:
    model = build_model("sample-cnn", 10, 1, 8)
    assert torch.all(model.conv1.bias == 0) and torch.all(model.fc1.bias == 0)
    bound = (6 / (model.fc1.in_features + model.fc1.out_features)) ** 0.5
    assert model.fc1.weight.abs().max() <= bound
    with pytest.raises(ValueError, match="sample-cnn"):
        build_model("alexnet", 10)


def test_freeze_first_exact_params() -> None:
    model = build_model("resnet18", 10)
    frozen = freeze_first(model, 3)
    expected = {"conv1.weight", "bn1.weight", "bn1.bias",
                "layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias",
                "layer1.0.conv2.weight", "layer1.0.bn2.weight", "layer1.0.bn2.bias"}  # fmt: skip
    assert set(frozen) == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()} - expected
    # re-freezing fewer layers unfreezes the rest; 0 freezes nothing
    assert freeze_first(model, 0) == [] and all(p.requires_grad for p in model.parameters())
    for bad in (-1, 21):
        with pytest.raises(ValueError, match="0..20"):
            freeze_first(model, bad)
    freeze_first(model, 3)  # the layer table says which layers train, row by row
    rows = [ln.split()[-1] for ln in describe_layers(model).splitlines()[1:-1]]
    assert rows == ["no"] * 3 + ["yes"] * 18


def test_freeze_resnet50_paper_counts(built: dict[str, nn.Module]) -> None:
    model = build_model("resnet50", 10)
    for n in (20, 30, 40):
        frozen = set(freeze_first(model, n))
        want = {f"{mn}.{pn}" for layer in layers(model)[:n] for mn in layer.modules
                for pn, _ in model.get_submodule(mn).named_parameters(recurse=False)}  # fmt: skip
        assert frozen == want
        assert all(p.requires_grad == (name not in frozen) for name, p in model.named_parameters())


def test_freeze_all_but_head() -> None:
    model = build_model("vgg16", 2)
    freeze_all_but_head(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"classifier.{i}.{w}" for i in (0, 3, 6) for w in ("weight", "bias")}
    model = build_model("resnet18", 2)
    frozen = freeze_all_but_head(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    assert "bn1.weight" in frozen


def test_last_k_layer_params() -> None:
    model = build_model("resnet18", 10)
    assert last_k_layer_params(model, 1) == ["fc.weight", "fc.bias"]
    assert last_k_layer_params(model, 2) == ["layer4.1.conv2.weight", "layer4.1.bn2.weight", "layer4.1.bn2.bias",
                                             "fc.weight", "fc.bias"]  # fmt: skip
    with pytest.raises(ValueError):
        last_k_layer_params(model, 0)


def _randomise_bn_stats(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)


def test_hybrid_init_copies_first_k_bitwise_and_reinits_rest() -> None:
    torch.manual_seed(1)
    src = build_model("resnet18", 10)
    _randomise_bn_stats(src)
    src_state = {k: v.clone() for k, v in src.state_dict().items()}
    torch.manual_seed(2)
    dst = build_model("resnet18", 10)
    _randomise_bn_stats(dst)
    copied = hybrid_init(dst, src_state, 10)
    ls = layers(dst)
    first = {f"{mn}.{k}" for layer in ls[:10] for mn in layer.modules
             for k in dict(dst.get_submodule(mn).state_dict())}  # fmt: skip
    assert set(copied) == first and "layer2.0.downsample.1.running_mean" in first
    state = dst.state_dict()
    for k in first:
        assert torch.equal(state[k], src_state[k]), k
    # the rest: Xavier conv/linear, BN weight 1 bias 0 and fresh running stats
    for layer in ls[10:]:
        assert not torch.equal(state[layer.name + ".weight"], src_state[layer.name + ".weight"])
        for bn in layer.modules[1:]:
            assert torch.all(state[f"{bn}.weight"] == 1) and torch.all(state[f"{bn}.running_mean"] == 0)
            assert torch.all(state[f"{bn}.running_var"] == 1) and state[f"{bn}.num_batches_tracked"] == 0
    only_stem = {k: v for k, v in src_state.items() if k.startswith(("conv1.", "bn1."))}
    with pytest.raises(WeightsError, match=r"lack layer1\.0\.conv1\.weight"):
        hybrid_init(build_model("resnet18", 10), only_stem, 2)
    assert len(hybrid_init(build_model("resnet18", 10), only_stem, 1)) == 6  # conv1.weight + bn1's 5 tensors


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = build_model("sample-cnn", 26, 1, 28)
    path = tmp_path / "ckpt" / "emnist.pt"
    save_checkpoint(path, model, {"epochs": 2, "dataset": "emnist-letters"})
    assert not path.with_name("emnist.pt.tmp").exists()
    back, meta = load_checkpoint(path)
    assert meta == {"epochs": 2, "dataset": "emnist-letters"}
    save_checkpoint(path, model, {"test_error": np.float64(1.5)})  # passed json.dumps, then could not be loaded
    assert load_checkpoint(path)[1] == {"test_error": 1.5}
    assert back.idtl_config == model.idtl_config and back.head_name == "fc2"
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(back(x), model(x))
    fresh = build_model("sample-cnn", 26, 1, 28)
    report = load_weights(fresh, "sample-cnn", str(path))
    assert not report["head_replaced"] and len(report["loaded"]) == len(model.state_dict())
    assert torch.equal(fresh(x), model(x))
    # a plain state dict loads too
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    report = load_weights(build_model("sample-cnn", 26, 1, 28), "sample-cnn", str(tmp_path / "plain.pt"))
    assert report["skipped"] == [] and not report["head_replaced"]


def test_corrupt_and_missing_weights_files(tmp_path: Path) -> None:
    model = build_model("sample-cnn", 10, 1, 8)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage" * 10)
    for path in (bad, tmp_path / "missing.pt"):
        with pytest.raises(WeightsError) as e:
            load_weights(model, "sample-cnn", str(path))
        assert str(path) in str(e.value) and isinstance(e.value, IdtlError)
    with pytest.raises(WeightsError, match="not an idtl-ray checkpoint"):
        torch.save(model.state_dict(), tmp_path / "sd.pt")
        load_checkpoint(tmp_path / "sd.pt")


def test_imagenet_offline_error_names_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def offline(self, *a, **k):
        raise URLError("no network")

    monkeypatch.setattr(_WeightsEnum, "get_state_dict", offline)
    with pytest.raises(WeightsError) as e:
        load_weights(build_model("resnet18", 10), "resnet50", "imagenet")
    msg = str(e.value)
    assert "resnet50-0676ba61.pth" in msg and str(Path(torch.hub.get_dir()) / "checkpoints") in msg
    assert "--weights PATH" in msg
    # there but unreadable (a partial download): say so, not "put it there"
    cache = tmp_path / "hub"
    (cache / "checkpoints").mkdir(parents=True)
    (cache / "checkpoints" / "resnet50-0676ba61.pth").write_bytes(b"partial")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(cache))
    with pytest.raises(WeightsError, match="resnet50-0676ba61.pth cannot be read .*partial or corrupt.*delete it"):
        load_weights(build_model("resnet18", 10), "resnet50", "imagenet")
    with pytest.raises(WeightsError, match="no ImageNet weights"):
        load_weights(build_model("sample-cnn", 10, 1, 8), "sample-cnn", "imagenet")


def test_imagenet_loaded_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in ImageNet state dict (torchvision layout, 1000 classes) goes in by key and shape."""
    torch.manual_seed(3)
    fake = torchvision.models.resnet18(weights=None).state_dict()
    monkeypatch.setattr(_WeightsEnum, "get_state_dict", lambda self, *a, **k: dict(fake))
    model = build_model("resnet18", 10)
    report = load_weights(model, "resnet18", "imagenet")
    assert report["head_replaced"] and set(report["skipped"]) == {"fc.weight", "fc.bias"}
    assert len(report["loaded"]) == len(fake) - 2
    assert torch.equal(model.layer3[1].conv2.weight, fake["layer3.1.conv2.weight"])
    assert model.fc.weight.shape == (10, 2048)
    # 1-channel model: RGB filters summed
    grey = build_model("resnet18", 10, in_channels=1, image_size=28)
    load_weights(grey, "resnet18", "imagenet")
    assert torch.allclose(grey.conv1.weight, fake["conv1.weight"].sum(1, keepdim=True))


def test_torchvisions_imagenet_file_given_by_path_loads_as_imagenet(tmp_path: Path) -> None:
    """The offline message says to pass the file as --weights PATH: it was then loaded by the strict rules
    of a user's file and refused for a grey model (3-channel conv1) and for VGG-16 below 64 px."""
    torch.manual_seed(3)
    fake = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(fake, path)
    grey = build_model("resnet18", 10, in_channels=1, image_size=28)
    report = load_weights(grey, "resnet18", str(path))
    assert report["head_replaced"] and torch.allclose(grey.conv1.weight, fake["conv1.weight"].sum(1, keepdim=True))
    torch.save(fake, tmp_path / "mine.pt")  # the same tensors under another name: a user's file, strict
    with pytest.raises(WeightsError, match="conv1.weight has shape"):
        load_weights(build_model("resnet18", 10, in_channels=1, image_size=28), "resnet18", str(tmp_path / "mine.pt"))


def test_imagenet_densenet_legacy_keys_and_vgg_first_fc(monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    dn = torchvision.models.densenet121(weights=None).state_dict()
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v for k, v in dn.items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    monkeypatch.setattr(_WeightsEnum, "get_state_dict", lambda self, *a, **k: dict(legacy))
    model = build_model("densenet121", 10)
    report = load_weights(model, "densenet121", "imagenet")
    assert set(report["skipped"]) == {"classifier.weight", "classifier.bias"} and report["unexpected"] == []
    assert torch.equal(model.features.denseblock2.denselayer3.conv2.weight,
                       dn["features.denseblock2.denselayer3.conv2.weight"])  # fmt: skip

    vgg = build_model("vgg16", 10)
    state = {k: v.clone() for k, v in vgg.state_dict().items()}
    state["classifier.0.weight"] = torch.empty(4096, 25088)  # ImageNet's 7x7x512 input: does not fit
    state["classifier.6.weight"], state["classifier.6.bias"] = torch.zeros(1000, 4096), torch.zeros(1000)
    state["classifier.3.weight"] = torch.full((4096, 4096), 0.5)
    monkeypatch.setattr(_WeightsEnum, "get_state_dict", lambda self, *a, **k: dict(state))
    fresh = build_model("vgg16", 10)
    report = load_weights(fresh, "vgg16", "imagenet")
    assert "classifier.0.weight" in report["skipped"] and "classifier.3.weight" in report["loaded"]
    assert "classifier.0.bias" in report["skipped"] and "classifier.0.bias" not in report["loaded"]  # re-initialised
    assert torch.all(fresh.classifier[3].weight == 0.5) and torch.all(fresh.classifier[0].bias == 0)
    assert imagenet_state_dict("vgg16").keys() == state.keys()


def test_head_mismatch_reported_backbone_mismatch_raises(tmp_path: Path) -> None:
    src = build_model("resnet18", 10)
    save_checkpoint(tmp_path / "r18.pt", src, {})
    dst = build_model("resnet18", 5)
    report = load_weights(dst, "resnet18", str(tmp_path / "r18.pt"))
    assert report["head_replaced"] and set(report["skipped"]) == {"fc.weight", "fc.bias"}
    assert dst.fc.out_features == 5 and torch.equal(dst.layer4[1].conv2.weight, src.layer4[1].conv2.weight)

    grey = build_model("resnet18", 10, in_channels=1)
    torch.save(grey.state_dict(), tmp_path / "grey.pt")
    with pytest.raises(WeightsError, match=r"conv1\.weight"):
        load_weights(build_model("resnet18", 10), "resnet18", str(tmp_path / "grey.pt"))
    with pytest.raises(WeightsError, match="resnet18 checkpoint"):
        load_weights(build_model("sample-cnn", 10, 1, 8), "sample-cnn", str(tmp_path / "r18.pt"))
    torch.save(build_model("sample-cnn", 10, 3, 32).state_dict(), tmp_path / "cnn.pt")
    with pytest.raises(WeightsError, match=r"conv1\.weight has shape \(32, 3, 3, 3\)"):
        load_weights(build_model("resnet18", 10), "resnet18", str(tmp_path / "cnn.pt"))
    partial = {k: v for k, v in src.state_dict().items() if k != "layer2.0.bn1.running_mean"}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(WeightsError, match=r"do not fit this model \(missing layer2\.0\.bn1\.running_mean"):
        load_weights(build_model("resnet18", 10), "resnet18", str(tmp_path / "partial.pt"))


def test_replace_head_and_xavier() -> None:
    model = build_model("densenet121", 10)
    new = replace_head(model, 3)
    assert model.classifier is new and new.out_features == 3 and model.idtl_config["num_classes"] == 3
    assert torch.all(new.bias == 0)
    xavier_init_(model)
    assert "densenet121: 121 layers" in describe_layers(model)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_small_image_changes_apply_below_64_pixels_only(size):
    # Paper 4.2's changes (no stem max-pool, no global pooling) are for small images; at 64 px and
    # above the torchvision architecture keeps its pooling, so the head sees what ImageNet's did.
    r = build_model("resnet18", 10, in_channels=3, image_size=size)
    small = size < 64
    assert isinstance(r.maxpool, torch.nn.Identity) == small
    assert r.fc.in_features == (512 * (size // 16) ** 2 if small else 512)
    d = build_model("densenet121", 10, in_channels=3, image_size=size)
    assert d.classifier.in_features == (1024 * (size // 16) ** 2 if small else 1024)
    for m in (r, d):
        assert m.eval()(torch.zeros(1, 3, size, size)).shape == (1, 10)


def test_vgg16_at_64_pixels_takes_imagenets_classifier_shape():
    v = build_model("vgg16", 10, in_channels=3, image_size=64)
    assert v.classifier[0].in_features == 512 * 7 * 7
    assert v.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 10)
