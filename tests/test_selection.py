"""The default score (self-influence), the drop rules, the solve report and custom losses (issue 10).

Fast paths against slow exact ones, and a selection against the baselines on data with known flips;
no Ray here (the Ray path of the same scores is in test_scoring.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import grad, vmap
from torch.utils.data import TensorDataset

from idtl_ray import score_samples
from idtl_ray.budget import pick
from idtl_ray.config import ScoreConfig
from idtl_ray.errors import InputError, SolverDivergedError
from idtl_ray.influence import InfluenceConfig, InfluenceResult, curvature_subsample, solve_cg
from idtl_ray.self_influence import fit_head_factors, self_influence_batch
from idtl_ray.selection import budget_count, harm_of, keep_least_harmful, keep_mask


@pytest.fixture(scope="module")
def noisy_digits():
    """Digits on raw pixels, 20% of the training labels flipped (seeded), and a probe fitted on them."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    rng = np.random.default_rng(0)
    flip = rng.choice(len(y), size=len(y) // 5, replace=False)
    noisy = y.clone()
    noisy[flip] = (noisy[flip] + torch.as_tensor(rng.integers(1, 10, size=len(flip)))) % 10
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):  # a few epochs, not to memorisation
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), noisy).backward()
        opt.step()
    flipped = np.zeros(len(y), bool)
    flipped[flip] = True
    return model, x, noisy, flipped


def _exact_self_influence(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rel_damping: float, bias_only: bool) -> np.ndarray:
    """Per-sample gradients by vmap(grad) and the dense Gauss-Newton matrix of the head: the slow reference."""
    head = model[-1]
    names = ["bias"] if bias_only else ["weight", "bias"]
    params = {n: getattr(head, n).detach().double() for n in names}
    feats = model[:-1](x).detach().double()

    def logits(p, f):
        w = p.get("weight", head.weight.detach().double())
        return f @ w.T + p["bias"]

    def loss(p, f, t):
        return nn.functional.cross_entropy(logits(p, f[None]), t[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, feats, y)
    g = torch.cat([g[n].reshape(len(y), -1) for n in names], 1)
    # GGN of the mean loss: E[Jᵀ (diag p - p pᵀ) J], J the Jacobian of the logits w.r.t. the head parameters
    jac = vmap(torch.func.jacrev(lambda p, f: logits(p, f[None])[0]), in_dims=(None, 0))(params, feats)
    j = torch.cat([jac[n].reshape(len(y), 10, -1) for n in names], 2)
    p = torch.softmax(logits(params, feats), 1)
    h_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    ggn = torch.einsum("nki,nkl,nlj->ij", j, h_out, j) / len(y)
    lam = rel_damping * float(torch.linalg.eigvalsh(ggn).mean())
    inv = torch.linalg.inv(ggn + lam * torch.eye(len(ggn), dtype=ggn.dtype))
    return (torch.einsum("ni,ij,nj->n", g, inv, g) / len(y)).numpy()


def test_bias_self_influence_equals_the_exact_dense_computation(noisy_digits):
    model, x, y, _ = noisy_digits
    fac = fit_head_factors(model, [(x, y)], damping=0.1, params="bias")
    fast = self_influence_batch(model, fac, x, y, len(y))
    exact = _exact_self_influence(model, x, y, 0.1, bias_only=True)
    assert np.allclose(fast, exact, rtol=1e-5, atol=0), np.abs(fast - exact).max()  # fp32 logits


def test_head_ekfac_self_influence_ranks_like_the_exact_dense_inverse(noisy_digits):
    from scipy.stats import spearmanr

    model, x, y, _ = noisy_digits
    fac = fit_head_factors(model, [(x[i:i + 500], y[i:i + 500]) for i in range(0, len(y), 500)], 0.1, params="head")
    fast = self_influence_batch(model, fac, x, y, len(y))
    exact = _exact_self_influence(model, x, y, 0.1, bias_only=False)
    rho = spearmanr(fast, exact).statistic
    print(f"\nEK-FAC head self-influence against the dense inverse: Spearman {rho:.3f}")
    assert rho > 0.9


def test_default_score_finds_flipped_labels_better_than_random_and_the_paper_score(noisy_digits):
    model, x, y, flipped = noisy_digits
    data = TensorDataset(x, y)
    val = TensorDataset(x[:200], y[:200])
    k = len(y) // 5
    result = score_samples(model, data)
    precision = {"self": flipped[~keep_least_harmful(result.harm, k)].mean()}
    paper = score_samples(model, data, val, score="paper", curvature_samples=None)
    precision["paper"] = flipped[~keep_least_harmful(paper.harm, k)].mean()
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(x), y, reduction="none").numpy()
    precision["loss"] = flipped[~keep_least_harmful(loss, k)].mean()
    print(f"\nprecision of flipped labels at 20%: {precision}")
    assert precision["self"] >= 0.85
    assert precision["self"] > precision["paper"] + 0.1
    assert precision["self"] >= precision["loss"] - 0.05


