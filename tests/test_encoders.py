import os
import subprocess
import sys
import textwrap

import pytest
import torch

from jwth_testutils import TINY
from jwth.encoders import REGISTRY, load_encoder, save_encoder_checkpoint
from jwth.encoders.registry import timm_kwargs


def test_timm_tokens_with_registers():
    enc = load_encoder("timm:vit_tiny_patch16_224?img_size=64&reg_tokens=4")
    tok = enc(torch.randn(2, 3, 64, 64))
    assert tok.cls.shape == (2, 192) and tok.registers.shape == (2, 4, 192)
    assert tok.patches.shape == (2, 16, 192) and tok.grid == (4, 4)
    # the class, register and patch tokens are exactly the slices of the full sequence
    full = enc.model.forward_features(torch.zeros(1, 3, 64, 64))
    t0 = enc(torch.zeros(1, 3, 64, 64))
    torch.testing.assert_close(t0.registers, full[:, 1:5])
    torch.testing.assert_close(t0.patches, full[:, 5:])
    assert enc.random_init and not any(p.requires_grad for p in enc.parameters())


def test_random_init_is_deterministic():
    a, b = load_encoder(TINY), load_encoder(TINY)
    assert a.weights_hash == b.weights_hash
    assert load_encoder(TINY + "&seed=1").weights_hash != a.weights_hash


def test_local_checkpoint_roundtrip_fp16(tmp_path):
    enc = load_encoder("timm:vit_tiny_patch16_224?img_size=64&reg_tokens=2")
    save_encoder_checkpoint(enc.model, tmp_path / "ck", "vit_tiny_patch16_224", {"img_size": 64, "reg_tokens": 2},
                            mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), input_size=64, mpp=0.5)
    back = load_encoder(str(tmp_path / "ck"))
    assert back.mpp == 0.5 and back.mean == (0.1, 0.2, 0.3) and back.input_size == 64 and back.num_registers == 2
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(back(x).patches, enc(x).patches, atol=5e-2, rtol=5e-2)  # fp16 weights


def test_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown timm model"):
        load_encoder("timm:vit_nonexistent_patch16")
    with pytest.raises(ValueError, match="key=value"):
        load_encoder("timm:vit_tiny_patch16_224?img_size")
    with pytest.raises(FileNotFoundError, match="No released checkpoint"):
        load_encoder("jwth:does-not-exist")
    with pytest.raises(ValueError, match="Unknown encoder spec"):
        load_encoder("not-a-model")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_encoder(str(tmp_path / "bad"))


def test_registry_entries():
    r = REGISTRY
    assert (r["uni"].embed_dim, r["uni"].num_registers, r["uni"].patch_size) == (1024, 0, 16)
    assert (r["uni2-h"].embed_dim, r["uni2-h"].num_registers, r["uni2-h"].patch_size) == (1536, 8, 14)
    assert (r["virchow2"].embed_dim, r["virchow2"].num_registers, r["virchow2"].embedding) == (1280, 4, "cls+mean")
    assert (r["h-optimus-0"].embed_dim, r["h-optimus-0"].num_registers) == (1536, 4)
    assert r["h-optimus-0"].mean == (0.707223, 0.578729, 0.703617)
    assert (r["phikon-v2"].embed_dim, r["phikon-v2"].num_registers, r["phikon-v2"].loader) == (1024, 0, "transformers")
    assert all(e.mpp == 0.5 and e.input_size == 224 for e in r.values())


def test_uni2h_kwargs_build_its_token_layout():
    import timm

    kw = timm_kwargs(REGISTRY["uni2-h"])
    kw.update(depth=1)  # same token layout, one block, so the test stays small
    m = timm.create_model("vit_giant_patch14_224", pretrained=False, num_classes=0, **kw)
    assert m.num_reg_tokens == 8 and m.num_features == 1536 and m.patch_embed.patch_size == (14, 14)


