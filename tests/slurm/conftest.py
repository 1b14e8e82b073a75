"""Fixtures for the real-Slurm tests (ci/slurm_up.sh brings the cluster up); the helpers live
in slurm_testlib.py (a unique module name: several test folders have a conftest.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from slurm_testlib import MEGAFIRE_TINY, Jobs, Trainer, _megafire_train_available, _slurm_problem
from slurm_testlib import ROOT  # noqa: F401


@pytest.fixture(scope="session")
def slurm_cluster():
    problem = _slurm_problem()
    if problem:
        if os.environ.get("MEGAFIRE_REQUIRE_SLURM") == "1":
            pytest.fail(f"MEGAFIRE_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)
    return True


@pytest.fixture(scope="session")
def trainer() -> Trainer:
    choice = os.environ.get("MEGAFIRE_SLURM_TRAINER", "auto")
    if choice == "auto":
        choice = "megafire" if _megafire_train_available() else "toy"
    if choice == "toy":
        return Trainer("toy", f"{sys.executable} {ROOT}/tests/slurm/_toy_train.py",
                       extra=["--toy.step_seconds=0.03"])
    megafire_bin = Path(sys.executable).with_name("megafire")
    cmd = f"{megafire_bin} train" if megafire_bin.exists() else f"{sys.executable} -m megafire.cli train"
    return Trainer("megafire", cmd, extra=list(MEGAFIRE_TINY))


@pytest.fixture
def jobs(slurm_cluster, tmp_path):
    j = Jobs(tmp_path)
    yield j
    j.cancel_all()