def test_score_samples_returns_the_scores_with_their_solve_report(noisy_digits):
    model, x, y, _ = noisy_digits
    r = score_samples(model, TensorDataset(x[:300], y[:300]), TensorDataset(x[300:400], y[300:400]), score="paper",
                      max_iter=2, tol=1e-12)
    assert isinstance(r, InfluenceResult) and r.score == "paper"
    assert r.solve.iterations == 2 and not r.solve.converged and r.solve.relative_residual > 0
    assert np.array_equal(np.asarray(r), r.scores) and len(r) == 300
    assert np.array_equal(r.harm, -r.scores)


def test_a_per_sample_loss_function_is_accepted(noisy_digits):
    model, x, y, _ = noisy_digits
    train, val = TensorDataset(x[:200], y[:200]), TensorDataset(x[200:260], y[200:260])
    cfg = dict(score="paper", solver="exact", curvature_samples=None)

    def ce(logits, t):
        return nn.functional.cross_entropy(logits, t, reduction="none")

    # the generic path (the loss's own Hessian through autograd) equals the closed-form cross-entropy path
    custom = score_samples(model, train, val, loss_fn=ce, **cfg).scores
    builtin = score_samples(model, train, val, **cfg).scores
    assert np.allclose(custom, builtin, rtol=1e-4, atol=1e-9)
    assert np.allclose(score_samples(model, train, loss_fn=ce).scores, score_samples(model, train).scores, rtol=1e-6)

    # a regression loss with float targets: JVP scores equal the per-sample-gradient reference
    reg = nn.Linear(64, 1)
    targets = x[:200].sum(1, keepdim=True)

    def mse(out, t):
        return ((out - t) ** 2).sum(1)

    rtrain, rval = TensorDataset(x[:200], targets), TensorDataset(x[200:260], x[200:260].sum(1, keepdim=True))
    a = score_samples(reg, rtrain, rval, loss_fn=mse, score="paper", solver="exact", curvature_samples=None)
    b = score_samples(reg, rtrain, rval, loss_fn=mse, score="paper", solver="exact", curvature_samples=None, method="grad")
    assert np.allclose(a.scores, b.scores, rtol=1e-4, atol=1e-8)


def test_self_influence_of_a_non_convex_loss_stays_non_negative():
    """Brier on softmax has an indefinite output Hessian: the re-fitted eigenvalues went negative and, with a small
    damping, lam + λ crossed zero (scores down to -3.4 where they are ~1e-7). They are clamped at zero."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.tensor(d.data / 16.0), torch.tensor(d.target)
    y[:240] = (y[:240] + 3) % 10  # confidently wrong samples: where the Brier loss is concave
    torch.manual_seed(0)
    model = nn.Linear(64, 10).double()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + 1e-3 / 2 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)

    def brier(z, t):
        return ((torch.softmax(z, -1) - (torch.arange(z.shape[-1]) == t[:, None]).to(z.dtype)) ** 2).sum(-1)

    factors = fit_head_factors(model, [(x[:1200], y[:1200])], 1e-5, loss_fn=brier, params="head")
    scores = self_influence_batch(model, factors, x[:1200], y[:1200], 1200, loss_fn=brier)
    assert np.isfinite(scores).all() and (scores >= 0).all(), scores.min()


class _OutputFirst(nn.Module):
    """The output layer registered before the hidden one: the last nn.Linear in module order is not the head."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(32, 10)
        self.hidden = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


