"""MIL test settings; synthetic bags are in mil_synth.py."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a small shared CPU, 2+ threads make tiny models several times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
