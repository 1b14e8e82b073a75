"""train.encoding_fp32 (the study's precision ablation, fire_enc_fp32): under DeepSpeed bf16 +
ZeRO-1 the position encoding's own parameters stay fp32 (init, every step, checkpoint, resume)
while every other parameter is bf16; the layouts where that was not checked are refused."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))   # the trainer tests' tiny config

import _train_util  # noqa: E402

from megafire.config import ConfigError, load_config  # noqa: E402

TINY = _train_util._merge(_train_util.TINY, {
    "curriculum": {"stages": [{"seq_len": 16, "tokens": 10_000}]},
    "train": {"max_steps": 4, "warmup_tokens": 128, "precision": "bf16", "encoding_fp32": True},
    "parallel": {"zero_stage": 1},
})


def _cfg(run_dir, **train):
    over = {**TINY, "run": {"dir": str(run_dir)}, "train": {**TINY["train"], **train}}
    return load_config(None, over)


def _is_encoding(name: str) -> bool:
    return ".encoding." in name


class Watch:
    """The model's parameters at construction (fp32, before DeepSpeed) and after every step."""

    def __init__(self):
        self.init, self.steps = {}, []

    def model_factory(self, cfg, ctx):
        from megafire.train.components import build_model
        model = build_model(cfg, ctx)
        self.init = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model

    def callback(self, trainer, record):
        self.steps.append({"loss": record["loss"],
                           "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()}})


def _train(cfg, watch=None, callbacks=()):
    from megafire.train.loop import train
    watch = watch or Watch()
    train(cfg, callbacks=[watch.callback, *callbacks], model_factory=watch.model_factory)
    return watch


def test_encoding_parameters_keep_their_fp32_values(tmp_path):
    """lr = 1e-30 (an Adam update far below fp32's resolution at these values): nothing moves,
    so after the run the encoding's parameters are their fp32 init
    bit for bit (bf16 would have rounded them: c = 0.1 is not a bf16 number) and every other
    parameter is its init rounded to bf16."""
    watch = _train(_cfg(tmp_path / "run", lr=1e-30))
    last = watch.steps[-1]["params"]
    enc = [n for n in last if _is_encoding(n)]
    assert enc and len(enc) < len(last)
    for n, p in last.items():
        if _is_encoding(n):
            assert p.dtype == torch.float32 and torch.equal(p, watch.init[n]), n
        else:
            assert p.dtype == torch.bfloat16 and torch.equal(p, watch.init[n].to(torch.bfloat16)), n
    assert any(not torch.equal(watch.init[n].bfloat16().float(), watch.init[n]) for n in enc)


def test_fp32_encoding_trains_resumes_and_is_saved_exactly(tmp_path):
    """Every step: encoding parameters fp32, the rest bf16; the checkpoint's fp32 master copy
    equals the module's encoding parameters; a run killed after step 3 and resumed (from step 2) reproduces
    the uninterrupted loss trace; the trace differs from plain bf16 (the switch does something)."""
    from megafire.train.load import load_state_dict
    full = _train(_cfg(tmp_path / "full"))
    for step in full.steps:
        assert {str(p.dtype) for n, p in step["params"].items() if _is_encoding(n)} == {"torch.float32"}
        assert {str(p.dtype) for n, p in step["params"].items() if not _is_encoding(n)} == {"torch.bfloat16"}
    _, master = load_state_dict(tmp_path / "full")
    for n, p in full.steps[-1]["params"].items():
        if _is_encoding(n):
            assert torch.equal(master[n], p), n

    class Crash(RuntimeError):
        pass

    def crash_after_3(trainer, record):      # the checkpoint of step 2 is the latest
        if record["step"] == 3:
            raise Crash
    run = tmp_path / "killed"
    with pytest.raises(Crash):
        _train(_cfg(run, checkpoint_every_steps=2), callbacks=[crash_after_3])
    resumed = _train(_cfg(run, checkpoint_every_steps=2, resume=True))
    assert [s["loss"] for s in resumed.steps] == [s["loss"] for s in full.steps[2:]]

    plain = _train(_cfg(tmp_path / "plain", encoding_fp32=False))
    assert [s["loss"] for s in plain.steps] != [s["loss"] for s in full.steps]
    assert all(p.dtype == torch.bfloat16 for p in plain.steps[-1]["params"].values())


@pytest.mark.parametrize("over", [{"train": {"precision": "fp32"}}, {"parallel": {"zero_stage": 2}}])
def test_encoding_fp32_refused_where_unchecked(tmp_path, over):
    raw = {**TINY, "run": {"dir": str(tmp_path)}}
    raw = {**raw, **{k: {**raw.get(k, {}), **v} for k, v in over.items()}}
    with pytest.raises(ConfigError, match="train.encoding_fp32"):
        load_config(None, raw)


def test_evaluation_keeps_the_encoding_fp32(tmp_path):
    """megafire.study.evaluate builds the run's GPT in bf16 on a GPU; for an encoding_fp32 run the
    encoding's parameters are then put back to the checkpoint's fp32 values, the rest stays bf16."""
    from megafire.export.load import build_gpt
    from megafire.model import GPT
    from megafire.parallel import init_parallel
    from megafire.study.evaluate import keep_encoding_fp32
    cfg = _cfg(tmp_path)
    state = {k: v for k, v in GPT.from_config(cfg, init_parallel(1, 1)).state_dict().items()
             if not k.endswith("_extra_state")}
    gpt = build_gpt(cfg, state, dtype=torch.bfloat16)
    keep_encoding_fp32(gpt, state)
    params = dict(gpt.named_parameters())
    assert any(_is_encoding(n) for n in params)
    for n, p in params.items():
        if _is_encoding(n):
            assert p.dtype == torch.float32 and torch.equal(p, state[n]), n
        else:
            assert p.dtype == torch.bfloat16, n
