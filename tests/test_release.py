"""Releasing an encoder as jwth:<name> (jwth.encoders.release)."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from jwth.encoders import load_encoder, save_encoder_checkpoint
from jwth.encoders.release import ReleaseEvidence, _check_same_tokens, release_encoder


def _export(folder, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    return save_encoder_checkpoint(model, folder, "vit_tiny_patch16_224", {"img_size": 32}, input_size=32,
                                   mpp=1.0, dtype=torch.float32)


@pytest.fixture
def evidence(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  arch: vit_tiny_patch16_224\noptim:\n  epochs: 120\n")
    prog = tmp_path / "PROGRESS.json"
    prog.write_text(json.dumps({"steps_done": 900, "segments": [
        {"from_step": 0, "to_step": 500, "wall_min": 30.0}, {"from_step": 500, "to_step": 900, "wall_min": 60.0}]}))
    return ReleaseEvidence(run=run, commands=["jwth pretrain --config c.yaml"], progress=prog,
                           hardware="2-core CPU", data="tiles")


def test_release_loads_as_fp16_with_the_same_tokens_and_a_card(tmp_path, evidence):
    src = _export(tmp_path / "enc")
    dest = release_encoder(src, "tiny-test", evidence, dest_root=tmp_path / "ckpt")
    from safetensors.torch import load_file

    assert all(v.dtype == torch.float16 for v in load_file(str(dest / "model.safetensors")).values())
    assert (dest / "model.safetensors").stat().st_size < (src / "model.safetensors").stat().st_size
    a, b = load_encoder(str(src)), load_encoder(str(dest))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(b(x).cls, a(x).cls, rtol=0, atol=2e-2 * float(a(x).cls.abs().max()))
    card = (dest / "MODEL_CARD.md").read_text()
    # wall time per session, summed by hand: 30 + 60 = 90 min = 1.5 h
    assert "| 2 | 500-900 | 60.0 |" in card and "| all | 900 steps | 90.0 (1.5 h) |" in card
    assert "jwth pretrain --config c.yaml" in card and "epochs: 120" in card and "2-core CPU" in card


def test_release_refuses_bad_names_overwrites_and_large_weights(tmp_path, evidence, monkeypatch):
    src = _export(tmp_path / "enc")
    with pytest.raises(ValueError, match="Release name"):
        release_encoder(src, "../x", evidence, dest_root=tmp_path / "ckpt")
    release_encoder(src, "t", evidence, dest_root=tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="overwrite"):
        release_encoder(src, "t", evidence, dest_root=tmp_path / "ckpt")
    import jwth.encoders.release as rel

    monkeypatch.setattr(rel, "MAX_RELEASE_BYTES", 1000)
    with pytest.raises(ValueError, match="MB"):
        release_encoder(src, "t", evidence, dest_root=tmp_path / "ckpt", overwrite=True)
    assert (tmp_path / "ckpt" / "t" / "model.safetensors").is_file()  # the old release is kept
    with pytest.raises(FileNotFoundError, match="checkpoint folder"):
        release_encoder(tmp_path, "u", evidence, dest_root=tmp_path / "ckpt")


def test_token_check_catches_other_weights(tmp_path):
    a = load_encoder(str(_export(tmp_path / "a", seed=0)))
    b = load_encoder(str(_export(tmp_path / "b", seed=1)))
    with pytest.raises(ValueError, match="other cls tokens"):
        _check_same_tokens(a, b, tmp_path / "a")


def test_release_refuses_weights_that_overflow_float16_and_records_the_dtype(tmp_path, evidence):
    src = _export(tmp_path / "enc")
    dest = release_encoder(src, "ok", evidence, dest_root=tmp_path / "ckpt")
    assert json.loads((dest / "config.json").read_text())["jwth"]["dtype"] == "float16"
    from safetensors.torch import load_file, save_file

    state = load_file(str(src / "model.safetensors"))
    state["blocks.0.attn.qkv.weight"][0, 0] = 1e5  # fine in float32, inf in float16
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ValueError, match="other cls tokens"):
        release_encoder(src, "bad", evidence, dest_root=tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "bad").exists()


def test_card_tables_of_diagnostics(tmp_path, evidence):
    from jwth.encoders.release import model_card

    d = tmp_path / "diag"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"encoders": {"gram": {
        "effective_rank_per_tile": 27.5, "effective_rank_pooled": 80.0, "mean_pairwise_cosine": 0.5,
        "gram_spectrum": [0.1] * 500, "class_token_stain_displacement": {"1": {"relative": 0.34}, "2": {"relative": 0.57}}}}}))
    evidence.diagnose = {"after Gram": d}
    card = model_card("x", {"architecture": "vit_tiny_patch16_224",
                            "jwth": {"source": "jwth posttrain (EMA teacher backbone)", "trained_steps": 1410}}, evidence)
    assert "| gram | 27.500 | 80.000 | 0.500 | 0.340 / 0.570 |" in card
    assert "jwth posttrain (EMA teacher backbone), 1,410 steps" in card and "then Gram anchoring" in card
    assert "0.1, 0.1" not in card  # the spectrum stays in metrics.json
