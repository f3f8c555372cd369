"""Which parameters train under full / LoRA / last-blocks, and early stopping."""

import numpy as np
import pytest
import torch

import jwth.finetune.train as ft_train
from jwth.encoders import load_encoder
from jwth.finetune import EarlyStopping, FinetuneConfig, FinetuneModel, configure_trainable, count_params, fit
from jwth.finetune.model import trainable_state
from jwth.finetune.train import TileImages, prepare, random_dihedral, weighted_nll

SPEC = "timm:vit_tiny_patch16_224?img_size=32"  # D = 192, 12 blocks, 2 x 2 patch grid
D, DEPTH, C = 192, 12, 2
# JWTH attention head: q, k, v, proj (D x D; biases on q, v, proj), LayerNorm of the query
# (2 D), classifier on [cls; pooled] (2 D x C + C); the standardisation and token norm have no parameters
HEAD_PARAMS = 4 * D * D + 3 * D + 2 * D + 2 * D * C + C
# one timm ViT block: 2 LayerNorms, qkv (D -> 3D), proj, MLP D -> 4D -> D, all with biases
BLOCK_PARAMS = 2 * 2 * D + (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D)


def _model(head="attention"):
    torch.manual_seed(0)
    return FinetuneModel(load_encoder(SPEC), head, C)


def _images(n=12, seed=0):
    """Tiles whose class shows in the red channel, as a preloaded TileImages."""
    g = torch.Generator().manual_seed(seed)
    imgs = TileImages(".", [f"t{i}" for i in range(n)], 32)
    y = np.arange(n) % 2
    data = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    data[y == 1, 0] = 255
    imgs.data = data
    return imgs, y


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train_steps(model, method_cfg):
    imgs, y = _images()
    idx = np.arange(len(y))
    fit(model, imgs, y, idx[:8], idx[8:], method_cfg, torch.device("cpu"), precision="fp32")


def test_lora_changes_only_adapters_and_head():
    m = _model()
    info = configure_trainable(m, "lora", lora_rank=4, lora_targets=["qkv"])
    # LoRA on qkv (D -> 3D): A is r x D, B is 3D x r, per block
    assert info["trainable_params"] == DEPTH * 4 * (D + 3 * D) + HEAD_PARAMS == count_params(m, trainable=True)
    before = _snapshot(m)
    _train_steps(m, FinetuneConfig(method="lora", epochs=2, patience=0, batch_size=4, encoder_lr=1e-2))
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
    assert frozen and all(torch.equal(dict(m.named_parameters())[n], before[n]) for n in frozen)  # bit-identical
    assert any("lora_B" in n for n in changed) and any(n.startswith("head.") for n in changed)
    assert all("lora_" in n or n.startswith("head.") for n in changed)


def test_lora_starts_as_the_frozen_encoder():
    x = torch.randn(3, 3, 32, 32)
    m = _model()
    t0 = m.encoder(x).cls
    configure_trainable(m, "lora", lora_rank=4)
    assert torch.allclose(m.encoder(x).cls, t0)  # B = 0 at init (Hu et al. 2021)


def test_last_blocks_trains_exactly_the_last_k_blocks_and_head():
    m = _model("linear")
    info = configure_trainable(m, "last-blocks", last_blocks=2)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    expect = {f"encoder.model.{n}" for n, _ in m.encoder.model.named_parameters() if n.startswith(("blocks.10.", "blocks.11."))}
    expect |= {n for n, _ in m.named_parameters() if n.startswith("head.")}
    assert names == expect
    linear_head = D * C + C  # LinearProbe: standardisation without parameters, then D -> C
    assert info["trainable_params"] == 2 * BLOCK_PARAMS + linear_head
    before = _snapshot(m)
    _train_steps(m, FinetuneConfig(method="last-blocks", head="linear", epochs=1, patience=0, batch_size=4))
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= expect and any("blocks.10." in n for n in changed)


def test_full_trains_everything():
    m = _model()
    info = configure_trainable(m, "full")
    assert info["trainable_params"] == info["total_params"] == count_params(m)
    assert info["total_params"] == count_params(m.encoder.model) + HEAD_PARAMS


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"method": "partial"}, "Unknown fine-tuning method"),
        ({"method": "last-blocks", "last_blocks": 13}, "has 12 blocks"),
        ({"method": "lora", "lora_targets": ["query"]}, "match no linear layer"),
        ({"method": "lora", "lora_rank": 0}, "rank must be >= 1"),
    ],
)
def test_bad_method_settings(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        configure_trainable(_model(), **kwargs)


def test_unsupported_head():
    with pytest.raises(ValueError, match="cannot be fine-tuned"):
        FinetuneModel(load_encoder(SPEC), "mean", C)


def test_early_stopping_restores_the_best_epoch(monkeypatch):
    scores = iter([0.5, 0.8, 0.6, 0.7, 0.9])  # best at epoch 1; patience 2 stops after epoch 3
    states = []
    real_evaluate = ft_train.evaluate

    def spy(model, *a, **k):
        states.append(trainable_state(model))
        return real_evaluate(model, *a, **k)

    monkeypatch.setattr(ft_train, "metric", lambda name, y, p: next(scores))
    monkeypatch.setattr(ft_train, "evaluate", spy)
    m = _model()
    configure_trainable(m, "lora", lora_rank=2)
    imgs, y = _images()
    idx = np.arange(len(y))
    hist = fit(m, imgs, y, idx[:8], idx[8:], FinetuneConfig(epochs=5, patience=2, batch_size=4, encoder_lr=1e-2),
               torch.device("cpu"), precision="fp32")
    assert hist["best_epoch"] == 1 and hist["epochs_run"] == 4 and len(hist["curve"]) == 4
    now = trainable_state(m)
    assert all(torch.equal(now[n], states[1][n]) for n in now)
    assert not all(torch.equal(now[n], states[3][n]) for n in now)  # the last epoch was rolled back


def test_early_stopping_ties_go_to_lower_loss():
    es, m = EarlyStopping(patience=0), torch.nn.Linear(2, 2)
    assert not es.step(0, 0.7, 0.5, m) and not es.step(1, 0.7, 0.4, m) and not es.step(2, 0.7, 0.6, m)
    assert es.best_epoch == 1


def test_weighted_nll_matches_torch():
    p = np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
    y, w = np.array([0, 1, 1]), np.array([0.75, 1.5])
    ref = torch.nn.CrossEntropyLoss(weight=torch.tensor(w))(torch.tensor(np.log(p)), torch.tensor(y))
    assert weighted_nll(p, y, w) == pytest.approx(float(ref))


def test_augmentations_keep_pixels_and_range():
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    d = random_dihedral(x, g)
    assert torch.equal(d.flatten(1).sort(1).values, x.flatten(1).sort(1).values)  # pixels permuted, none invented
    assert not torch.equal(d, x)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    plain = prepare(x, mean, std, torch.device("cpu"))
    assert torch.allclose(plain, (x.float() / 255 - 0.5) / 0.25)
    stained = prepare(x, mean, std, torch.device("cpu"), ["stain"], None, g)
    assert not torch.allclose(stained, plain) and stained.min() >= -2.0 - 1e-6 and stained.max() <= 2.0 + 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_lora_step_on_cuda_bf16():
    m = _model()
    configure_trainable(m, "lora", lora_rank=2)
    m.cuda()
    imgs, y = _images()
    idx = np.arange(len(y))
    hist = fit(m, imgs, y, idx[:8], idx[8:], FinetuneConfig(epochs=1, patience=0, batch_size=4),
               torch.device("cuda"), precision="bf16")
    assert np.isfinite(hist["curve"][0]["train_loss"])