@pytest.mark.parametrize("head_params", ["bias", "head"])
def test_self_influence_refuses_a_head_that_does_not_produce_the_output(noisy_digits, head_params):
    """It paired the hidden layer's inputs with the logits' gradient: scores 31% off, without a word."""
    _, x, y, _ = noisy_digits
    torch.manual_seed(0)
    model, train = _OutputFirst(), TensorDataset(x[:100], y[:100])
    with pytest.raises(InputError, match=r"Linear\(64, 32\) as the head .*set model.head_name"):
        score_samples(model, train, head_params=head_params)
    model.head_name = "out"  # what the message says to do: then it scores as the same net registered in order
    named = score_samples(model, train, head_params=head_params).scores
    ordered = nn.Sequential(model.hidden, nn.ReLU(), model.out)
    assert np.allclose(named, score_samples(ordered, train, head_params=head_params).scores, rtol=1e-6)


@pytest.mark.parametrize("method", ["jvp", "grad"])
@pytest.mark.parametrize("reduce", ["mean", "keepdim"])
def test_a_loss_that_is_not_per_sample_is_refused_before_the_solve(noisy_digits, method, reduce):
    """A mean divided g_val and the curvature by the batch size (grad: wrong scores without a word; jvp: a
    traceback after the solve); a (B, 1) loss gave 2-D scores."""
    model, x, y, _ = noisy_digits
    train, val = TensorDataset(x[:100], y[:100]), TensorDataset(x[100:130], y[100:130])

    def loss(logits, t):
        per = nn.functional.cross_entropy(logits, t, reduction="none")
        return per.mean() if reduce == "mean" else per[:, None]

    with pytest.raises(InputError, match=r"loss_fn returned shape \(.*\) for a batch of \d+: .*one loss per sample"):
        score_samples(model, train, val, loss_fn=loss, score="paper", method=method, curvature_samples=None)


class _Diagonal:
    """An SPD operator whose CG residual rises before it falls (spread-out eigenvalues)."""

    kind = "ggn"

    def __init__(self, eig: torch.Tensor):
        self.eig = eig

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.eig * v


def test_cg_survives_a_non_monotone_residual():
    eig = torch.logspace(-3, 3, 200, dtype=torch.float64)
    g = torch.ones(200, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="stopped at relative residual"):
        x, info = solve_cg(_Diagonal(eig), g, max_iter=40, tol=1e-12)
    # plain CG on the same system: its residual goes above 1 on the way (the old rule called that
    # divergence and returned nothing), while the energy-norm error falls at every step
    rel, energy = [], []
    r, p, xx = g.clone(), g.clone(), torch.zeros_like(g)
    exact = g / eig
    for _ in range(40):
        ap = eig * p
        a = float(r @ r) / float(p @ ap)
        xx, r_new = xx + a * p, r - a * ap
        rel.append(float(r_new.norm() / g.norm()))
        energy.append(float(((xx - exact) ** 2 * eig).sum()))
        p, r = r_new + float(r_new @ r_new) / float(r @ r) * p, r_new
    assert max(rel) > 1.0 and all(b <= a for a, b in zip(energy, energy[1:]))
    assert torch.allclose(x, xx) and info.relative_residual == pytest.approx(rel[-1], rel=1e-9)
    assert info.iterations == 40 and not info.converged


def test_cg_stops_on_real_divergence():
    nan_op = _Diagonal(torch.full((5,), float("nan"), dtype=torch.float64))
    with pytest.raises(SolverDivergedError, match="non-finite"):
        solve_cg(nan_op, torch.ones(5, dtype=torch.float64))


def test_one_budget_meaning_everywhere():
    assert budget_count(1, 100) == budget_count(1.0, 100) == 1
    assert budget_count(0.25, 100) == 25 and budget_count(0, 100) == 0 and budget_count(500, 100) == 100
    # the fraction as written, not its float product: 0.29 * 100 == 28.999999999999996
    assert [budget_count(0.29, 100), budget_count(0.57, 100), budget_count(0.35, 45000)] == [29, 57, 15750]
    assert budget_count(1 / 3, 10) == 3 and budget_count(0.999, 10) == 9
    with pytest.raises(InputError, match="whole number"):
        budget_count(1.5, 100)
    with pytest.raises(InputError, match=">= 0"):
        budget_count(-0.1, 100)
    s = np.array([0.5, -0.2, -0.3, 0.1, -0.1])
    assert keep_mask(s, max_drop=1.0).tolist() == [True, True, False, True, True]
    assert keep_least_harmful(harm_of(s, "paper"), budget_count(1.0, 5)).tolist() == [True, True, False, True, True]
    assert keep_least_harmful(harm_of(s, "self"), 2).tolist() == [False, True, True, False, True]


