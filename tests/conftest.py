"""Test configuration: backends skipped at collection time, RNG hygiene, hypothesis profiles."""

from __future__ import annotations

import os
import random

import pytest
import torch
from helpers import BACKEND_NAMES, unavailable


def pytest_collection_modifyitems(config, items):
    """A test parametrized over ``backend`` (helpers.BACKENDS, helpers.backends) is skipped at collection time when
    that backend cannot run here; the test itself re-checks when it runs (helpers.require_backend)."""
    reasons: dict[str, str | None] = {}
    for item in items:
        backend = getattr(item, "callspec", None) and item.callspec.params.get("backend")
        if backend not in BACKEND_NAMES:
            continue
        if backend not in reasons:
            reasons[backend] = unavailable(backend)
        if reasons[backend]:
            item.add_marker(pytest.mark.skip(reason=f"backend {backend!r}: {reasons[backend]}"))


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


@pytest.fixture
def threads():
    """``torch.set_num_threads`` for the test; torch's intra-op thread count is restored afterwards."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


# Hypothesis profiles (tests/test_fuzz.py), chosen by HYPOTHESIS_PROFILE; the default is "ci" when the CI
# variable is set (CI services set it), else "dev". Both run the same number of examples with no deadline (the
# Triton interpreter is slow and uneven) and print a failing example with its @reproduce_failure blob.
# - "dev": fresh examples every run; failing examples are kept in the example database (.hypothesis/) and replayed
#   first on the next run.
# - "ci": the same examples every run (derandomize; Hypothesis then keeps no database).
# - "explore": as "dev", with ten times as many examples (test_fuzz.py scales its budgets by the profile name).
try:
    from hypothesis import HealthCheck, settings
except ModuleNotFoundError:  # hypothesis is a dev requirement; only test_fuzz.py needs it
    pass
else:
    _common = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
    settings.register_profile("dev", **_common)
    settings.register_profile("explore", **_common)
    settings.register_profile("ci", derandomize=True, **_common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))
