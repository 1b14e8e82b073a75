"""LR by tokens against a literal transcription of the formula, and curriculum properties."""
import math

import pytest

from megafire.config import ConfigError
from megafire.train.curriculum import Curriculum
from megafire.train.schedule import lr_at_step, lr_at_tokens

from _train_util import tiny_config


def literal_lr(tau, eta, W, N, r):
    # warm-up: eta * tau / W; then eta_min + (eta - eta_min) (1 + cos(pi p)) / 2, p = (tau - W) / (N - W)
    if tau < W:
        return eta * tau / W
    p = min(max((tau - W) / (N - W), 0.0), 1.0)
    return r * eta + (eta - r * eta) * (1 + math.cos(math.pi * p)) / 2


@pytest.mark.parametrize("W", [0, 1000, 4096])
def test_lr_matches_literal_formula(W):
    N, eta, r = 100 * 512, 3e-4, 0.1
    for step in range(100):
        tau = (step + 1) * 512
        got = lr_at_tokens(tau, peak_lr=eta, warmup_tokens=W, total_tokens=N, min_lr_ratio=r)
        assert got == pytest.approx(literal_lr(tau, eta, W, N, r), rel=1e-12, abs=1e-18)
    assert lr_at_tokens(N, peak_lr=eta, warmup_tokens=W, total_tokens=N, min_lr_ratio=r) == pytest.approx(r * eta)
    assert lr_at_tokens(W, peak_lr=eta, warmup_tokens=W, total_tokens=N, min_lr_ratio=r) == pytest.approx(eta)


def test_lr_at_step_uses_config(tmp_path):
    cfg = tiny_config(tmp_path, {"train": {"max_steps": 10, "tokens_per_step": 128, "warmup_tokens": 256,
                                           "lr": 1e-3, "min_lr_ratio": 0.0}})
    assert lr_at_step(0, cfg) == pytest.approx(0.5e-3)
    assert lr_at_step(1, cfg) == pytest.approx(1e-3)
    assert lr_at_step(9, cfg) == pytest.approx(0.0, abs=1e-15)


def curriculum(stages, tps=1024, micro=512, dp=1, max_steps=20):
    return Curriculum(stages, tokens_per_step=tps, micro_batch_tokens=micro, dp_size=dp, max_steps=max_steps)


def test_stage_boundaries_and_constant_tokens_per_step():
    c = curriculum([(64, 4 * 1024), (128, 5 * 1024 - 10), (256, 1024)], max_steps=20)
    # ceil: 4 steps, then ceil(4.99) = 5 steps, then the last stage runs to max_steps
    assert [(s.first_step, s.end_step) for s in c.stages] == [(0, 4), (4, 9), (9, 20)]
    expected = [64] * 4 + [128] * 5 + [256] * 11
    assert [c.stage_at(i).seq_len for i in range(20)] == expected
    for i in range(20):
        s = c.stage_at(i)
        assert s.seq_len * s.micro_batch_size * c.grad_accum * c.dp_size == 1024
    assert c.grad_accum == 2 and c.stage_at(0).micro_batch_size == 8 and c.stage_at(19).micro_batch_size == 2
    with pytest.raises(ValueError):
        c.stage_at(20)


def test_stage_is_pure_and_truncated_by_max_steps():
    c = curriculum([(64, 4 * 1024), (128, 100 * 1024), (256, 1024)], max_steps=10)
    assert [s.seq_len for s in c.stages] == [64, 128]      # the third stage is never reached
    assert c.stages[-1].end_step == 10
    again = curriculum([(64, 4 * 1024), (128, 100 * 1024), (256, 1024)], max_steps=10)
    assert [again.stage_at(i) for i in range(10)] == [c.stage_at(i) for i in range(10)]


def test_dp_and_accumulation():
    c = curriculum([(64, 1024)], tps=4096, micro=512, dp=2)
    assert c.grad_accum == 4 and c.stage_at(0).micro_batch_size == 8


def test_lr_continuous_across_stage_change(tmp_path):
    cfg = tiny_config(tmp_path, {"train": {"max_steps": 40, "warmup_tokens": 0}})
    c = Curriculum.from_config(cfg, dp_size=1)
    change = c.stages[1].first_step
    lrs = [lr_at_step(i, cfg) for i in range(40)]
    jumps = [abs(lrs[i + 1] - lrs[i]) for i in range(39)]
    # one step's change at the boundary is no larger than the largest change elsewhere
    assert jumps[change - 1] <= max(jumps) + 1e-15
    assert abs(lrs[change] - lrs[change - 1]) < 0.1 * cfg.train.lr


@pytest.mark.parametrize("bad,msg", [
    ({"train": {"micro_batch_tokens": 48}}, "micro_batch_tokens"),
    ({"curriculum": {"stages": [{"seq_len": 128, "tokens": 256}]}, "train": {"micro_batch_tokens": 64}}, "seq_len"),
])
def test_curriculum_errors_name_the_keys(tmp_path, bad, msg):
    cfg = tiny_config(tmp_path, bad)
    with pytest.raises(ConfigError, match=msg):
        Curriculum.from_config(cfg, dp_size=1)
