"""Fixtures for model tests: a single-process gloo world (megatron's layers want groups)."""
from __future__ import annotations

import model_testlib  # noqa: F401  (registers the test-local "toy_bias" encoding)
import pytest


@pytest.fixture(scope="session")
def parallel():
    from megafire.parallel import init_parallel
    return init_parallel(tp=1, pp=1, backend="gloo")
