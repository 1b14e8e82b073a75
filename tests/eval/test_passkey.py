"""Passkey retrieval: prompt construction, scoring, the evaluation loop and the CLI outputs."""
from __future__ import annotations

import json
import random

import pytest

from megafire.eval import passkey as pk


class CharTokenizer:
    """One token per character (ids = code points): lengths are easy to reason about."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


TOK = CharTokenizer()
FIXED = len(pk.prompt_text("12345", 0, 0))
LINE = len(pk.FILLER)


@pytest.mark.parametrize("length", [FIXED, FIXED + LINE - 1, FIXED + 10 * LINE, FIXED + 10 * LINE + 7, 3000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_fills_the_length_with_whole_filler_lines(length, depth):
    p = pk.build_prompt(TOK, length, depth, "12345")
    text = TOK.decode(p.ids)
    assert length - LINE < p.length <= length                     # no room for one more line
    assert p.filler_before + p.filler_after == (length - FIXED) // LINE
    assert p.filler_before == round(depth * (p.filler_before + p.filler_after))
    assert text.startswith(pk.INTRO) and text.endswith(pk.QUESTION)
    assert text.count("12345") == 2 and text.count(pk.NEEDLE.format(key="12345")) == 1
    needle_at = text.index(pk.NEEDLE.format(key="12345"))
    assert needle_at == len(pk.INTRO) + p.filler_before * LINE   # the needle sits at its depth


def test_depth_extremes_and_bad_arguments():
    p0, p1 = (pk.build_prompt(TOK, 2000, d, "777") for d in (0.0, 1.0))
    assert TOK.decode(p0.ids).startswith(pk.INTRO + pk.NEEDLE.format(key="777"))
    assert TOK.decode(p1.ids).endswith(pk.NEEDLE.format(key="777") + pk.QUESTION)
    with pytest.raises(ValueError, match="too short"):
        pk.build_prompt(TOK, FIXED - 1, 0.5, "12345")
    with pytest.raises(ValueError, match="depth"):
        pk.build_prompt(TOK, 2000, 1.5, "12345")


def test_random_passkeys_have_the_digits_asked_for():
    rng = random.Random(0)
    keys = [pk.random_passkey(rng, 5) for _ in range(200)]
    assert all(len(k) == 5 and k.isdigit() and k[0] != "0" for k in keys) and len(set(keys)) > 150


@pytest.mark.parametrize("continuation,correct", [
    (" 12345.", True), ("12345", True), (" 12345 is the pass key", True), ("\n12345\n", True),
    (" 1234", False), (" 123456", False), (" 54321", False), (" the key", False), ("", False),
    (" 12 345", False), (" 99 12345", False)])
def test_scoring_takes_the_first_run_of_digits(continuation, correct):
    assert pk.score(continuation, "12345") is correct


def oracle(limit=None):
    """A 'model' that reads the key out of the prompt -- while the prompt is at most `limit` long."""
    def generate(ids, max_new_tokens):
        text = TOK.decode(ids)
        key = text.split("The pass key is ")[1].split(".")[0]
        answer = f" {key}." if limit is None or len(ids) <= limit else " 0."
        return TOK.encode(answer)[:max_new_tokens]
    return generate


def test_evaluate_counts_hits_per_length_and_depth():
    lengths, depths = [400, 800, 1600], [0.0, 0.5, 1.0]
    result = pk.evaluate_passkey(oracle(limit=900), TOK, lengths, depths, trials=3, digits=4, seed=1)
    assert result["accuracy"] == {400: {0.0: 1.0, 0.5: 1.0, 1.0: 1.0}, 800: {0.0: 1.0, 0.5: 1.0, 1.0: 1.0},
                                  1600: {0.0: 0.0, 0.5: 0.0, 1.0: 0.0}}
    assert result["mean_accuracy"] == {400: 1.0, 800: 1.0, 1600: 0.0}
    assert len(result["records"]) == 27 and all(len(r["passkey"]) == 4 for r in result["records"])
    again = pk.evaluate_passkey(oracle(limit=900), TOK, lengths, depths, trials=3, digits=4, seed=1)
    assert [r["passkey"] for r in again["records"]] == [r["passkey"] for r in result["records"]]
    table = pk.format_table(result)
    assert "1600" in table and table.splitlines()[-1].split()[1:] == ["1.00", "1.00", "0.00"]


def test_outputs_json_and_heatmap(tmp_path):
    result = pk.evaluate_passkey(oracle(), TOK, [400, 800], [0.0, 1.0], trials=2)
    json_path, png_path = pk.write_outputs(result, tmp_path / "out", "test")
    data = json.loads(json_path.read_text())
    assert data["accuracy"] == {"400": {"0": 1.0, "1": 1.0}, "800": {"0": 1.0, "1": 1.0}} and data["overall"] == 1.0
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def tiny_run(tmp_path):
    """A random 2-layer FIRE model saved in the trainer's layout, with a real tokenizer."""
    import torch
    from megafire.config import load_config
    from megafire.data.corpus import Document, load_corpus
    from megafire.data.tokenizer import train_tokenizer
    from megafire.model import GPT
    from megafire.parallel import init_parallel
    docs = [Document(d.id, d.title, d.text[:20_000]) for d in load_corpus("default", "train")[:6]]
    train_tokenizer(docs, tmp_path / "tok", vocab_size=384)
    run = tmp_path / "run"
    cfg = load_config(None, {"run": {"dir": str(run)}, "data": {"seq_len": 64, "tokenizer_dir": str(tmp_path / "tok")},
                             "model": {"vocab_size": 384, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                                       "position": {"name": "fire", "options": {"init_L": 32}}},
                             "train": {"tokens_per_step": 64},
                             "tracking": {"enabled": True, "experiment": "passkey-test"}})
    ckpt = run / "checkpoints" / "step_00000004"
    (ckpt / "ds").mkdir(parents=True)
    gpt = GPT(cfg.model, cfg.attention, init_parallel(1, 1), seed=0)
    torch.save({"module": {f"model.{k}": v for k, v in gpt.state_dict().items()}}, ckpt / "ds" / "mp_rank_00_model_states.pt")
    cfg.save(ckpt / "config.yaml")
    cfg.save(run / "config.yaml")
    (ckpt / "meta.json").write_text(json.dumps({"step": 4, "tp": 1, "pp": 1}))
    return run


def test_cli_writes_outputs_and_logs_to_mlflow(tiny_run, capsys):
    assert pk.main(["--checkpoint", str(tiny_run), "--lengths", "200,260", "--depths", "0,1", "--trials", "1",
                    "--digits", "3"]) == 0
    out_dir = tiny_run / "eval" / "passkey"
    data = json.loads((out_dir / "passkey.json").read_text())
    assert set(data["accuracy"]) == {"200", "260"} and (out_dir / "passkey.png").is_file()
    assert all(r["prompt_tokens"] <= r["length"] for r in data["records"])
    assert "depth \\ length" in capsys.readouterr().out
    from megafire.tracking import open_run
    tracker = open_run(tiny_run)
    metrics = tracker.client.get_run(tracker.run_id).data.metrics
    assert "passkey/mean" in metrics and "passkey/len200/depth0" in metrics


def test_cli_error_on_missing_checkpoint(tmp_path, capsys):
    assert pk.main(["--checkpoint", str(tmp_path / "nope")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