def test_hub_spec_loads_offline_from_local_hf_cache(tmp_path):
    enc = load_encoder(TINY)
    snap = tmp_path / "hub" / "models--someorg--tiny-path" / "snapshots" / ("a" * 40)
    save_encoder_checkpoint(enc.model, snap, "vit_tiny_patch16_224", {"img_size": 64}, input_size=64, dtype=torch.float32)
    (tmp_path / "hub" / "models--someorg--tiny-path" / "refs").mkdir()
    (tmp_path / "hub" / "models--someorg--tiny-path" / "refs" / "main").write_text("a" * 40)
    code = textwrap.dedent(
        f"""
        import torch
        from jwth.encoders import load_encoder
        e = load_encoder("hf-hub:someorg/tiny-path")
        ref = load_encoder("{TINY}")
        x = torch.randn(1, 3, 64, 64)
        assert torch.allclose(e(x).cls, ref(x).cls, atol=1e-5), "weights differ"
        print("OK", e.input_size)
        try:
            load_encoder("uni")  # not in the cache: the clear offline error
        except RuntimeError as err:
            print("UNCACHED", "never downloaded" in str(err))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK 64" in r.stdout
    assert "UNCACHED True" in r.stdout


def test_released_checkpoint_name_resolves(tmp_path, monkeypatch):
    import jwth.encoders as encoders

    enc = load_encoder(TINY)
    save_encoder_checkpoint(enc.model, tmp_path / "tiny-test", "vit_tiny_patch16_224", {"img_size": 64}, input_size=64)
    monkeypatch.setattr(encoders, "CHECKPOINT_DIR", tmp_path)
    assert encoders.released_checkpoints() == ["tiny-test"]
    back = load_encoder("jwth:tiny-test")
    assert back.spec == "jwth:tiny-test" and not back.random_init and back.input_size == 64


def test_checkpoint_loads_at_another_input_size(tmp_path):
    """A checkpoint trained at 32 px (2x2 grid) evaluated at 64 px (4x4): position embedding resampled."""
    import json

    enc = load_encoder("timm:vit_tiny_patch16_224?img_size=32")
    c = torch.linspace(-1, 1, 192)
    with torch.no_grad():
        enc.model.pos_embed[:, 1:] = c  # the same vector at all 4 grid positions
    folder = save_encoder_checkpoint(enc.model, tmp_path / "ck", "vit_tiny_patch16_224", {"img_size": 32},
                                     input_size=32, dtype=torch.float32)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_args"]["img_size"] = 64
    cfg["pretrained_cfg"]["input_size"] = [3, 64, 64]
    (folder / "config.json").write_text(json.dumps(cfg))
    big = load_encoder(str(folder))
    assert big.input_size == 64 and big(torch.randn(1, 3, 64, 64)).patches.shape == (1, 16, 192)
    old, new = enc.model.pos_embed.detach(), big.model.pos_embed.detach()
    assert torch.equal(new[:, 0], old[:, 0])  # class-token position untouched
    # interpolating a constant grid gives the constant at all 16 positions (a fresh init would not)
    assert new.shape == (1, 17, 192) and torch.allclose(new[0, 1:], c.expand(16, 192), atol=1e-5)


def test_non_square_or_mismatched_input_size_is_refused_when_loaded():
    """img_size=[224,160] used to build, crop tiles to 160 x 160 and fail in the forward pass."""
    with pytest.raises(ValueError, match=r"built for 224 x 160 px inputs.*img_size=224"):
        load_encoder("timm:vit_tiny_patch16_224?img_size=[224,160]")
    enc = load_encoder("timm:vit_tiny_patch16_224?img_size=[48,48]")  # square as a list: runs end to end
    assert enc.input_size == 48 and enc(torch.zeros(1, 3, 48, 48)).patches.shape[1] == 9
    import timm

    from jwth.encoders.base import Encoder

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    with pytest.raises(ValueError, match="takes 32 x 32 px inputs but its input size .* is 64 px"):
        Encoder(model, spec="x", mean=(0.5,) * 3, std=(0.5,) * 3, input_size=64)


def test_bad_timm_option_is_a_clear_error_naming_the_spec():
    from jwth.encoders import load_encoder

    with pytest.raises(ValueError, match=r"timm could not build 'vit_tiny_patch16_224'.*img_size=112"):
        load_encoder("timm:vit_tiny_patch16_224?img_size=abc")


def test_misspelt_timm_model_suggests_close_names():
    from jwth.encoders import load_encoder

    with pytest.raises(ValueError, match="vit_tiny_patch16_224"):
        load_encoder("timm:vit_tinyy_patch16_224")


def test_hub_models_load_offline_only(monkeypatch):
    """Registry / hf-hub encoders never reach the network: the Hub is in offline mode while they load."""
    import huggingface_hub.constants as hub_constants
    import timm

    import jwth.encoders as enc

    seen = []

    def fake_create_model(name, **kw):
        seen.append((name, hub_constants.HF_HUB_OFFLINE, __import__("os").environ.get("HF_HUB_OFFLINE")))
        raise OSError("not in the local cache")

    monkeypatch.setattr(timm, "create_model", fake_create_model)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = hub_constants.HF_HUB_OFFLINE
    with pytest.raises(RuntimeError, match="local cache"):
        enc.load_encoder("hf-hub:some-org/some-model")
    assert seen == [("hf-hub:some-org/some-model", True, "1")]
    assert hub_constants.HF_HUB_OFFLINE == before and "HF_HUB_OFFLINE" not in __import__("os").environ
