#!/usr/bin/env bash
# The default test run: a local single-node Slurm cluster for the launch tests, then pytest.
# Extra arguments go to pytest. Exit status: pytest's.
set -uo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1
started_slurm=0
if [[ -x ci/slurm_up.sh && "$(id -u)" == 0 ]]; then
    if bash ci/slurm_up.sh; then
        started_slurm=1
        export MEGAFIRE_REQUIRE_SLURM=1
    else
        echo "ci/test.sh: local Slurm bring-up failed; Slurm tests will fail" >&2
        export MEGAFIRE_REQUIRE_SLURM=1
    fi
fi
.venv/bin/python -m pytest "$@"
rc=$?
if [[ $started_slurm == 1 ]]; then bash ci/slurm_down.sh || true; fi
exit $rc
