"""``megafire bench train --ab``: two configurations of the main arm in one process, in ABBA order,
with each arm's median and the pairs' B / A ratios (the machine's drift and an arm's place in the
process weigh on both alike)."""
import json
from pathlib import Path

import pytest

from megafire.bench import train as bench_train
from megafire.config import ConfigError, load_config

CONFIG = str(Path(__file__).parents[2] / "configs" / "demo-cpu.yaml")


def test_ab_order_is_abba():
    assert bench_train.ab_order(1) == ["A", "B"]
    assert bench_train.ab_order(3) == ["A", "B", "B", "A", "A", "B"]


def test_ab_runs_b_with_its_overrides_in_abba_order(tmp_path, capsys):
    """The real trainer on the CPU demo config: B's runs carry B's override (tokens per step) and A's
    do not, the runs come in the order A1 B1 B2 A2, and the reported ratios are the pairs' tokens/s
    quotients (B_k / A_k) with their median."""
    default_tps = load_config(CONFIG, []).train.tokens_per_step
    assert default_tps != 1024
    out = tmp_path / "ab.json"
    rc = bench_train.main(["--config", CONFIG, "--steps", "3", "--warmup", "1", "--ab", "--train.tokens_per_step=1024",
                           "--repeat", "2", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    labels = [w for w in ("[A1]", "[B1]", "[B2]", "[A2]") if w in printed]
    assert labels == ["[A1]", "[B1]", "[B2]", "[A2]"]
    assert [printed.index(w) for w in labels] == sorted(printed.index(w) for w in labels)
    res = json.loads(out.read_text())
    assert res["order"] == ["A", "B", "B", "A"] and res["ab_overrides"] == ["--train.tokens_per_step=1024"]
    assert [r["tokens_per_step"] for r in res["A"]] == [default_tps, default_tps]
    assert [r["tokens_per_step"] for r in res["B"]] == [1024, 1024]
    (n, rep), = res["by_seq_len"].items()
    a = [r["by_seq_len"][n]["tokens_per_s"] for r in res["A"]]
    b = [r["by_seq_len"][n]["tokens_per_s"] for r in res["B"]]
    assert rep["ratios"] == pytest.approx([b[0] / a[0], b[1] / a[1]], rel=1e-12)
    assert rep["ratio_median"] == pytest.approx((b[0] / a[0] + b[1] / a[1]) / 2, rel=1e-12)
    assert rep["A"] == {"median": pytest.approx(sum(a) / 2), "min": min(a), "max": max(a)}
    assert "B/A" in printed


@pytest.mark.parametrize("argv, needle", [
    (["--ab", "--model.no_such_key=1"], "no_such_key"),
    (["--ab", "train.tokens_per_step=1"], "is not one"),
    (["--ab", "--train.tokens_per_step=1024", "--repeat", "0"], "--repeat must be >= 1"),
    (["--ab", "--train.tokens_per_step=1024", "--peer", "rope"], "runs no peers"),
    (["--repeat", "3"], "--repeat counts the A/B pairs of --ab"),
])
def test_ab_bad_input_is_one_clear_error_before_any_arm_runs(argv, needle, monkeypatch):
    def no_arm(*a, **k):
        raise AssertionError("an arm ran before the input was checked")
    monkeypatch.setattr(bench_train, "bench_config", no_arm)
    with pytest.raises(ConfigError, match=needle.replace("-", r"\-").replace(".", r"\.")):
        bench_train.main(["--config", CONFIG, "--steps", "3", "--warmup", "1", *argv])


def test_ab_of_kernel_options_refused_while_the_env_variable_overrides_them(monkeypatch):
    """MEGAFIRE_FUSED_CONFIGS wins over a run's attention.fused_kernels: B would run A's kernels."""
    monkeypatch.setenv("MEGAFIRE_FUSED_CONFIGS", '{"64": {"t5_band": true}}')
    with pytest.raises(ConfigError, match="MEGAFIRE_FUSED_CONFIGS"):
        bench_train.main(["--config", CONFIG, "--steps", "3", "--warmup", "1",
                          "--ab", "--attention.fused_kernels.64.t5_band=false"])
    monkeypatch.delenv("MEGAFIRE_FUSED_CONFIGS")
    assert bench_train.ab_overrides("--attention.fused_kernels.64.t5_band=false", CONFIG, []) == [
        "--attention.fused_kernels.64.t5_band=false"]
