"""Row-chunked soft-target cross-entropy and softmax for wide prototype scores.

The DINO and iBOT terms take, for every row i of student scores x (M, K) and teacher
targets t (M, K),

    H_i = - sum_k t_ik log softmax(x_i / tau_s)_k = lse_i * T_i - (t_i . x_i) / tau_s,
    lse_i = log sum_k exp(x_ik / tau_s),   T_i = sum_k t_ik

with the gradient (the softmax Jacobian contracted with t)

    dH_i / dx_ik = (softmax(x_i / tau_s)_k * T_i - t_ik) / tau_s.

Written with stock operators (``-(t * F.log_softmax(x / tau)).sum(-1)``) each step creates
about six temporaries of the full (M, K) size; at DINOv2's 65,536 prototypes and ~1,600
masked patches every one is ~420 MB, larger than any cache and freshly mapped by the
allocator. Here the rows are processed in blocks that fit in the CPU's cache, only the
(M,) log-normalisers are kept for backward, and backward writes the gradient straight into
one (M, K) buffer: the same values (to float32 rounding), two full-size passes instead of
about a dozen.
"""

from __future__ import annotations

import torch

# elements per block of rows. CPU: 16 x 65,536 float32 = 4 MiB, within an L2/L3 cache.
# Accelerators stream from HBM and pay per kernel launch instead: a few large blocks.
CPU_BLOCK_ELEMENTS = 1 << 20
ACCELERATOR_BLOCK_ELEMENTS = 1 << 26


def _row_block(x: torch.Tensor) -> int:
    elements = CPU_BLOCK_ELEMENTS if x.device.type == "cpu" else ACCELERATOR_BLOCK_ELEMENTS
    return max(1, elements // max(1, x.shape[-1]))


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:  # type: ignore[override]
        x = scores.float()
        t = targets.float()
        m, k = x.shape
        inv = 1.0 / temperature
        lse, tsum, dot = x.new_empty(m), x.new_empty(m), x.new_empty(m)
        step = _row_block(x)
        buf = x.new_empty(min(step, m), k)
        for a in range(0, m, step):
            b = min(m, a + step)
            xb = torch.mul(x[a:b], inv, out=buf[: b - a])
            torch.logsumexp(xb, dim=-1, out=lse[a:b])
            torch.sum(t[a:b], dim=-1, out=tsum[a:b])  # while the block of t is in cache
            dot[a:b] = torch.linalg.vecdot(xb, t[a:b])
        ctx.save_for_backward(x, t, lse, tsum)
        ctx.inv = inv
        ctx.in_dtype = scores.dtype
        return lse * tsum - dot

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, t, lse, tsum = ctx.saved_tensors
        inv = ctx.inv
        m = x.shape[0]
        g = torch.empty_like(x)
        scale = grad_out.float() * inv
        step = _row_block(x)
        for a in range(0, m, step):
            b = min(m, a + step)
            gb = torch.mul(x[a:b], inv, out=g[a:b])
            gb.sub_(lse[a:b, None]).exp_().mul_(tsum[a:b, None]).sub_(t[a:b]).mul_(scale[a:b, None])
        return g.to(ctx.in_dtype), None, None


def soft_cross_entropy(scores: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row cross-entropy H(t_i, softmax(x_i / tau)) without full-size temporaries.

    Args:
        scores: student prototype scores x, shape (M, K), any float dtype (computed in
            float32); gradients flow to it.
        targets: teacher targets t, shape (M, K), no gradient (rows need not sum to 1:
            the DINO term passes sums over teacher views).
        temperature: student temperature tau_s (> 0).

    Returns:
        float32 tensor (M,): H_i = -sum_k t_ik log softmax(x_i / tau)_k (DINO, Caron et al.
        2021, eq. 1; iBOT, Zhou et al. 2022, eq. 2).

    Raises:
        ValueError: shapes differ or are not 2-D, or temperature <= 0.
    """
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores and targets must both be (M, K), got {tuple(scores.shape)} and {tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if scores.shape[0] == 0:
        return scores.float().sum(dim=-1)
    return _SoftCrossEntropy.apply(scores, targets.detach(), float(temperature))


@torch.no_grad()
def softmax_rows_(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension of a float32 (M, K) tensor, in place, block by block.

    Same values as ``torch.softmax(x, -1)`` without a second full-size tensor; returns ``x``.
    """
    m = x.shape[0]
    step = _row_block(x)
    for a in range(0, m, step):
        xb = x[a : a + step]
        xb.sub_(xb.amax(dim=-1, keepdim=True)).exp_()
        xb.div_(xb.sum(dim=-1, keepdim=True))
    return x
