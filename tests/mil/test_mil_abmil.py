"""ABMIL (Ilse et al. 2018, eq. 9) and mean pooling: formula, masks, one-tile bags, chunking."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from jwth.mil.abmil import ABMIL, MeanMIL, build_mil_model


def _model(cls=ABMIL, dim=12, seed=0):
    torch.manual_seed(seed)
    m = cls(dim, 2, hidden=16, **({"attn_dim": 8} if cls is ABMIL else {}))
    m.set_standardisation(np.full(dim, 0.1), np.full(dim, 2.0))
    return m.eval()


def test_gated_attention_matches_equation_9():
    m = _model()
    x = torch.randn(7, 12)
    out = m(x)
    # by hand: h = ReLU(W (x - mu) / sigma); a = softmax(w^T (tanh(V h) * sigm(U h))); z = sum a h
    h = torch.relu(m.project[0]((x - 0.1) / 2.0))
    V, U, w = m.attention.V, m.attention.U, m.attention.w
    s = (torch.tanh(h @ V.weight.T + V.bias) * torch.sigmoid(h @ U.weight.T + U.bias)) @ w.weight.T + w.bias
    a = torch.softmax(s.squeeze(-1), 0)
    z = (a[:, None] * h).sum(0)
    torch.testing.assert_close(out.attention[0], a)
    torch.testing.assert_close(out.logits[0], m.classifier(z))
    assert out.logits.shape == (1, 2) and out.attention.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("cls", [ABMIL, MeanMIL])
def test_padding_mask_gives_unpadded_result(cls):
    m = _model(cls)
    a, b = torch.randn(5, 12), torch.randn(9, 12)
    x = torch.zeros(2, 9, 12)
    x[0, :5], x[1] = a, b
    x[0, 5:] = 1e3  # garbage in the padding must not matter
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, :5], mask[1] = True, True
    out = m(x, mask)
    torch.testing.assert_close(out.logits[0], m(a).logits[0])
    torch.testing.assert_close(out.logits[1], m(b).logits[0])
    assert (out.attention[0, 5:] == 0).all()
    with pytest.raises(ValueError, match="at least one real"):
        m(x, torch.zeros(2, 9, dtype=torch.bool))


@pytest.mark.parametrize("cls", [ABMIL, MeanMIL])
def test_bag_of_one_tile(cls):
    m = _model(cls)
    x = torch.randn(1, 12)
    out = m(x)
    assert out.attention.item() == pytest.approx(1.0)
    h = m.embed(x)
    torch.testing.assert_close(out.logits, m.classifier(h))
    torch.testing.assert_close(m.forward_chunked(x.numpy(), chunk_size=4).logits, out.logits)
    m.train()  # training step on one-tile bags works too
    loss = torch.nn.functional.cross_entropy(m(x.expand(3, 1, 12).contiguous()).logits, torch.tensor([0, 1, 0]))
    loss.backward()
    assert torch.isfinite(m.classifier.weight.grad).all()


@pytest.mark.parametrize("cls", [ABMIL, MeanMIL])
def test_chunked_equals_unchunked(cls):
    m = _model(cls)
    x = torch.randn(3001, 12) * 3
    full = m(x)
    ch = m.forward_chunked(x, chunk_size=256)
    torch.testing.assert_close(ch.logits, full.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ch.attention, full.attention, atol=1e-7, rtol=1e-4)


def test_huge_bag_streams_from_hdf5_in_chunks(tmp_path):
    """A bag on disk is read chunk by chunk (bounded memory), with the in-memory result."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=(40_000, 12)).astype(np.float32)
    with h5py.File(tmp_path / "bag.h5", "w") as f:
        f["features"] = data
    reads = []

    class Spy:
        def __init__(self, ds):
            self.ds = ds

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, s):
            out = self.ds[s]
            reads.append(len(out))
            return out

    m = _model()
    with h5py.File(tmp_path / "bag.h5") as f:
        out = m.forward_chunked(Spy(f["features"]), chunk_size=4096)
    assert max(reads) == 4096 and sum(reads) == 40_000
    ref = m.forward_chunked(data, chunk_size=40_000)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert out.attention.shape == (1, 40_000)


def test_instance_probs_and_factory():
    m = _model()
    p = m.instance_probs(np.random.default_rng(0).normal(size=(10, 12)).astype(np.float32), chunk_size=3)
    assert p.shape == (10, 2) and np.allclose(p.sum(1), 1)
    assert isinstance(build_mil_model("mean", 12, attn_dim=4), MeanMIL)
    with pytest.raises(ValueError, match="Unknown aggregator"):
        build_mil_model("transmil", 12)
