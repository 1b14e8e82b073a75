"""In-process checks: layout validation, expected process groups, TP merge/shard inverse,
the trace comparison script."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from parallel_testlib import REPO, tiny


@pytest.mark.parametrize("parallel, world, needle", [
    ({"tp": 2, "pp": 2}, 6, "must divide the world size 6"),
    ({"pp": 2, "zero_stage": 3}, 2, "ZeRO-2/3"),
    ({"pp": 2, "zero_stage": 0}, 2, "stage 0's gradient norm"),
    ({"sequence_parallel": True}, 1, "needs parallel.tp > 1"),
    ({"tp": 4}, 4, "model.num_heads=2"),
    ({"pp": 4, "zero_stage": 1}, 4, "exceeds model.num_layers=2"),
])
def test_unsupported_layouts_are_config_errors(tmp_path, parallel, world, needle):
    from megafire.config import ConfigError
    from megafire.parallel import check_layout
    with pytest.raises(ConfigError) as err:   # from megafire.config.validate or check_layout
        check_layout(tiny(tmp_path, "fire", parallel), world)
    assert needle in str(err.value)


def test_supported_layouts(tmp_path):
    from megafire.parallel import check_layout
    assert check_layout(tiny(tmp_path, "fire", {"tp": 2, "pp": 2, "zero_stage": 1}), 8) == 2
    assert check_layout(tiny(tmp_path, "fire", {"zero_stage": 3}), 8) == 8


def test_expected_groups_of_eight():
    from megafire.parallel.describe import check, expected_groups
    g = expected_groups(8, tp=2, pp=2)
    assert g["tp"][:2] == [[0, 1], [2, 3]] and g["dp"][0] == [0, 2] and g["pp"][0] == [0, 4]
    rows = []
    for r in range(8):
        t, d, p = r % 2, (r // 2) % 2, r // 4
        find = lambda kind: next(x for x in g[kind] if r in x)  # noqa: E731
        rows.append({"rank": r, "tp_rank": t, "dp_rank": d, "pp_rank": p,
                     "tp_group": find("tp"), "dp_group": find("dp"), "pp_group": find("pp")})
    assert check(rows, 8, 2, 2) == []
    rows[3]["tp_group"] = [3]
    assert check(rows, 8, 2, 2)


@pytest.mark.parametrize("encoding", ["fire", "kerple", "t5", "alibi"])
def test_shard_then_merge_is_identity(tmp_path, encoding):
    from megafire.model import GPT
    from megafire.parallel import init_parallel
    from megafire.train.universal import merge_tp_shards, shard_state_dict
    cfg = tiny(tmp_path, encoding)
    model = GPT.from_config(cfg, init_parallel(1, 1))
    full = {k: v.float() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    for tp in (2,):
        merged = merge_tp_shards([shard_state_dict(full, cfg, r, tp) for r in range(tp)], cfg)
        assert set(merged) == set(full)
        for k in full:
            assert torch.equal(merged[k], full[k]), k
    # the stride-2 SwiGLU weight: rank r holds [gate_r; up_r]
    w = full["blocks.0.mlp.gate_up.weight"]
    gate, up = w.chunk(2)
    assert torch.equal(shard_state_dict(full, cfg, 1, 2)["blocks.0.mlp.gate_up.weight"],
                       torch.cat([gate.chunk(2)[1], up.chunk(2)[1]]))


def test_compare_traces(tmp_path):
    for name, losses in (("a", [4.0, 3.5, 3.0]), ("b", [4.0, 3.5, 3.0001]), ("c", [4.0, 3.9, 3.8])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(
            json.dumps({"step": i + 1, "loss": x, "tokens_per_s": 100.0, "mfu": None}) for i, x in enumerate(losses)))
    script = str(REPO / "launch" / "compare_traces.py")
    ok = subprocess.run([sys.executable, script, "--rtol", "1e-3", str(tmp_path / "a"), str(tmp_path / "b")],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "| 3.3e-05 |" in ok.stdout.replace("3.33e-05", "3.3e-05"), ok.stdout
    bad = subprocess.run([sys.executable, script, "--rtol", "1e-3", str(tmp_path / "a"), str(tmp_path / "c")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "FAIL" in bad.stderr
