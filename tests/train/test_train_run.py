"""One short run: metrics.jsonl fields, run-directory layout, progress lines, weights loading,
ZeRO-1; and configuration errors that must stop a run before it trains."""
import io
import math

import pytest
import torch

from megafire.config import ConfigError
from megafire.train.components import DataBundle
from megafire.train.loop import train
from megafire.train.metrics import Progress, read_metrics
from megafire.train.synthetic import SyntheticBatches

from _train_util import tiny_config

FIELDS = {"step", "tokens", "loss", "lr", "seq_len", "micro_batch_size", "stage", "tokens_per_s", "step_time_s",
          "grad_norm", "mfu"}


def capture_final_weights(store):
    def callback(trainer, record):
        if record["step"] == trainer.cfg.train.max_steps:
            store.update({k: v.detach().float().clone() for k, v in trainer.model.state_dict().items()
                          if torch.is_tensor(v)})
    return callback


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_run_metrics_layout_and_load(tmp_path, zero_stage):
    run = tmp_path / "run"
    final = {}
    cfg = tiny_config(run, {"train": {"max_steps": 4}, "parallel": {"zero_stage": zero_stage}})
    result = train(cfg, callbacks=[capture_final_weights(final)])
    assert result.steps == 4 and result.tokens == 4 * 128
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert FIELDS <= set(r)
        assert r["tokens"] == r["step"] * 128 and r["tokens_per_s"] > 0 and math.isfinite(r["loss"])
        assert r["grad_norm"] is not None and r["grad_norm"] > 0
        assert r["mfu"] is None                                     # CPU: no known peak
        fire = {k for k in r if k.startswith("pos/")}
        assert fire == {f"pos/blocks.{i}.attn.encoding/{v}" for i in range(2) for v in ("c", "L")}
    assert records[-1]["lr"] == pytest.approx(1e-3)                # min_lr_ratio 0.1 of 1e-2 at the end
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "latest").is_file()

    from megafire.parallel import destroy_parallel
    from megafire.train import load_model
    try:
        model, loaded_cfg = load_model(run, with_config=True)
        assert loaded_cfg.model == cfg.model and loaded_cfg.run.dir == str(run)
        state = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
        assert set(state) == set(final)
        for k, v in final.items():
            assert torch.equal(state[k].float(), v), k
    finally:
        destroy_parallel()


def test_progress_plain_lines_when_not_a_tty():
    out = io.StringIO()
    p = Progress(10, 0, stream=out, plain_every_s=0.0)
    for step in range(10):
        p.update(step, 2.5, 1000.0)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue()
    assert lines[-1].startswith("[train] step 10/10 (100.0%) loss 2.5000 tokens/s 1,000") and "eta 00:00" in lines[-1]


def test_refuses_to_overwrite_a_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="train.resume=true"):
        train(tiny_config(run))


def test_vocab_mismatch_fails_before_training(tmp_path):
    run = tmp_path / "run"

    def data_with_other_tokenizer(cfg, ctx):
        return DataBundle(SyntheticBatches(64), tokenizer_sha256="ab" * 32, tokenizer_vocab_size=80)

    with pytest.raises(ConfigError, match=r"model.vocab_size=64 .* 80 pieces"):
        train(tiny_config(run), data_factory=data_with_other_tokenizer)
    assert not (run / "metrics.jsonl").exists()


@pytest.mark.parametrize("argv,msg", [
    (["--train.lrr=1"], "unknown config key"),
    (["--train.precision=bf16", "--parallel.zero_stage=0"], "zero_stage >= 1"),
    (["--train.tokens_per_step=100"], "tokens_per_step"),
    (["--parallel.zero_stage=5"], "allowed: 0, 1, 2, 3"),
    (["--ds-config", "/nonexistent.json"], "does not exist"),
    (["--attention.backend=on"], "'attention.backend' must be a string, got True (YAML reads a bare"),
])
def test_cli_bad_config(tmp_path, capsys, argv, msg):
    import yaml
    from _train_util import TINY

    from megafire.cli import main
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "run": {"dir": str(tmp_path / "run")}}))
    assert main(["train", "--config", str(config), *argv]) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]   # progress lines may come first when the error is found at set-up
    assert last.startswith("error:") and msg in last and "Traceback" not in err
