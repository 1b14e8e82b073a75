"""A tiny study on CPU: the embedded corpus cut down, a 384-piece tokenizer, a 2-layer GPT."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BASE = """model: {vocab_size: 384, hidden_size: 32, num_layers: 2, num_heads: 2, position: {name: rope, options: {}}}
attention: {backend: reference}
data: {corpus: default, reset_positions: true}
curriculum: {stages: [{seq_len: 32, tokens: 2048}]}
train: {max_steps: 4, tokens_per_step: 512, micro_batch_tokens: 256, lr: 1.0e-2, warmup_tokens: 512,
        precision: fp32, progress: false}
parallel: {zero_stage: 0}
tracking: {enabled: false}
"""
PLAN = """tokens: 1536
concurrency: 3
seeds: [1]
arms:
  fire: {config: fire.yaml, seeds: [1, 2]}
  rope: {config: rope.yaml, eval_scalings: [none, linear, yarn]}
data: {tokenizer_dir: data/tok, shards_dir: data/unpacked/train, shards_archive: data/shards.tar.xz}
eval:
  sets: {prose: data/eval/prose, code: data/eval/code}
  multiples: [1, 2, 4, 8]
  max_windows: 2
  batch_size: 2
  passkey_multiples: [8]
  passkey_depths: [0.0, 1.0]
  passkey_trials: 1
"""


def make_study(root: Path) -> Path:
    """Data (tokenizer, shards packed as the study's xz archive, two held-out sets), configs and
    a plan under ``root``; returns the plan path. Data paths are relative to ``root``."""
    from megafire.data.corpus import Document, load_corpus, write_corpus
    from megafire.data.prep import prep_shards, prep_tokenizer
    sys.path.insert(0, str(ROOT / "data_prep"))
    from build_study_data import pack_shards
    data = root / "data"
    docs = load_corpus("default")
    train = [Document(f"t{i}", d.title, d.text[:6000], {}) for i, d in enumerate(docs[:24])]
    write_corpus(train, data / "corpus" / "c.jsonl.gz", eval_ids=[])
    tok = prep_tokenizer(data / "corpus", data / "tok", 384, "bpe")
    prep_shards(data / "corpus", tok, data / "shards" / "train", num_shards=2, num_workers=1, progress=False)
    pack_shards(data / "shards", data / "shards.tar.xz")
    for name, picked in (("prose", docs[30:32]), ("code", docs[40:42])):
        held = [Document(f"{name}{i}", d.title, d.text[:3000], {}) for i, d in enumerate(picked)]
        write_corpus(held, data / "eval" / name / "h.jsonl.gz", eval_ids=[d.id for d in held])
    cfg = root / "cfg"
    cfg.mkdir()
    (cfg / "base.yaml").write_text(BASE)
    (cfg / "fire.yaml").write_text("base: base.yaml\nmodel: {position: {name: fire, options: {init_L: 8.0}}}\n")
    (cfg / "rope.yaml").write_text("base: base.yaml\n")
    (cfg / "plan.yaml").write_text(PLAN)
    return cfg / "plan.yaml"
