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
