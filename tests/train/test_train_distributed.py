"""Two gloo ranks launched by torchrun: data parallel with ZeRO-2, resume == uninterrupted."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.distributed
def test_two_ranks_zero2_resume_equals_uninterrupted(tmp_path):
    here = Path(__file__).parent
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(here.parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(here / "_dist_resume.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["steps"] == 4
    assert [r[0] for r in result["full"]] == [1, 2, 3, 4]
    assert result["resumed"] == result["full"]
    assert {"trainer_state_rank00000.pt", "trainer_state_rank00001.pt", "meta.json"} <= set(result["files"])
    assert sum(f.startswith("zero_pp_rank_") for f in result["ds_files"]) == 2   # one optimizer shard per rank
