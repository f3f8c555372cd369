"""Precision choice: measured on CPU, overridable, never assumed from a CPU flag alone."""

from __future__ import annotations

import pytest
import torch

import jwth.device as device


@pytest.fixture(autouse=True)
def _fresh_cache():
    device.cpu_bf16_speedup.cache_clear()
    yield
    device.cpu_bf16_speedup.cache_clear()


def test_no_native_bf16_means_fp32_without_measuring(monkeypatch):
    monkeypatch.delenv("JWTH_CPU_BF16", raising=False)
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    assert device.cpu_bf16_speedup() == 0.0
    assert device.resolve_precision(torch.device("cpu"), "auto") == torch.float32


def test_native_bf16_flag_alone_is_not_enough(monkeypatch):
    """A CPU that reports bf16 units but runs bf16 slower (measured) keeps fp32."""
    monkeypatch.delenv("JWTH_CPU_BF16", raising=False)
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    # fake clock: each timed block lasts 1 tick in fp32 and 3 ticks under bf16 autocast

    def fake_perf_counter():
        step = 3 if torch.is_autocast_enabled("cpu") else 1
        fake_perf_counter.t += step if fake_perf_counter.toggle else 0
        fake_perf_counter.toggle = not fake_perf_counter.toggle
        return fake_perf_counter.t

    fake_perf_counter.t, fake_perf_counter.toggle = 0, False
    monkeypatch.setattr(device.time, "perf_counter", fake_perf_counter)
    assert device.cpu_bf16_speedup() == pytest.approx(1 / 3)
    assert device.resolve_precision(torch.device("cpu"), "auto") == torch.float32


def test_env_override(monkeypatch):
    monkeypatch.setenv("JWTH_CPU_BF16", "1")
    assert device.resolve_precision(torch.device("cpu"), "auto") == torch.bfloat16
    device.cpu_bf16_speedup.cache_clear()
    monkeypatch.setenv("JWTH_CPU_BF16", "0")
    assert device.resolve_precision(torch.device("cpu"), "auto") == torch.float32


def test_explicit_precisions():
    cpu = torch.device("cpu")
    assert device.resolve_precision(cpu, "fp32") == torch.float32
    assert device.resolve_precision(cpu, "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="only supported on CUDA"):
        device.resolve_precision(cpu, "fp16")
    with pytest.raises(ValueError, match="Unknown precision"):
        device.resolve_precision(cpu, "fp8")  # type: ignore[arg-type]


def test_adamw_is_fused_on_cpu_and_steps_like_the_default():
    from jwth.device import adamw

    torch.manual_seed(0)
    a = torch.nn.Linear(8, 3)
    b = torch.nn.Linear(8, 3)
    b.load_state_dict(a.state_dict())
    fused = adamw(a.parameters(), lr=1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    assert fused.defaults.get("fused") is True
    x = torch.randn(16, 8)
    for _ in range(3):
        for m, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_adamw_falls_back_where_fused_is_refused(monkeypatch):
    import jwth.device as dev

    real = torch.optim.AdamW

    class NoFused(real):
        def __init__(self, params, **kw):
            if kw.get("fused"):
                raise RuntimeError("fused not supported here")
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", NoFused)
    opt = dev.adamw(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    assert isinstance(opt, NoFused) and not opt.defaults.get("fused")
