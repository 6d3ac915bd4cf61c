"""Heads and losses against independent references: ridge / the closed form vs numpy's least squares
(with castlora's *relative* penalty), reduced-rank fits, the delta teacher and the KL / MSE terms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from castlora.cast_module import PortedKernel
from castlora.closed_form import RIDGE_GRID, Fit
from castlora.heads import LinearHead, MLPHead, make_head, reduced_rank_fit, ridge, ridge_from_stats
from castlora.losses import delta_teacher, kl_divergence, relative_mse, shared_log_probs, topk_kl


def _data(n=200, dx=7, dy=5, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dx)) * scale + rng.normal(size=(1, dx))
    W = rng.normal(size=(dy, dx))
    Y = X @ W.T + 0.1 * rng.normal(size=(n, dy))
    return X, Y


def _np_ridge_lstsq(X, Y, lam):
    """Independent reference: least squares on the augmented system [X; sqrt(reg) I] W^T = [Y; 0]."""
    reg = lam * np.mean(np.diag(X.T @ X))
    d = X.shape[1]
    Xa = np.vstack([X, np.sqrt(reg) * np.eye(d)])
    Ya = np.vstack([Y, np.zeros((d, Y.shape[1]))])
    Wt, *_ = np.linalg.lstsq(Xa, Ya, rcond=None)
    return Wt.T


@pytest.mark.parametrize("lam", [0.0, 1e-3, 0.1, 2.0])
def test_ridge_matches_numpy_lstsq_with_relative_penalty(lam):
    X, Y = _data()
    W = ridge(torch.tensor(X), torch.tensor(Y), lam).numpy()
    ref = _np_ridge_lstsq(X, Y, lam)
    assert W.shape == (Y.shape[1], X.shape[1])
    np.testing.assert_allclose(W, ref, rtol=1e-8, atol=1e-10)


def test_ridge_penalty_is_relative_to_feature_scale():
    """Scaling X by c scales the solution by 1/c (an absolute penalty would not)."""
    X, Y = _data()
    lam = 0.5
    W1 = ridge(torch.tensor(X), torch.tensor(Y), lam).numpy()
    W2 = ridge(torch.tensor(10 * X), torch.tensor(Y), lam).numpy()
    np.testing.assert_allclose(W2 * 10, W1, rtol=1e-8)
    # and the penalty really is active: it differs from plain least squares
    assert not np.allclose(W1, _np_ridge_lstsq(X, Y, 0.0), rtol=1e-3)


@pytest.mark.parametrize("lam", [1e-2, 1.0])
def test_closed_form_solve_matches_numpy(lam):
    """heads.ridge_from_stats (the closed form's solve) takes Gram statistics (X^T X, X^T Y), accumulated
    batch by batch."""
    X, Y = _data(n=300, dx=6, dy=4, seed=1)
    G = X.T @ X
    C = X.T @ Y
    W = ridge_from_stats(torch.tensor(G), torch.tensor(C), lam).numpy()
    reg = lam * np.mean(np.diag(G))
    ref = np.linalg.solve(G + reg * np.eye(G.shape[0]), C).T
    np.testing.assert_allclose(W, ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(W, _np_ridge_lstsq(X, Y, lam), rtol=1e-7, atol=1e-10)
    # accumulating the statistics in two halves gives the same solution
    G2 = X[:150].T @ X[:150] + X[150:].T @ X[150:]
    C2 = X[:150].T @ Y[:150] + X[150:].T @ Y[150:]
    np.testing.assert_allclose(ridge_from_stats(torch.tensor(G2), torch.tensor(C2), lam).numpy(), ref, rtol=1e-8)


def test_reduced_rank_fit_recovers_exact_low_rank_map():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 10, generator=g, dtype=torch.float64)
    A0 = torch.randn(3, 10, generator=g, dtype=torch.float64)
    B0 = torch.randn(8, 3, generator=g, dtype=torch.float64)
    D = X @ A0.t() @ B0.t()
    A, B, err = reduced_rank_fit(X, D, rank=3, lam=0.0)
    assert A.shape == (3, 10) and B.shape == (8, 3)
    assert err < 1e-10
    torch.testing.assert_close((B.double() @ A.double()), B0 @ A0, rtol=1e-4, atol=1e-4)


def test_reduced_rank_fit_reports_error_for_full_rank_map():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(400, 10, generator=g, dtype=torch.float64)
    M = torch.randn(8, 10, generator=g, dtype=torch.float64)
    D = X @ M.t()
    _, _, err_full = reduced_rank_fit(X, D, rank=8, lam=0.0)
    _, _, err2 = reduced_rank_fit(X, D, rank=2, lam=0.0)
    _, _, err5 = reduced_rank_fit(X, D, rank=5, lam=0.0)
    assert err_full < 1e-10
    assert err2 > err5 > 1e-3
    assert err2 < 1.0


def test_heads_shapes_and_mlp_starts_linear():
    x = torch.randn(4, 6)
    lin = make_head("linear", 6, 3)
    mlp = make_head("mlp", 6, 3)
    assert isinstance(lin, LinearHead) and isinstance(mlp, MLPHead)
    with torch.no_grad():
        w = torch.randn(3, 6)
        lin.linear_part().copy_(w)
        mlp.linear_part().copy_(w)
    torch.testing.assert_close(lin(x), x @ w.t())
    torch.testing.assert_close(mlp(x), lin(x))  # W2 starts at zero
    with pytest.raises(ValueError, match="unknown head type"):
        make_head("conv", 6, 3)


def test_ported_kernel_identity_reproduces_source_delta():
    from castlora.adapters import LoraKernel
    from castlora.families import Site

    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g)
    k = LoraKernel(0, "q", "m.q", A, B, 0.5)
    site = Site(0, "q", "m.q", 12, 10, 10, None, False)
    port = PortedKernel(k, site)
    x = torch.randn(5, 12, generator=g)
    torch.testing.assert_close(port.source_delta(x), x @ k.delta_weight().t(), rtol=1e-4, atol=1e-4)
    port.set_identity()
    torch.testing.assert_close(port(x), x @ k.delta_weight().t(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- losses


def _logp(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.log_softmax(torch.randn(*shape, generator=g) * 2, dim=-1)


def test_delta_teacher_with_no_lora_effect_is_the_target():
    lp_t = _logp((6, 11), 0)
    lp_s = _logp((6, 11), 1)
    teacher = delta_teacher(lp_t, lp_s, lp_s.clone())
    torch.testing.assert_close(teacher, lp_t, rtol=1e-6, atol=1e-6)
    kl = kl_divergence(teacher, lp_t)
    assert abs(kl.item()) < 1e-6


def test_delta_teacher_tilts_by_the_lora_effect():
    lp_t, lp_s, lp_sl = _logp((6, 11), 0), _logp((6, 11), 1), _logp((6, 11), 2)
    teacher = delta_teacher(lp_t, lp_sl, lp_s)
    ref = torch.log_softmax(lp_t + lp_sl - lp_s, -1)
    torch.testing.assert_close(teacher, ref)
    torch.testing.assert_close(teacher.exp().sum(-1), torch.ones(6))  # renormalised
    # same source model on both sides: the delta teacher equals the source+LoRA teacher
    torch.testing.assert_close(delta_teacher(lp_s, lp_sl, lp_s), lp_sl, rtol=1e-5, atol=1e-5)
    assert kl_divergence(teacher, lp_t).item() > 1e-3


def test_delta_weight_interpolates_between_source_and_delta_teachers():
    lp_t, lp_s, lp_sl = _logp((6, 11), 0), _logp((6, 11), 1), _logp((6, 11), 2)
    torch.testing.assert_close(delta_teacher(lp_t, lp_sl, lp_s, weight=0.0), lp_sl)  # the source teacher
    half = delta_teacher(lp_t, lp_sl, lp_s, weight=0.5)
    torch.testing.assert_close(half, torch.log_softmax(lp_sl + 0.5 * (lp_t - lp_s), -1))
    torch.testing.assert_close(half.exp().sum(-1), torch.ones(6))
    # halfway in log space: the midpoint's KL to either end is below the KL between the ends
    ends = kl_divergence(delta_teacher(lp_t, lp_sl, lp_s), lp_sl).item()
    assert 0 < kl_divergence(half, lp_sl).item() < ends


def test_delta_weight_per_position_is_each_row_at_its_own_weight():
    lp_t, lp_s, lp_sl = _logp((3, 11), 0), _logp((3, 11), 1), _logp((3, 11), 2)
    w = torch.tensor([[0.0], [0.5], [1.0]])
    rows = delta_teacher(lp_t, lp_sl, lp_s, w)
    for i, wi in enumerate((0.0, 0.5, 1.0)):
        torch.testing.assert_close(rows[i], delta_teacher(lp_t[i], lp_sl[i], lp_s[i], wi))


def test_kl_divergence_zero_for_identical_and_positive_otherwise():
    p, q = _logp((7, 13), 0), _logp((7, 13), 1)
    assert abs(kl_divergence(p, p).item()) < 1e-7
    kl = kl_divergence(p, q)
    assert kl.item() > 0
    ref = F.kl_div(q, p, reduction="none", log_target=True).sum(-1).mean()
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-6)
    # temperature factor tau^2
    torch.testing.assert_close(kl_divergence(p, q, tau=2.0), 4 * ref, rtol=1e-5, atol=1e-6)
    # KL is not symmetric; check the direction is KL(teacher || student)
    assert not torch.isclose(kl_divergence(q, p), kl, rtol=1e-3)
    # empty position set: zero, and still differentiable
    s = q[:0].clone().requires_grad_(True)
    e = kl_divergence(p[:0], s)
    assert e.item() == 0.0 and e.requires_grad


def test_position_weights_make_a_weighted_mean_of_the_per_position_kl():
    p, q = _logp((6, 11), 4), _logp((6, 11), 5)
    per_pos = F.kl_div(q, p, reduction="none", log_target=True).sum(-1)
    w = torch.tensor([0.0, 1.0, 2.0, 0.0, 3.0, 0.5])
    torch.testing.assert_close(kl_divergence(p, q, weight=w), (per_pos * w).sum() / w.sum(), rtol=1e-5, atol=1e-6)
    # equal weights are the plain mean; the top-k form weighs its positions the same way
    torch.testing.assert_close(kl_divergence(p, q, weight=torch.full((6,), 3.0)), kl_divergence(p, q))
    torch.testing.assert_close(topk_kl(*p.topk(11, -1), q, weight=w), kl_divergence(p, q, weight=w),
                               rtol=1e-4, atol=1e-5)


def test_kl_gradient_matches_torch_kl_div():
    p = _logp((5, 9), 3)
    logits = torch.randn(5, 9, requires_grad=True)
    kl = kl_divergence(p, F.log_softmax(logits, -1))
    (g1,) = torch.autograd.grad(kl, logits)
    ref = F.kl_div(F.log_softmax(logits, -1), p, reduction="batchmean", log_target=True)
    (g2,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


def test_shared_log_probs_restricts_and_renormalises():
    logits = torch.randn(3, 20)
    ids = torch.tensor([0, 4, 7, 19])
    lp = shared_log_probs(logits, ids, tau=2.0)
    assert lp.shape == (3, 4)
    torch.testing.assert_close(lp, F.log_softmax(logits[:, ids] / 2.0, -1))
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3))


def test_relative_mse():
    t = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert relative_mse(t, t).item() == 0.0
    p = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    assert relative_mse(p, t).item() == pytest.approx(1.0 / 25.0)
    assert relative_mse(torch.zeros_like(t), t).item() == pytest.approx(1.0)
    # relative: scale invariant
    assert relative_mse(10 * p, 10 * t).item() == pytest.approx(1.0 / 25.0)
    # a zero target does not divide by zero
    assert torch.isfinite(relative_mse(p, torch.zeros_like(t)))


def test_cross_validated_ridge_error_matches_a_direct_held_out_evaluation():
    rng = np.random.default_rng(3)
    X = [rng.normal(size=(200, 6)) for _ in range(2)]
    W = rng.normal(size=(4, 6))
    Y = [x @ W.T + 0.5 * rng.normal(size=(200, 4)) for x in X]
    fit = Fit()
    for k in (0, 1):
        fit.update(k, torch.tensor(X[k]), torch.tensor(Y[k]))
    lam = 1e-2
    direct = 0.0
    for a, b in ((0, 1), (1, 0)):
        P = ridge_from_stats(torch.tensor(X[a].T @ X[a]), torch.tensor(X[a].T @ Y[a]), lam).numpy()
        direct += ((Y[b] - X[b] @ P.T) ** 2).sum()
    direct /= sum((y ** 2).sum() for y in Y)
    assert abs(fit.held_out_error(lam) - direct) < 1e-9
    # noiseless and well-posed: the smallest penalty wins and the fit is exact
    exact = Fit()
    for k in (0, 1):
        exact.update(k, torch.tensor(X[k]), torch.tensor(X[k] @ W.T))
    P, chosen, cv = exact.solve(None)
    assert chosen == RIDGE_GRID[0] and cv < 1e-8
    np.testing.assert_allclose(P.numpy(), W, atol=1e-5)
    # pure noise: a large penalty wins (predicting ~0 beats fitting noise)
    noise = Fit()
    for k in (0, 1):
        noise.update(k, torch.tensor(X[k][:20]), torch.tensor(rng.normal(size=(20, 4))))
    assert noise.solve(None)[1] >= 1e-1


# ---------------------------------------------------------------- the lr back-off


def test_back_off_halves_the_lr_when_the_kl_climbs_and_not_on_noise():
    from castlora.train import replay_back_off as _watch

    falling = [3.0, 2.5, 2.0, 1.8, 1.6, 1.5, 1.4, 1.3, 1.25, 1.2]
    noisy = [x * (1.15 if i % 2 else 0.85) for i, x in enumerate(falling * 3)]  # +-15% batch to batch
    assert _watch(noisy, 0.25) == ([], 1.0)
    climbing = falling + [2.0, 4.0, 8.0, 16.0, 32.0, 32.0]
    offs, scale = _watch(climbing, 0.25)
    # within three steps of the climb, then again while it goes on; each halves the lr
    assert offs and len(falling) <= offs[0] <= len(falling) + 2 and scale == 0.5 ** len(offs)
    assert _watch(climbing, 0.0) == ([], 1.0)  # off
    # from the first step: a climb during warmup counts too
    assert _watch([1.0, 5.0, 9.0], 0.25)[0] == [1, 2]
