"""A tiny study on CPU: the embedded corpus cut down, a 384-piece tokenizer, a 2-layer GPT.

Arms as the real plan's: fire (2 seeds) and rope (the published first study, FIRST_ARMS),
then the later ablations (LATER_JOBS, as launch/device_study_call3.sh selects them): a second
seed of the learning-rate ablation, its half-budget run (``tokens: 0.5x``), the precision arm."""
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
FIRST_ARMS = "fire,rope,fire_lr10-s1"
LATER_JOBS = "fire_lr10-s2,fire_lr10_half,fire_enc_fp32"
PLAN = """tokens: 1536
concurrency: 3
seeds: [1]
arms:
  fire: {config: fire.yaml, seeds: [1, 2]}
  fire_lr10: {config: fire_lr10.yaml, seeds: [1, 2], ablation: "encoding parameters at 10x the rate"}
  fire_lr10_half: {config: fire_lr10.yaml, tokens: 0.5x, baseline: fire_lr10, ablation: "half the tokens"}
  fire_enc_fp32: {config: fire_enc_fp32.yaml, ablation: "encoding parameters fp32 under bf16"}
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
    (cfg / "fire_lr10.yaml").write_text("base: fire.yaml\ntrain: {encoding_lr_scale: 10.0}\n")
    # the study's base is bf16 + ZeRO-1 (this tiny one fp32 + ZeRO-0): the precision arm sets all three
    (cfg / "fire_enc_fp32.yaml").write_text("base: fire.yaml\ntrain: {precision: bf16, encoding_fp32: true}\n"
                                            "parallel: {zero_stage: 1}\n")
    (cfg / "plan.yaml").write_text(PLAN)
    return cfg / "plan.yaml"
