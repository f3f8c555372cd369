import math

import pytest
import torch

from jwth.heads import (
    AttentionPool,
    JWTHAttentionHead,
    LearnedQueryHead,
    build_head,
    class_attention_pool,
    normalize_tokens,
    parse_heads,
)


def test_attention_pool_equals_torch_multihead_attention():
    torch.manual_seed(0)
    D, H = 32, 4
    ap = AttentionPool(D, H)
    mha = torch.nn.MultiheadAttention(D, H, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([ap.q.weight, ap.k.weight, ap.v.weight]))
        # a random key bias: it must cancel in the softmax
        mha.in_proj_bias.copy_(torch.cat([ap.q.bias, torch.randn(D), ap.v.bias]))
        mha.out_proj.weight.copy_(ap.proj.weight)
        mha.out_proj.bias.copy_(ap.proj.bias)
    q, x = torch.randn(5, D), torch.randn(5, 11, D)
    mask = torch.ones(5, 11, dtype=torch.bool)
    mask[:, 7:] = False
    out, attn = ap(q, x, mask)
    ref, ref_attn = mha(q[:, None], x, x, key_padding_mask=~mask, average_attn_weights=False)
    torch.testing.assert_close(out, ref[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn, ref_attn[:, :, 0], atol=1e-6, rtol=1e-5)


def test_equal_attention_gives_mean_of_values():
    # With a zero query projection every score is 0, so softmax is uniform and the output is
    # proj(mean of the value projections) -- worked out by hand below.
    torch.manual_seed(1)
    D, H, N = 8, 2, 5
    ap = AttentionPool(D, H)
    with torch.no_grad():
        ap.q.weight.zero_()
        ap.q.bias.zero_()
    x = torch.randn(3, N, D)
    out, attn = ap(torch.randn(3, D), x)
    assert torch.allclose(attn, torch.full_like(attn, 1.0 / N))
    values = x @ ap.v.weight.T + ap.v.bias
    expected = values.mean(1) @ ap.proj.weight.T + ap.proj.bias
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_class_attention_pool_by_hand():
    cls = torch.tensor([[1.0, 0.0]])
    patches = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])
    pooled, w = class_attention_pool(cls, patches)
    s = torch.tensor([2.0 / math.sqrt(2), 0.0])
    w_ref = s.softmax(0)
    assert torch.allclose(w[0], w_ref)
    assert torch.allclose(pooled[0], w_ref[0] * patches[0, 0] + w_ref[1] * patches[0, 1])
    # a zero query attends equally: the mean patch token
    pooled0, _ = class_attention_pool(torch.zeros(1, 2), patches)
    assert torch.allclose(pooled0, patches.mean(1))


def test_masked_register_rows_change_nothing():
    torch.manual_seed(2)
    head = JWTHAttentionHead(16, 3, num_heads=4).eval()
    cls, patches = torch.randn(4, 16), torch.randn(4, 9, 16)
    registers = torch.randn(4, 4, 16) * 50  # large, so any leak would show
    with_regs = torch.cat([registers, patches], 1)
    mask = torch.ones(4, 13, dtype=torch.bool)
    mask[:, :4] = False
    a = head(cls, patches)
    b = head(cls, with_regs, mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and without the mask the registers do change the output (the test can fail)
    assert not torch.allclose(a, head(cls, with_regs), atol=1e-3)


def test_pre_normalized_tokens_give_the_same_logits():
    torch.manual_seed(4)
    for cls_ in (JWTHAttentionHead, LearnedQueryHead):
        head = cls_(16, 3, num_heads=4).eval()
        cls, patches = torch.randn(4, 16), torch.randn(4, 9, 16) * 3 + 1
        torch.testing.assert_close(head(cls, patches), head.forward_normalized(cls, normalize_tokens(patches)))


def test_fully_masked_row_is_an_error():
    with pytest.raises(ValueError, match="keeps no"):
        AttentionPool(8, 2)(torch.randn(1, 8), torch.randn(1, 3, 8), torch.zeros(1, 3, dtype=torch.bool))


def test_learned_query_ignores_class_token_in_pooling():
    torch.manual_seed(3)
    head = LearnedQueryHead(8, 2, num_heads=2).eval()
    patches = torch.randn(2, 5, 8)
    head(torch.randn(2, 8), patches)
    a1 = head.last_attention.clone()
    head(torch.randn(2, 8) * 10, patches)
    assert torch.allclose(a1, head.last_attention)


@pytest.mark.parametrize("name", ["linear", "attention", "mean", "learned-query"])
def test_heads_shapes_and_gradients(name):
    head = build_head(name, 16, 3, num_heads=4)
    logits = head(torch.randn(6, 16), torch.randn(6, 10, 16))
    assert logits.shape == (6, 3)
    logits.sum().backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None]
    assert missing == []


def test_unknown_head_name():
    with pytest.raises(ValueError, match="choose from linear, attention, mean, learned-query"):
        parse_heads("linear,attn")
    assert parse_heads("attention, linear,attention") == ["attention", "linear"]


def test_grid_forward_equals_each_head_alone():
    from jwth.heads.attention_pool import grid_forward_normalized

    torch.manual_seed(5)
    heads = [JWTHAttentionHead(16, 2, num_heads=4).eval(), LearnedQueryHead(16, 2, num_heads=4).eval()]
    cls, tokens = torch.randn(3, 16), normalize_tokens(torch.randn(3, 7, 16))
    together = grid_forward_normalized(heads, cls, tokens)
    for h, lg in zip(heads, together):
        torch.testing.assert_close(lg, h.forward_normalized(cls, tokens))
