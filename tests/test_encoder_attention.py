"""The encoder's last-block class-token attention equals timm's own attention matrix."""

import pytest
import torch

from jwth.encoders import load_encoder
from jwth.encoders.attention import tokens_and_cls_attention


@pytest.mark.parametrize("spec", ["timm:vit_tiny_patch16_224?img_size=32", "timm:vit_tiny_patch16_224?img_size=32&reg_tokens=2"])
def test_cls_attention_matches_timm_unfused_attention(spec):
    enc = load_encoder(spec)
    x = torch.randn(2, 3, 32, 32)
    tokens, a = tokens_and_cls_attention(enc, x)
    # timm's own matrix: the unfused path applies attn_drop to softmax(q k^T * scale)
    attn = enc.model.blocks[-1].attn
    seen = []
    attn.fused_attn = False
    h = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        ref_tokens = enc(x)
    finally:
        h.remove()
    row = seen[0][:, :, 0, enc.num_prefix_tokens:]  # class token's row, patch-token columns
    torch.testing.assert_close(a, row / row.sum(-1, keepdim=True), atol=1e-5, rtol=1e-5)
    assert a.shape == (2, attn.num_heads, 4)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, attn.num_heads))
    torch.testing.assert_close(tokens.patches, ref_tokens.patches, atol=1e-5, rtol=1e-5)
    assert row.sum(-1).max() < 1  # the class and register tokens took some weight before renormalising
