"""train.encoding_lr_scale: the position encodings' own parameters in their own param groups,
whose rate set_lr scales every step (ablation (a) of the length-generalization study)."""
import types

import pytest
import torch

from megafire.config import ConfigError
from megafire.train.components import encodings_of
from megafire.train.engine import param_groups, set_lr
from megafire.train.loop import train

from _train_util import tiny_config


def _gpt(tmp_path, name="fire", shared=False):
    from megafire.model import GPT
    from megafire.parallel import init_parallel
    cfg = tiny_config(tmp_path, {"model": {"position": {"options": {"shared": shared}}}})
    if name != "fire":
        cfg.model.position.name, cfg.model.position.options = name, {}
    return GPT.from_config(cfg, init_parallel(1, 1))


@pytest.mark.parametrize("shared", [False, True])
def test_groups_hold_exactly_the_encoding_parameters(tmp_path, shared):
    model = _gpt(tmp_path, shared=shared)
    enc_ids = {id(p) for e in encodings_of(model).values() for p in e.parameters()}
    assert enc_ids, "FIRE has parameters"
    plain = param_groups(model, 0.1)
    assert len(plain) == 2 and all("lr_scale" not in g for g in plain)    # the old layout at 1.0
    groups = param_groups(model, 0.1, encoding_lr_scale=10.0)
    scaled = [p for g in groups if g.get("lr_scale") == 10.0 for p in g["params"]]
    rest = [p for g in groups if "lr_scale" not in g for p in g["params"]]
    assert {id(p) for p in scaled} == enc_ids
    assert len(scaled) + len(rest) == len(list(model.parameters()))
    # decay follows the same rule in both sets: matrices decay, scalars (c, L) and biases do not
    for g in groups:
        assert all((p.dim() >= 2) == (g["weight_decay"] > 0) for p in g["params"])


def test_encoding_without_parameters_adds_no_group(tmp_path):
    assert len(param_groups(_gpt(tmp_path, "alibi"), 0.1, encoding_lr_scale=10.0)) == 2


def test_set_lr_respects_the_scale(tmp_path):
    groups = param_groups(_gpt(tmp_path), 0.1, encoding_lr_scale=4.0)
    engine = types.SimpleNamespace(optimizer=torch.optim.AdamW(groups, lr=1.0))
    set_lr(engine, 2e-3)
    assert sorted(g["lr"] for g in engine.optimizer.param_groups) == pytest.approx([2e-3, 2e-3, 8e-3, 8e-3])


def test_zero1_bf16_run_trains_encoding_at_scaled_rate(tmp_path):
    """Through DeepSpeed's ZeRO-1 bf16 optimizer: the lr_scale key survives its wrapping, and
    each step's rate of the encoding groups is the schedule's times the scale."""
    seen = []

    def spy(trainer, record):
        seen.append(sorted({round(g["lr"] / record["lr"], 6) for g in trainer.engine.optimizer.param_groups}))
    cfg = tiny_config(tmp_path / "run", {"train": {"max_steps": 2, "precision": "bf16", "encoding_lr_scale": 5.0},
                                         "parallel": {"zero_stage": 1}})
    train(cfg, callbacks=[spy])
    assert seen == [[1.0, 5.0], [1.0, 5.0]]


def test_scale_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="encoding_lr_scale"):
        tiny_config(tmp_path, {"train": {"encoding_lr_scale": 0.0}})