def test_a_count_budget_that_drops_everything_is_refused_before_scoring_but_a_paper_cap_is_not():
    from idtl_ray.workflow import _check_budgets_fit

    with pytest.raises(InputError, match="--drop-budget 5000 would drop all 4000"):
        _check_budgets_fit(ScoreConfig(drop="budget", drop_budget=5000), 4000)
    with pytest.raises(InputError, match="--auto-budget 4000 would drop all 4000"):
        _check_budgets_fit(ScoreConfig(drop="auto", auto_budgets=[0.0, 4000]), 4000)
    # under --drop paper the budget caps the paper's rule; a cap above n is no cap (as keep_mask reads it)
    _check_budgets_fit(ScoreConfig(drop="paper", drop_budget=5000, influence=InfluenceConfig(score="paper")), 4000)
    assert keep_mask(np.array([-1.0, 1.0, -2.0, 3.0]), 0.0, 5000).tolist() == [False, True, False, True]
    _check_budgets_fit(ScoreConfig(drop="budget", drop_budget=3999), 4000)


def test_choose_budget_checks_the_harm_before_any_trial(monkeypatch):
    """A NaN or a wrong length fails in one line before Ray Tune, not as 'every trial failed'."""
    import ray.tune

    from idtl_ray.budget import choose_budget

    monkeypatch.setattr(ray.tune, "Tuner", lambda *a, **k: pytest.fail("Ray Tune started"))
    x, y = np.zeros((6, 1, 4, 4), np.float32), np.arange(6) % 2
    args = (nn.Linear(16, 2), x, y)
    with pytest.raises(InputError, match="scores contain NaN"):
        choose_budget(*args, np.array([0, 1, np.nan, 3, 4, 5.0]), x, y, 0.0, 1.0)
    with pytest.raises(InputError, match="harm has 5 entries for 6 training samples"):
        choose_budget(*args, np.arange(5.0), x, y, 0.0, 1.0)


def test_score_config_seed_seeds_the_curvature_subsample():
    a, b = ScoreConfig(seed=0), ScoreConfig(seed=1)
    assert (a.influence.seed, b.influence.seed) == (0, 1)
    assert not np.array_equal(curvature_subsample(5000, 512, a.influence.seed),
                              curvature_subsample(5000, 512, b.influence.seed))
    assert ScoreConfig(seed=3, influence=InfluenceConfig(seed=3)).influence.seed == 3
    with pytest.raises(InputError, match="two seeds"):
        ScoreConfig(seed=1, influence=InfluenceConfig(seed=2))


def test_score_config_checks_the_drop_rule_before_any_work():
    with pytest.raises(InputError, match="--score paper"):
        ScoreConfig(drop="paper")
    with pytest.raises(InputError, match="unknown drop rule"):
        ScoreConfig(drop="sometimes")
    with pytest.raises(InputError, match="whole number"):
        ScoreConfig(drop="budget", drop_budget=2.5)
    assert ScoreConfig(drop="paper", influence=InfluenceConfig(score="paper")).drop == "paper"


def test_auto_budget_takes_the_smallest_within_one_paired_standard_error():
    n = 400
    base = np.zeros(n, bool)
    base[:280] = True                                    # k=0: 70% right
    better = base.copy()
    better[280:320] = True                               # k=20: right on 40 more samples
    close = better.copy()
    close[280:285] = False                               # k=40: 5 fewer than k=20: 5 > sqrt(5), worse
    nearly = better.copy()
    nearly[280] = False                                  # k=10: 1 fewer than k=20: 1 <= sqrt(1), a tie
    c = {0: base, 10: nearly, 20: better, 40: close}
    trials = [{"k": k, "val_error": 1 - v.mean()} for k, v in c.items()]
    assert pick(trials, c)["k"] == 10
    # a clean target: every budget differs from k=0 by a couple of samples either way -> keep everything
    rng = np.random.default_rng(0)
    c = {0: rng.random(n) < 0.9}
    for k in (10, 20):
        v = c[0].copy()
        v[rng.choice(n, 3, replace=False)] ^= True
        c[k] = v
    trials = [{"k": k, "val_error": 1 - v.mean()} for k, v in c.items()]
    assert pick(trials, c)["k"] == 0
    with pytest.raises(InputError, match="every auto-budget trial failed"):
        pick([{"k": 0, "val_error": None}], {})
