"""Test configuration: RNG hygiene."""

from __future__ import annotations

import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _rng_hygiene():
    """Each test starts from the same seeds and leaves the global RNG state as it found it."""
    torch_state = torch.random.get_rng_state()
    py_state = random.getstate()
    torch.manual_seed(0)
    random.seed(0)
    yield
    torch.random.set_rng_state(torch_state)
    random.setstate(py_state)
