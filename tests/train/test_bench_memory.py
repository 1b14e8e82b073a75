"""``megafire bench train`` reports each arm's own peak memory: what earlier arms of the same
process still hold is measured at the arm's start and subtracted (it made the peaks rise with the
arms' order, docs/benchmarks.md)."""
from pathlib import Path

import pytest
import torch

from megafire.bench import train as bench_train

CONFIG = str(Path(__file__).parents[2] / "configs" / "demo-cpu.yaml")


def test_own_peak_subtracts_what_earlier_arms_hold():
    summary = {"by_seq_len": {64: {"max_memory_gib": 3.5}, 128: {"max_memory_gib": None}}}
    out = bench_train.own_peak(summary, 1.25)
    assert out["held_gib"] == 1.25
    assert out["by_seq_len"][64]["max_memory_gib"] == 2.25 and out["by_seq_len"][128]["max_memory_gib"] is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_arms_peak_does_not_include_memory_held_before_it():
    """The same arm, alone and with 2 GiB held by the process (an earlier arm's leftovers): the
    reported peaks agree within 0.1 GiB, and the held memory is reported as such."""
    over = ["--train.precision=bf16", "--parallel.zero_stage=1", "--perf.compile=false"]   # bf16 needs ZeRO >= 1
    alone = bench_train.bench_config(CONFIG, over, steps=3, warmup=1)
    held = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    try:
        with_held = bench_train.bench_config(CONFIG, over, steps=3, warmup=1)
    finally:
        del held
    (n, a), = alone["by_seq_len"].items()
    b = with_held["by_seq_len"][n]
    assert abs(a["max_memory_gib"] - b["max_memory_gib"]) < 0.1, (a, b)
    assert with_held["held_gib"] >= 2.0
