"""The influence engine against ground truth (issue 2, item 3).

Ground truth is leave-one-out re-training of an L2-regularised multinomial logistic regression on
scikit-learn's bundled digits: convex, so the influence approximation should be near exact.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

from idtl_ray import score_samples
from idtl_ray.errors import IdtlError, InputError, SolverDivergedError
from idtl_ray.influence import InfluenceConfig, InfluenceEngine, compute_influence, solve
from idtl_ray.selection import keep_mask

LAM = 1e-2  # L2 strength of the logistic regression = the damping that makes (H + λI) its exact Hessian


def digits(n_train: int = 1000, n_val: int = 300, flip: float = 0.0, seed: int = 0):
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    x = torch.tensor(x[perm] / 16.0)
    y = torch.tensor(y[perm])
    xt, yt = x[:n_train], y[:n_train].clone()
    flipped = np.zeros(n_train, dtype=bool)
    if flip:
        idx = rng.choice(n_train, size=int(flip * n_train), replace=False)
        yt[idx] = (yt[idx] + torch.tensor(rng.integers(1, 10, size=len(idx)))) % 10
        flipped[idx] = True
    return (TensorDataset(xt, yt), TensorDataset(x[n_train:n_train + n_val], y[n_train:n_train + n_val]), flipped)


def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    # Σ L_j / n + λ/2 |θ|²: with n fixed, dropping one sample is exactly the ε = -1/n up-weighting.
    reg = sum((p**2).sum() for p in model.parameters())
    return F.cross_entropy(model(x), y, reduction="sum") / n + LAM / 2 * reg


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int | None = None) -> nn.Module:
    n = len(y) if n is None else n
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=1000, tolerance_grad=1e-13,
                            tolerance_change=1e-15, history_size=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(model, x, y, n)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return model


def val_loss(model: nn.Module, val: TensorDataset) -> float:
    x, y = val.tensors
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y, reduction="sum"))


@pytest.fixture(scope="module")
def lr_setup():
    torch.manual_seed(0)
    train, val, _ = digits()
    model = fit(nn.Linear(64, 10).double(), *train.tensors)
    return model, train, val


def exact_scores(model, train, val, **kw):
    cfg = dict(solver="exact", damping=LAM, curvature_samples=None, batch_size=4096)
    cfg.update(kw)
    return compute_influence(model, train, val, InfluenceConfig(score="paper", **cfg))


def test_matches_leave_one_out_retraining(lr_setup):
    model, train, val = lr_setup
    scores = exact_scores(model, train, val).scores
    order = np.argsort(scores)
    rng = np.random.default_rng(1)
    rest = order[15:-15]
    chosen = np.concatenate([order[:15], order[-15:], rng.choice(rest, size=15, replace=False)])
    x, y = train.tensors
    base = val_loss(model, val)
    actual = []
    for i in chosen:
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[int(i)] = False
        refit = fit(copy.deepcopy(model), x[keep], y[keep], n=len(y))
        actual.append(val_loss(refit, val) - base)
    actual = np.array(actual)
    predicted = scores[chosen]
    r = float(np.corrcoef(predicted, actual)[0, 1])
    slope = float(np.polyfit(predicted, actual, 1)[0])
    print(f"\nleave-one-out on {len(chosen)} samples: pearson r = {r:.4f}, slope (actual on predicted) = {slope:.4f}")
    assert len(chosen) >= 40
    assert r >= 0.95
    assert 0.8 <= slope <= 1.25
    # Sign check of the convention: the most negative prediction must really lower validation loss, and
    # every prediction clear of zero (above 10% of the largest) has the sign retraining gives
    assert actual[0] < 0 and actual[15] > 0
    clear = np.abs(predicted) > 0.1 * np.abs(predicted).max()
    print(f"signs agree on {int((np.sign(predicted) == np.sign(actual))[clear].sum())} of {int(clear.sum())} clear predictions")
    assert clear.sum() >= 30 and np.array_equal(np.sign(predicted[clear]), np.sign(actual[clear]))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_iterative_solvers_agree_with_exact(lr_setup):
    model, train, val = lr_setup
    engine = InfluenceEngine(model, device="cpu")
    g, _ = engine.validation_gradient(val)
    damping = 0.05
    op = engine.curvature(train, "ggn", damping, samples=None, batch_size=4096)
    s_exact, _ = solve(op, g, InfluenceConfig(score="paper", solver="exact", damping=damping))
    s_cg, info_cg = solve(op, g, InfluenceConfig(score="paper", solver="cg", damping=damping, tol=1e-7, max_iter=300))
    s_lissa, info_l = solve(op, g, InfluenceConfig(score="paper", solver="lissa", damping=damping, tol=1e-6, max_iter=3000, lissa_scale=1.5))
    print(f"\ncg: {info_cg}\nlissa: {info_l}")
    assert info_cg.converged and info_cg.iterations > 1
    assert rel_err(s_cg, s_exact) < 1e-4
    assert rel_err(s_lissa, s_exact) < 1e-2
    assert info_l.relative_residual < 1e-2


def test_ggn_equals_exact_hessian_for_logistic_regression(lr_setup):
    model, train, _ = lr_setup
    engine = InfluenceEngine(model, device="cpu")
    ggn = engine.curvature(train, "ggn", 0.0, samples=None, batch_size=4096).dense()
    hess = engine.curvature(train, "exact", 0.0, samples=None, batch_size=4096).dense()
    assert rel_err(ggn, hess) < 1e-10


class SmallCNN(nn.Module):
    def __init__(self, in_ch: int = 1, classes: int = 10, bn: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def digit_images(n: int, offset: int = 0, dtype=torch.float32) -> TensorDataset:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[offset:offset + n] / 16.0, dtype=dtype).view(-1, 1, 8, 8)
    return TensorDataset(x, torch.tensor(y[offset:offset + n]))


def trained_cnn(dtype=torch.float32) -> SmallCNN:
    torch.manual_seed(0)
    model = SmallCNN().to(dtype)
    data = digit_images(512, dtype=dtype)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()
    for _ in range(30):  # a few steps so BatchNorm running stats are not the defaults
        opt.zero_grad()
        F.cross_entropy(model(data.tensors[0]), data.tensors[1]).backward()
        opt.step()
    return model


def test_ggn_product_equals_dense_jacobian_form():
    model = trained_cnn(torch.float64)
    data = digit_images(24, offset=600, dtype=torch.float64)
    engine = InfluenceEngine(model, device="cpu")
    op = engine.curvature(data, "ggn", 0.0, samples=None, batch_size=8)
    x, y = data.tensors
    params = engine.space.params
    # Dense reference: per-sample Jacobian of the logits w.r.t. the flat parameters, then Jᵀ H_out J.
    flat0 = engine.space.flatten(params)

    def logits_flat(theta):
        return engine.logits(engine.space.unflatten(theta), x)

    model.eval()
    jac = torch.autograd.functional.jacobian(logits_flat, flat0)  # (N, C, P)
    probs = torch.softmax(logits_flat(flat0), -1)
    h_out = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    dense = torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / len(y)
    v = torch.randn(engine.space.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert rel_err(op.matvec(v), dense @ v) < 1e-10


def test_cg_on_cnn_with_ggn_matches_exact():
    model = trained_cnn(torch.float64)
    train, val = digit_images(200, offset=600, dtype=torch.float64), digit_images(60, offset=900, dtype=torch.float64)
    a = compute_influence(model, train, val, InfluenceConfig(score="paper", solver="exact", damping=0.01, curvature_samples=None))
    b = compute_influence(model, train, val, InfluenceConfig(score="paper", solver="cg", damping=0.01, curvature_samples=None, tol=1e-9, max_iter=500))
    assert rel_err(b.scores, a.scores) < 1e-4


def test_jvp_scores_equal_per_sample_gradient_scores_small_cnn():
    model = trained_cnn()
    model.train()  # the engine must switch to eval and back
    train, val = digit_images(64, offset=600), digit_images(32, offset=900)
    cfg = InfluenceConfig(score="paper", solver="cg", damping=0.1, curvature_samples=64, max_iter=20, tol=1e-3)
    engine = InfluenceEngine(model, device="cpu")
    g, _ = engine.validation_gradient(val)
    s, _ = solve(engine.curvature(train, cfg.curvature, cfg.damping, cfg.curvature_samples), g, cfg)
    fast = engine.score_dataset(train, s, batch_size=32, method="jvp")
    slow = engine.score_dataset(train, s, batch_size=32, method="grad")
    assert fast.dtype == np.float64 and fast.shape == (64,)
    assert rel_err(fast, slow) < 1e-5
    assert model.training and model.bn1.training  # mode restored


def test_jvp_scores_equal_per_sample_gradient_scores_resnet18():
    from idtl_ray.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=3, image_size=32)
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(12) % 10
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.train()
        model(torch.randn(64, 3, 32, 32))
    engine = InfluenceEngine(model, device="cpu")
    s = torch.randn(engine.space.dim, generator=torch.Generator().manual_seed(2)) * 1e-2
    fast = engine.score_batch(x, y, s, n_train=12, method="jvp")
    slow = engine.score_batch(x, y, s, n_train=12, method="grad")
    print(f"\nresnet18 jvp vs grad relative error {rel_err(fast, slow):.2e}")
    assert rel_err(fast, slow) < 1e-5



def test_channels_last_layout_changes_speed_not_scores(monkeypatch):
    """layout.py runs conv models on channels-last batches, weights and tangents: the paper's JVP scores
    and self-influence must stay those of the NCHW float64 computation (float32 rounding only)."""
    from idtl_ray import layout
    from idtl_ray.models import build_model
    from idtl_ray.self_influence import fit_head_factors, self_influence_batch

    torch.manual_seed(0)
    model = build_model("sample-cnn", num_classes=10, in_channels=3, image_size=32).eval()
    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(48) % 10
    s64 = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(2),
                      dtype=torch.float64) * 1e-2
    factors = fit_head_factors(model, [(x, y)])

    def scores(channels_last: bool, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray, InfluenceEngine]:
        monkeypatch.setattr(layout, "CHANNELS_LAST", channels_last)
        net = copy.deepcopy(model).to(dtype)
        engine = InfluenceEngine(net, device="cpu")
        paper = engine.score_batch(x.to(dtype), y, s64.to(dtype), n_train=48).numpy()
        return paper, self_influence_batch(net, factors, x.to(dtype), y, 48), engine

    ref_paper, ref_self, _ = scores(False, torch.float64)
    nchw_paper, nchw_self, _ = scores(False, torch.float32)
    cl_paper, cl_self, engine = scores(True, torch.float32)
    # the layout was applied (else this test compares NCHW with itself) and the model left as it was
    assert engine.space.params["conv2.weight"].is_contiguous(memory_format=torch.channels_last)
    assert engine.space.unflatten(s64.float())["conv2.weight"].is_contiguous(memory_format=torch.channels_last)
    assert engine.model.conv2.weight.is_contiguous()
    assert engine.channels_last and layout.model_layout(x, True).is_contiguous(memory_format=torch.channels_last)
    assert layout.model_layout(x[0], True).is_contiguous() and layout.model_layout(y, True) is y
    print(f"\npaper vs float64: NCHW {rel_err(nchw_paper, ref_paper):.1e}, channels-last {rel_err(cl_paper, ref_paper):.1e}")
    assert rel_err(nchw_paper, ref_paper) < 1e-4 and rel_err(cl_paper, ref_paper) < 1e-4
    assert rel_err(cl_self, ref_self) < 1e-5 and rel_err(nchw_self, ref_self) < 1e-5


class ViewCNN(nn.Module):
    """A user's module that flattens with .view, which channels-last strides do not allow."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        h = F.relu(self.conv(x))
        return self.fc(h.view(h.size(0), -1))


