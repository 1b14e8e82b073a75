"""lm-eval-harness runs an exported model offline, on a local task (YAML + JSONL), and its
log-likelihoods and greedy generations equal megafire's own."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

from export_testlib import tiny_config, write_checkpoint

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'megafire[eval]'")
pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate")

ROWS = [{"context": "The sky is", "choices": ["blue", "green", "loud"], "label": 0},
        {"context": "One, two,", "choices": ["three", "seven"], "label": 0},
        {"context": "The grass is", "choices": ["red", "green"], "label": 1}]
GEN_ROWS = [{"prompt": "The pass key is 4211. The pass key is", "answer": " 4211"},
            {"prompt": "Here we go. There and back", "answer": " again."}]


def write_tasks(root):
    """Two local tasks: multiple choice (log-likelihoods) and generate_until (greedy decoding)."""
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GEN_ROWS))
    (root / "mc.yaml").write_text(textwrap.dedent(f"""\
        task: megafire_mc
        dataset_path: json
        dataset_kwargs: {{data_files: {{test: {root / 'mc.jsonl'}}}}}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{context}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{label}}}}"
        metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
        """))
    (root / "gen.yaml").write_text(textwrap.dedent(f"""\
        task: megafire_gen
        dataset_path: json
        dataset_kwargs: {{data_files: {{test: {root / 'gen.jsonl'}}}}}
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{prompt}}}}"
        doc_to_target: "{{{{answer}}}}"
        generation_kwargs: {{until: ["\\n"], max_gen_toks: 8, do_sample: false}}
        metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
        """))


def megafire_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """sum_t log p(cont_t | ...) with lm-eval's split: cont = tokens(ctx + cont)[len(tokens(ctx)):]."""
    ctx, whole = tok.encode(context), tok.encode(context + continuation)
    cont = whole[len(ctx):]
    logits = model(torch.tensor([whole[:-1]])).float().log_softmax(-1)[0, len(ctx) - 1:]
    return float(logits.gather(-1, torch.tensor(cont).unsqueeze(-1)).sum())


@torch.no_grad()
def test_lm_eval_on_export_matches_megafire(tmp_path, tokenizer_dir):
    import megafire
    from lm_eval.tasks import TaskManager
    from megafire.export import export_checkpoint
    run = write_checkpoint(tiny_config("fire", tmp_path / "run", tokenizer_dir))
    hf_dir = export_checkpoint(run, tmp_path / "hf")
    write_tasks(tmp_path)
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},trust_remote_code=True,dtype=float32,max_length=256",
        tasks=["megafire_mc", "megafire_gen"], task_manager=TaskManager(include_path=str(tmp_path),
                                                                          include_defaults=False),
        device="cpu", batch_size=2, log_samples=True)
    ours = megafire.load_checkpoint(run)
    tok = ours.tokenizer
    hits = []
    for sample in out["samples"]["megafire_mc"]:
        lls = [resp[0][0] for resp in sample["resps"]]
        mine = [megafire_loglikelihood(ours, tok, ctx, cont) for ctx, cont in sample["arguments"]]
        assert mine == pytest.approx(lls, rel=1e-5, abs=1e-4)
        hits.append(max(range(len(mine)), key=mine.__getitem__) == sample["doc"]["label"])
    assert out["results"]["megafire_mc"]["acc,none"] == pytest.approx(sum(hits) / len(hits))
    for sample in out["samples"]["megafire_gen"]:
        ids = tok.encode(sample["arguments"][0][0])
        text = tok.decode(ours.generate(torch.tensor([ids]), 8, eos_id=tok.eos_id)[0, len(ids):].tolist())
        assert sample["resps"][0][0] == text.split("\n")[0].split("</s>")[0]
