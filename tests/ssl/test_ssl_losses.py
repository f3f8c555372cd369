"""Loss values against independent computations (numpy, written from the equations)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jwth.loss import DINOLoss, GramLoss, IBOTPatchLoss, KoLeoLoss, sinkhorn_knopp


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_dino_loss_matches_formula():
    rng = np.random.default_rng(0)
    b, k, tau_s, tau_t = 3, 5, 0.1, 0.04
    t_scores = [rng.normal(size=(b, k)) for _ in range(2)]
    s_scores = [rng.normal(size=(b, k)) for _ in range(3)]  # 2 global + 1 local
    center = rng.normal(size=(1, k)) * 0.1
    loss = DINOLoss(k, student_temp=tau_s)
    loss.center.copy_(torch.tensor(center, dtype=torch.float32))
    p_t = [loss.teacher_probs(torch.tensor(t, dtype=torch.float32), tau_t) for t in t_scores]
    got = loss([torch.tensor(s, dtype=torch.float32) for s in s_scores], p_t, n_global=2).item()
    # by hand: pairs (t0,s1), (t1,s0), (t0,s2), (t1,s2)
    pt = [np_softmax((t - center) / tau_t) for t in t_scores]
    ls = [np.log(np_softmax(s / tau_s)) for s in s_scores]
    terms = []
    for si in range(3):
        for ti in range(2):
            if si < 2 and si == ti:
                continue
            terms.append(-(pt[ti] * ls[si]).sum(-1).mean())
    assert len(terms) == 4
    assert got == pytest.approx(float(np.mean(terms)), rel=1e-5)


def test_dino_center_update():
    loss = DINOLoss(4, center_momentum=0.9)
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0]])
    loss.update_center(g)
    assert torch.allclose(loss.center, 0.1 * torch.tensor([[2.0, 2.0, 2.0, 2.0]]))
    loss.update_center(g)
    assert torch.allclose(loss.center, torch.full((1, 4), 0.9 * 0.2 + 0.1 * 2.0))


def test_dino_uniform_teacher_gives_log_k():
    """Collapse signature: uniform teacher and student outputs -> loss = log K."""
    k = 16
    loss = DINOLoss(k, centering="none")
    z = torch.zeros(4, k)
    p = loss.teacher_probs(z, 0.04)
    assert loss([z, z], [p, p]).item() == pytest.approx(math.log(k), rel=1e-6)


def test_sinkhorn_knopp_marginals_and_reference():
    rng = np.random.default_rng(1)
    b, k, tau = 8, 4, 0.5
    s = rng.normal(size=(b, k))
    q = sinkhorn_knopp(torch.tensor(s, dtype=torch.float32), tau, n_iterations=3).numpy()
    # reference implementation from SwAV Alg. 1 in numpy (float64)
    ref = np.exp(s / tau).T
    ref /= ref.sum()
    for _ in range(3):
        ref /= ref.sum(axis=1, keepdims=True)
        ref /= k
        ref /= ref.sum(axis=0, keepdims=True)
        ref /= b
    ref = (ref * b).T
    np.testing.assert_allclose(q, ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(q.sum(1), np.ones(b), atol=1e-5)  # each sample: a distribution
    q50 = sinkhorn_knopp(torch.tensor(s, dtype=torch.float32), tau, n_iterations=50).numpy()
    np.testing.assert_allclose(q50.sum(0), np.full(k, b / k), rtol=1e-3)  # equipartition


def test_ibot_loss_matches_formula():
    rng = np.random.default_rng(2)
    k, tau_s = 6, 0.1
    masks = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    m = int(masks.sum())
    hs = rng.normal(size=(m, k))
    pt = np_softmax(rng.normal(size=(m, k)))
    loss = IBOTPatchLoss(k, student_temp=tau_s)
    got = loss(torch.tensor(hs, dtype=torch.float32), torch.tensor(pt, dtype=torch.float32), masks).item()
    ce = -(pt * np.log(np_softmax(hs / tau_s))).sum(-1)
    # image 0 has 3 masked patches (rows 0-2), image 1 none, image 2 one (row 3)
    expected = (ce[:3].mean() + 0.0 + ce[3]) / 3
    assert got == pytest.approx(float(expected), rel=1e-5)


def test_ibot_no_mask_is_zero_and_attached():
    loss = IBOTPatchLoss(5)
    s = torch.zeros(0, 5, requires_grad=True)
    out = loss(s, torch.zeros(0, 5), torch.zeros(2, 4, dtype=torch.bool))
    assert out.item() == 0.0 and out.requires_grad


def test_koleo_matches_formula():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 4))
    got = KoLeoLoss()(torch.tensor(x, dtype=torch.float32)).item()
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.linalg.norm(xn[:, None] - xn[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    expected = -np.log(d.min(1) + 1e-8).mean()
    assert got == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize(
    "x",
    [
        torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]),  # one duplicate pair
        torch.ones(5, 3),  # all rows identical
        torch.randn(1, 8),  # batch of one
        torch.randn(4, 8).to(torch.bfloat16),  # bf16
        torch.ones(4, 8, dtype=torch.bfloat16),  # bf16 duplicates
    ],
)
def test_koleo_finite_for_duplicates_tiny_batches_and_bf16(x):
    x = x.clone().requires_grad_(True)
    out = KoLeoLoss()(x)
    out.backward()
    assert torch.isfinite(out)
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()


def test_gram_loss_formula_zero_positive_and_prefix_ignored():
    rng = np.random.default_rng(4)
    b, p, n, d = 2, 5, 6, 8  # 1 class + 4 register tokens
    t = torch.tensor(rng.normal(size=(b, p + n, d)), dtype=torch.float32)
    loss = GramLoss()
    assert loss(t, t.clone(), num_prefix_tokens=p).item() == 0.0
    s = t.clone()
    s[:, :p] += 10 * torch.randn(b, p, d)  # only class/register tokens differ
    assert loss(s, t, num_prefix_tokens=p).item() == 0.0
    s2 = t.clone()
    s2[:, p:] += 0.5 * torch.randn(b, n, d)
    got = loss(s2, t, num_prefix_tokens=p).item()
    assert got > 0
    xs = s2[:, p:].numpy().astype(np.float64)
    xt = t[:, p:].numpy().astype(np.float64)
    xs /= np.linalg.norm(xs, axis=-1, keepdims=True)
    xt /= np.linalg.norm(xt, axis=-1, keepdims=True)
    gs, gt = xs @ xs.transpose(0, 2, 1), xt @ xt.transpose(0, 2, 1)
    expected = (((gs - gt) ** 2).sum(axis=(1, 2)) / n**2).mean()
    assert got == pytest.approx(float(expected), rel=1e-5)
    # gradient reaches the student only
    s3 = s2.clone().requires_grad_(True)
    t3 = t.clone().requires_grad_(True)
    loss(s3, t3, num_prefix_tokens=p).backward()
    assert s3.grad.abs().sum() > 0 and t3.grad is None
    assert s3.grad[:, :p].abs().sum() == 0


def test_gram_loss_shape_mismatch_raises():
    with pytest.raises(ValueError):
        GramLoss()(torch.randn(1, 5, 4), torch.randn(1, 6, 4))


@pytest.mark.parametrize("n_t,n_s,n_global", [(2, 10, 2), (2, 2, 0), (1, 3, 1), (3, 3, 3)])
def test_dino_loss_pairs_against_a_loop_over_pairs(n_t, n_s, n_global):
    """The summed-teacher form equals the mean over (teacher, student) pairs of different views."""
    rng = np.random.default_rng(n_t * 10 + n_s)
    b, k, tau_s = 4, 7, 0.1
    pt = [np_softmax(rng.normal(size=(b, k)) / 0.04) for _ in range(n_t)]
    ss = [rng.normal(size=(b, k)) for _ in range(n_s)]
    terms = [-(pt[t] * np.log(np_softmax(ss[s] / tau_s))).sum(-1).mean()
             for s in range(n_s) for t in range(n_t) if not (s < n_global and s == t)]
    got = DINOLoss(k, student_temp=tau_s)([torch.tensor(x, dtype=torch.float32) for x in ss],
                                          [torch.tensor(x, dtype=torch.float32) for x in pt], n_global=n_global)
    assert got.item() == pytest.approx(float(np.mean(terms)), rel=1e-5)


def _ce_autograd_reference(x, t, tau):
    return -(t * torch.log_softmax(x / tau, dim=-1)).sum(-1)


@pytest.mark.parametrize("m,k", [(1, 3), (7, 11), (40, 70_000)])  # 40 x 70,000 spans several row blocks
def test_soft_cross_entropy_value_and_gradient_match_the_formula(m, k):
    from jwth.loss._soft_ce import soft_cross_entropy

    g = torch.Generator().manual_seed(m * 31 + k)
    x = (torch.rand(m, k, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    t = torch.rand(m, k, generator=g, dtype=torch.float64)
    t = t / t.sum(-1, keepdim=True) * torch.arange(1, m + 1, dtype=torch.float64)[:, None]  # rows sum to 1..m
    w = torch.rand(m, generator=g, dtype=torch.float64)
    tau = 0.1
    ours = soft_cross_entropy(x.float(), t.float(), tau)
    xs = x.detach().numpy() / tau
    lse = np.log(np.exp(xs - xs.max(-1, keepdims=True)).sum(-1)) + xs.max(-1)
    by_hand = lse * t.numpy().sum(-1) - (t.numpy() * xs).sum(-1)  # -sum_k t log softmax
    np.testing.assert_allclose(ours.detach().numpy(), by_hand, rtol=2e-5, atol=1e-4)
    # gradient of sum_i w_i H_i against autograd through the stock operators (float64)
    xf = x.detach().float().requires_grad_(True)
    (soft_cross_entropy(xf, t.float(), tau) * w.float()).sum().backward()
    (_ce_autograd_reference(x, t, tau) * w).sum().backward()
    np.testing.assert_allclose(xf.grad.numpy(), x.grad.numpy(), rtol=1e-4, atol=1e-6 * float(x.grad.abs().max()))


@pytest.mark.parametrize("block_rows", [1, 3, 100])
def test_soft_cross_entropy_and_softmax_do_not_depend_on_the_block_size(block_rows, monkeypatch):
    """Blocks of 1 row, blocks that do not divide M, one block for all rows: the same values."""
    from jwth.loss import _soft_ce

    g = torch.Generator().manual_seed(block_rows)
    x = torch.randn(7, 13, generator=g, dtype=torch.float64)
    t = torch.softmax(torch.randn(7, 13, generator=g, dtype=torch.float64), -1)
    monkeypatch.setattr(_soft_ce, "CPU_BLOCK_ELEMENTS", 13 * block_rows)
    xf = x.float().requires_grad_(True)
    _soft_ce.soft_cross_entropy(xf, t.float(), 0.07).sum().backward()
    xr = x.clone().requires_grad_(True)
    ref = _ce_autograd_reference(xr, t, 0.07)
    ref.sum().backward()
    torch.testing.assert_close(_soft_ce.soft_cross_entropy(x.float(), t.float(), 0.07), ref.float())
    torch.testing.assert_close(xf.grad, xr.grad.float())
    torch.testing.assert_close(_soft_ce.softmax_rows_(x.float().clone()), torch.softmax(x, -1).float())


def test_soft_cross_entropy_bad_input_and_empty_rows():
    from jwth.loss._soft_ce import soft_cross_entropy

    with pytest.raises(ValueError, match="must both be"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    x = torch.zeros(0, 5, requires_grad=True)
    out = soft_cross_entropy(x, torch.zeros(0, 5), 0.1)
    assert out.shape == (0,)
    out.sum().backward()  # still attached


def test_soft_cross_entropy_bf16_scores_get_bf16_gradients():
    from jwth.loss._soft_ce import soft_cross_entropy

    x = torch.randn(4, 9).bfloat16().requires_grad_(True)
    t = torch.softmax(torch.randn(4, 9), -1)
    soft_cross_entropy(x, t, 0.1).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    ref = torch.autograd.grad(_ce_autograd_reference(x.float(), t, 0.1).sum(), x)[0]
    torch.testing.assert_close(x.grad.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_softmax_rows_in_place_matches_softmax():
    from jwth.loss._soft_ce import softmax_rows_

    x = torch.randn(37, 50_000) * 20
    want = torch.softmax(x, -1)
    got = softmax_rows_(x)
    assert got.data_ptr() == x.data_ptr()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
