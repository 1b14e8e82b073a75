"""Length-generalization evaluation: perplexity against literal computations."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from megafire.eval.length import perplexity_by_length, window_nll

V = 11


def _toy_forward(input_ids, positions):
    """Deterministic logits that depend on the token and the position: [B, T, V]."""
    g = torch.arange(V, dtype=torch.float32)
    return torch.sin(input_ids.unsqueeze(-1).float() * 0.7 + g * 1.3) + torch.cos(positions.unsqueeze(-1).float() * 0.1 + g)


def _literal_ppl(docs, length, eos_id):
    """exp(mean NLL) over the first `length` tokens of every doc of >= longest tokens, read after an EOS."""
    total, count = 0.0, 0
    for doc in docs:
        inputs = [eos_id] + list(doc[:length - 1])
        for t in range(length):
            logits = _toy_forward(torch.tensor([[inputs[t]]]), torch.tensor([[t]]))[0, 0].double()
            total += (torch.logsumexp(logits, 0) - logits[doc[t]]).item()
            count += 1
    return math.exp(total / count)


def test_perplexity_equals_literal_formula():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, V, size=n) for n in (40, 7, 33, 64)]
    res = perplexity_by_length(_toy_forward, docs, [8, 32], eos_id=2, batch_size=2)
    long_docs = [d for d in docs if len(d) >= 32]          # the same documents at every length
    for length in (8, 32):
        assert res["num_windows"][length] == len(long_docs) == 3
        assert res["tokens"][length] == 3 * length
        assert res["perplexity"][length] == pytest.approx(_literal_ppl(long_docs, length, 2), rel=1e-6)  # fp32 logits


def test_uniform_model_has_perplexity_vocab_size():
    docs = [np.arange(50) % V]
    res = perplexity_by_length(lambda ids, pos: torch.zeros(*ids.shape, V), docs, [16, 48], eos_id=0,
                               per_position=True)
    assert res["perplexity"][16] == pytest.approx(V) and res["perplexity"][48] == pytest.approx(V)
    assert len(res["per_position_nll"][48]) == 48
    assert res["per_position_nll"][48][0] == pytest.approx(math.log(V), abs=1e-5)  # stored to 5 decimals


def test_window_nll_batching_does_not_change_values():
    ids = torch.randint(0, V, (5, 12), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(12).expand(5, 12)
    a = window_nll(_toy_forward, ids, ids.roll(-1, 1), pos, batch_size=1)
    b = window_nll(_toy_forward, ids, ids.roll(-1, 1), pos, batch_size=4)
    assert torch.equal(a, b)


def test_too_long_lengths_are_a_clear_error():
    with pytest.raises(ValueError, match="no held-out document has 100 tokens"):
        perplexity_by_length(_toy_forward, [np.zeros(20, dtype=np.int64)], [10, 100], eos_id=0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 3-step FIRE run on the embedded corpus with a small tokenizer."""
    from megafire.config import load_config
    from megafire.train import train
    root = tmp_path_factory.mktemp("evalrun")
    cfg = load_config(overrides=[
        f"--run.dir={root / 'runs' / 'fire'}", "--model.vocab_size=512", "--model.hidden_size=32",
        "--model.num_layers=1", "--model.num_heads=2", "--model.position.name=fire",
        "--model.position.options.init_L=8", "--data.seq_len=32", "--train.tokens_per_step=128",
        "--train.max_steps=3", "--tracking.enabled=true", "--train.progress=false"])
    train(cfg)
    return root / "runs" / "fire"


def test_eval_cli_writes_json_plot_and_mlflow(tiny_run, tmp_path):
    from megafire.eval.cli import eval_heldout_documents, main
    from megafire.train import load_model
    out = tmp_path / "cmp"
    assert main(["--checkpoint", str(tiny_run), "--multiples", "1,4", "--max-windows", "2", "--out", str(out)]) == 0
    report = json.loads((out / "length_generalization.json").read_text())
    assert report["train_length"] == 32 and report["lengths"] == [32, 128]
    ppl = report["results"]["fire"]
    assert set(ppl) == {"32", "128"} and all(p > 1 for p in ppl.values())
    assert (out / "length_generalization.png").stat().st_size > 1000
    # the number equals a direct computation with the model and the literal formula
    model, cfg = load_model(tiny_run, with_config=True)
    docs, eos = eval_heldout_documents(cfg)
    long_docs = [d for d in docs if len(d) >= 128][:2]
    nll = []
    with torch.no_grad():
        for d in long_docs:
            x = torch.tensor([[eos] + list(d[:127])])
            logits = model.gather_logits(model(x, torch.arange(128)))[0].double()
            nll += (torch.logsumexp(logits, -1) - logits[torch.arange(128), torch.tensor(d[:128])]).tolist()
    assert ppl["128"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    # the run's MLflow store received the perplexities
    from mlflow.tracking import MlflowClient
    run_id = json.loads((tiny_run / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_run / 'mlflow.db'}")
    metrics = client.get_run(run_id).data.metrics
    assert any(k.startswith("eval/ppl") and k.endswith("128") for k in metrics), metrics
