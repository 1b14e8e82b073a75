"""Every shipped config loads, resolves its curriculum for common GPU counts, and the arms
differ from their base only in model.position (and run naming)."""
from pathlib import Path

import pytest

from megafire.config import load_config
from megafire.train.curriculum import Curriculum

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ARMS = sorted((CONFIGS / "arms").glob("*.yaml"))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")) + ARMS, ids=lambda p: p.name)
def test_config_resolves(path):
    cfg = load_config(path)
    for dp in ((1,) if "cpu" in path.name else (1, 2, 4, 8)):
        c = Curriculum.from_config(cfg, dp_size=dp)
        assert c.stages[-1].end_step == cfg.train.max_steps
        for s in c.stages:
            assert s.micro_batch_size * s.seq_len * c.grad_accum * dp == cfg.train.tokens_per_step
    if cfg.model.position.name == "fire":   # FIRE's L must not exceed the training length (DESIGN.md)
        assert cfg.model.position.options["init_L"] <= cfg.train_length


def test_demo_is_cpu_sized_with_a_two_stage_curriculum():
    cfg = load_config(CONFIGS / "demo-cpu.yaml")
    assert cfg.train.precision == "fp32" and [s.seq_len for s in cfg.curriculum.stages] == [64, 128]
    assert 100 <= cfg.train.max_steps <= 1000


@pytest.mark.parametrize("arm", ARMS, ids=lambda p: p.name)
def test_arm_differs_from_base_only_in_position(arm):
    size = arm.name.split("-")[0]
    base, cfg = load_config(CONFIGS / f"gpt-{size}.yaml").flat(), load_config(arm).flat()
    differing = {k for k in set(base) | set(cfg) if base.get(k) != cfg.get(k)}
    assert differing and all(k.startswith(("model.position.", "run.")) for k in differing), differing


def test_one_arm_per_encoding():
    from megafire.positional import ENCODINGS
    for size in ("125m", "350m"):
        names = {load_config(a).model.position.name for a in ARMS if a.name.startswith(size)}
        assert names == set(ENCODINGS)
