"""Slide extraction with a trained attention head: same pooled vectors as the token-cache path."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from jwth.heads import JWTHAttentionHead
from jwth.heads.checkpoint import load_attention_head, pool_with_head, save_attention_head
from jwth.wsi.extract import extract_slides

KW = dict(target_mpp=1.0, tile_size=32, batch_size=16)


@pytest.fixture
def head_file(tmp_path, tiny_encoder):
    torch.manual_seed(3)
    head = JWTHAttentionHead(tiny_encoder.embed_dim, 2, num_heads=4)
    with torch.no_grad():  # non-trivial standardisation statistics, as after training
        head.cls_std.bn.running_mean.normal_()
        head.cls_std.bn.running_var.uniform_(0.5, 2.0)
    return save_attention_head(tmp_path / "attention_head.pt", head.eval(), ["MSIMUT", "MSS"], tiny_encoder)


def test_fused_head_equals_head_on_cached_patch_tokens(slides_dir, tmp_path, tiny_encoder, head_file):
    slide = [slides_dir / "tissue.tif"]
    head, meta = load_attention_head(head_file, tiny_encoder)
    assert meta["classes"] == ["MSIMUT", "MSS"] and meta["num_heads"] == 4
    extract_slides(slide, tmp_path / "cached", tiny_encoder, save_patch_tokens=True, **KW)
    extract_slides(slide, tmp_path / "fused", tiny_encoder, head=head, **KW)
    with h5py.File(tmp_path / "cached" / "features" / "tissue.h5") as f:
        cls, patches, coords_c = f["features"][()], f["patch_tokens"][()], f["coords"][()]
    with h5py.File(tmp_path / "fused" / "features" / "tissue.h5") as f:
        feats, attn, probs, coords_f = f["features"][()], f["attention"][()], f["probs"][()], f["coords"][()]
        assert f.attrs["embedding"] == "jwth-head" and "patch_tokens" not in f
    n, D = cls.shape
    assert n > 10 and feats.shape == (n, 2 * D) and attn.shape == (n, 4, 4) and probs.shape == (n, 2)
    np.testing.assert_array_equal(coords_f, coords_c)
    # the cached path: the same head on the stored (fp16) patch tokens
    ref, ref_attn, ref_probs = pool_with_head(head, torch.from_numpy(cls), torch.from_numpy(patches.astype(np.float32)))
    np.testing.assert_allclose(feats[:, :D], cls, atol=1e-6)
    np.testing.assert_allclose(feats[:, D:], ref[:, D:].numpy(), atol=2e-2, rtol=2e-2)  # fp16 token rounding
    np.testing.assert_allclose(attn.astype(np.float32), ref_attn.numpy(), atol=2e-3)
    np.testing.assert_allclose(probs, ref_probs.numpy(), atol=2e-3)
    np.testing.assert_allclose(attn.astype(np.float32).sum(-1), 1.0, atol=1e-2)
    # the pooled vector is the head's, not the parameter-free class-attention pooling
    assert np.abs(feats[:, D:] - patches.astype(np.float32).mean(1)).max() > 0.1


def test_head_of_another_encoder_is_refused(tmp_path, head_file, slides_dir):
    from jwth.cli import app
    from jwth.encoders import load_encoder

    other = load_encoder("timm:vit_tiny_patch16_224?img_size=32&seed=1")
    with pytest.raises(ValueError, match="trained on tokens of"):
        load_attention_head(head_file, other)
    (tmp_path / "junk.pt").write_bytes(b"not a head")
    with pytest.raises(ValueError, match="not a JWTH attention-head file"):
        load_attention_head(tmp_path / "junk.pt")
    res = CliRunner().invoke(app, ["extract-slides", str(slides_dir / "tissue.tif"), "--out", str(tmp_path / "o"),
                                   "--encoder", "timm:vit_tiny_patch16_224?img_size=32&seed=1",
                                   "--head", str(head_file), "--target-mpp", "1.0", "--tile-size", "32"])
    assert res.exit_code == 2 and "pass the same --encoder" in res.output
    assert not (tmp_path / "o" / "features").exists()