@pytest.mark.parametrize("score", ["self", "paper"])
def test_a_users_module_that_flattens_with_view_is_scored_in_nchw(score):
    torch.manual_seed(0)
    model = ViewCNN()
    # three channels: with one, NCHW and channels-last strides coincide and nothing would fail
    train, val = (TensorDataset(d.tensors[0].repeat(1, 3, 1, 1), d.tensors[1])
                  for d in (digit_images(64, offset=600), digit_images(32, offset=900)))
    with pytest.raises(RuntimeError, match="view"):  # what channels-last would do to it
        model(train.tensors[0].contiguous(memory_format=torch.channels_last))
    assert not InfluenceEngine(model, device="cpu").channels_last
    cfg = InfluenceConfig(score=score, curvature_samples=32, max_iter=5, solver="cg", tol=1e-3)
    result = compute_influence(model, train, val, cfg, device="cpu")
    assert result.scores.shape == (64,) and np.isfinite(result.scores).all()


def test_exact_solver_keeps_its_batched_products_with_channels_last():
    """dense() builds (H + λI) column by column under vmap, where a layout change is not allowed: it
    must not fall back to one product per column (or fail) because the engine lays out tangents."""
    from idtl_ray.models import build_model

    torch.manual_seed(0)
    model = build_model("sample-cnn", num_classes=10, in_channels=1, image_size=8).double()
    data = digit_images(16, offset=600, dtype=torch.float64)
    engine = InfluenceEngine(model, params=["conv1"], device="cpu")  # a 4-D weight: its tangent is laid out
    assert engine.channels_last and engine.space.channels_last
    op = engine.curvature(data, "ggn", 0.1, samples=None, batch_size=16)
    calls, matvec = [], op.matvec
    op.matvec = lambda v: calls.append(1) or matvec(v)  # dense() calls it once per chunk of 256 columns under vmap
    dense = op.dense()
    op.matvec = matvec
    assert len(calls) <= -(-engine.space.dim // 256) < engine.space.dim  # not one product per column
    assert engine.space.channels_last  # the layout is back on after dense()
    eye = torch.eye(engine.space.dim, dtype=torch.float64)
    assert rel_err(dense, torch.stack([op.matvec(e) for e in eye])) < 1e-10

def test_dropping_negative_scores_removes_flipped_labels_and_lowers_val_loss():
    torch.manual_seed(0)
    train, val, flipped = digits(flip=0.2)
    model = fit(nn.Linear(64, 10).double(), *train.tensors)
    scores = score_samples(model, train, val, score="paper", solver="cg", damping=LAM, curvature_samples=None, tol=1e-8, max_iter=300, batch_size=4096).scores
    keep = keep_mask(scores)
    dropped = ~keep
    before = val_loss(model, val)
    x, y = train.tensors
    refit = fit(copy.deepcopy(model), x[torch.from_numpy(keep)], y[torch.from_numpy(keep)])
    after = val_loss(refit, val)
    rate_all, rate_dropped = flipped.mean(), flipped[dropped].mean()
    print(f"\ndropped {dropped.sum()} of {len(keep)}; flipped among dropped {rate_dropped:.2f} vs {rate_all:.2f} overall; "
          f"summed val loss {before:.2f} -> {after:.2f}")
    assert after < before
    assert rate_dropped >= 2 * rate_all


def test_class_targeted_reference_equals_filtered_validation_set(lr_setup):
    model, train, val = lr_setup
    classes = [3, 7]
    x, y = val.tensors
    sel = torch.isin(y, torch.tensor(classes))
    a = exact_scores(model, train, val, damping=LAM)
    targeted = compute_influence(model, train, val, InfluenceConfig(score="paper", solver="exact", damping=LAM, curvature_samples=None), classes=classes)
    filtered = compute_influence(model, train, TensorDataset(x[sel], y[sel]), InfluenceConfig(score="paper", solver="exact", damping=LAM, curvature_samples=None))
    assert targeted.n_val == int(sel.sum()) < len(val)
    assert rel_err(targeted.scores, filtered.scores) < 1e-12
    assert rel_err(targeted.scores, a.scores) > 1e-3  # the restriction really changes something


def test_restricting_parameters(lr_setup):
    model = trained_cnn(torch.float64)
    train, val = digit_images(64, offset=600, dtype=torch.float64), digit_images(32, offset=900, dtype=torch.float64)
    engine = InfluenceEngine(model, params=["fc"], device="cpu")
    assert engine.space.names == ["fc.weight", "fc.bias"]
    scores = score_samples(model, train, val, score="paper", params=["fc"], solver="exact", curvature_samples=None).scores
    assert scores.shape == (64,) and np.isfinite(scores).all()
    with pytest.raises(InputError, match="matches no trainable parameter"):
        InfluenceEngine(model, params=["nope"])
    # An int k selects the last k layers (conv/linear with their BatchNorms), see idtl_ray.models.layers.
    last1 = InfluenceEngine(model, params=1, device="cpu")
    assert last1.space.names == ["fc.weight", "fc.bias"]
    last2 = InfluenceEngine(model, params=2, device="cpu")
    assert last2.space.names == ["conv2.weight", "conv2.bias", "fc.weight", "fc.bias"]


# ── bad input ────────────────────────────────────────────────────────────────────────────────────


def test_empty_validation_set(lr_setup):
    model, train, _ = lr_setup
    empty = TensorDataset(torch.zeros(0, 64, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    with pytest.raises(InputError, match="validation set is empty.*pass a validation set"):
        score_samples(model, train, empty, score="paper")


def test_labels_outside_model_outputs(lr_setup):
    model, train, val = lr_setup
    x, y = val.tensors
    bad = TensorDataset(x, torch.where(y == 9, torch.tensor(12), y))
    with pytest.raises(InputError, match=r"label 12 is outside the model's 10 outputs.*head"):
        score_samples(model, train, bad, score="paper")
    bad_train = TensorDataset(train.tensors[0], -train.tensors[1] - 1)
    with pytest.raises(InputError, match="outside the model's 10 outputs"):
        score_samples(model, bad_train, val, score="paper")
    # self-influence too (a label of -1 indexed the last class; one past the end raised a raw IndexError)
    for bad_y in (torch.where(train.tensors[1] == 3, torch.tensor(-1), train.tensors[1]),
                  torch.where(train.tensors[1] == 3, torch.tensor(10), train.tensors[1])):
        with pytest.raises(InputError, match="outside the model's 10 outputs"):
            score_samples(model, TensorDataset(train.tensors[0], bad_y))


def test_the_exact_reference_sums_in_float64_for_a_float32_model():
    """The dense matrix of solver='exact' is built in float64 columns (its products run in float32)."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    data = TensorDataset(torch.randn(40, 6), torch.arange(40) % 3)
    op = InfluenceEngine(model, device="cpu").curvature(data, "ggn", 0.1, None, 0, 16)
    dense = op.dense()
    assert dense.dtype == torch.float64
    e = torch.zeros(dense.shape[0], dtype=torch.float64)
    e[4] = 1.0
    assert torch.allclose(dense[:, 4], op.matvec(e), rtol=1e-5, atol=1e-9)  # float32 products, batched by vmap


def test_options_of_the_papers_score_are_refused_with_self_influence(lr_setup):
    """They would be silently ignored; head_params is self-influence's own option and reaches the config."""
    model, train, val = lr_setup
    with pytest.raises(InputError, match="classes picks the validation samples of score='paper'"):
        score_samples(model, train, val, classes=[3])
    with pytest.raises(InputError, match="method='grad' chooses how score='paper'"):
        score_samples(model, train, method="grad")
    bias, head = score_samples(model, train), score_samples(model, train, head_params="head")
    ref = compute_influence(model, train, None, InfluenceConfig(head_params="head"))
    assert np.array_equal(head.scores, ref.scores) and not np.allclose(head.scores, bias.scores)
    assert head.n_params > bias.n_params


def test_lissa_reports_a_slow_blow_up_and_stops_on_its_residual(lr_setup):
    """A scale a little below the top eigenvalue grows |1 - λmax/scale| = 1.5x per step: far from the 1e8 bound
    after 30 steps, yet the scores were garbage (residual 7e4) with only a warning. And one batch stops when its
    step, which is the residual, is below tol (it stopped at tol*1e-2 of |h|, short of tol, unconverged)."""
    model, train, val = lr_setup
    engine = InfluenceEngine(model, device="cpu")
    g, _ = engine.validation_gradient(val)
    op = engine.curvature(train, "ggn", 0.01, samples=None, batch_size=4096)
    top = float(torch.linalg.eigvalsh(op.dense().double()).max())
    with pytest.raises(SolverDivergedError, match=r"lissa solver diverged .*relative residual .* > 1.*raise lissa_scale"):
        solve(op, g, InfluenceConfig(score="paper", solver="lissa", damping=0.01, max_iter=30, lissa_scale=top / 2.5))
    _, info = solve(op, g, InfluenceConfig(score="paper", solver="lissa", damping=0.01, tol=1e-2, max_iter=20000,
                                           lissa_scale=2 * top))
    assert info.converged and info.relative_residual < 1e-2, info


def test_exact_solve_of_a_singular_curvature_says_raise_the_damping(lr_setup):
    model, train, val = lr_setup
    with pytest.raises(SolverDivergedError, match="exact solver diverged.*singular: increase the damping"):
        score_samples(model, train, val, score="paper", solver="exact", damping=0.0, curvature_samples=None)


def test_model_without_trainable_parameters(lr_setup):
    model, train, val = lr_setup
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(InputError, match="no trainable parameters.*requires_grad"):
        score_samples(frozen, train, val, score="paper")


def test_divergent_solver_raises_and_never_returns_nan(lr_setup):
    model, train, val = lr_setup
    # LiSSA with a scale below the largest eigenvalue blows up geometrically.
    with pytest.raises(SolverDivergedError, match="lissa solver diverged.*raise lissa_scale"):
        score_samples(model, train, val, score="paper", solver="lissa", lissa_scale=1e-3, max_iter=500, curvature_samples=None)
    # CG on an indefinite matrix (a negative shift stands in for the true Hessian of a non-convex net).
    with pytest.raises(SolverDivergedError, match="cg solver diverged.*negative curvature.*curvature='ggn'"):
        _cg_on_indefinite(model, train, val)
    assert issubclass(SolverDivergedError, IdtlError)


def _cg_on_indefinite(model, train, val):
    engine = InfluenceEngine(model, device="cpu")
    g, _ = engine.validation_gradient(val)
    op = engine.curvature(train, "exact", damping=0.0, samples=None, batch_size=4096)
    op.damping = -1.0  # shifts every eigenvalue below zero: the matrix is negative definite
    solve(op, g, InfluenceConfig(score="paper", solver="cg"))


def test_bad_config_values():
    with pytest.raises(InputError, match="unknown solver"):
        InfluenceConfig(score="paper", solver="newton")
    with pytest.raises(InputError, match="damping"):
        InfluenceConfig(score="paper", damping=float("nan"))


def test_keep_mask_rule():
    s = np.array([0.3, -0.2, -0.5, 0.0, -0.1])
    assert keep_mask(s).tolist() == [True, False, False, True, False]
    assert keep_mask(s, max_drop=2).tolist() == [True, False, False, True, True]
    assert keep_mask(s, max_drop=0.2).tolist() == [True, True, False, True, True]
    assert keep_mask(s, threshold=-0.15).tolist() == [True, False, False, True, True]
    with pytest.raises(InputError, match="NaN"):
        keep_mask(np.array([np.nan]))
