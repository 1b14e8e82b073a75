"""Evaluation of one finished study run: perplexity vs length on each held-out set, passkey.

``evaluate_run(run_dir, plan)`` -> ``run_dir/eval/study_eval.json``::

    {"run", "encoding", "train_length", "lengths", "device", "dtype", "settings",
     "perplexity": {variant: {set: {L: ppl}}},          variant: none | linear | yarn
     "num_windows": {set: N}, "doc_tokens": {set: [...]},
     "passkey": {variant: {"mean_accuracy": {L: acc}, "accuracy": {L: {depth: acc}}}},
     "seconds": wall time}

Perplexity is megafire.eval.length's (each window starts at a document start); every length
scores prefixes of the *same* documents, those of at least the longest length. A scaled
RoPE variant is the trained weights with ``model.position.options`` set to ``scaling`` with
``factor = L / train_length`` (``original_max_positions = train_length``) for evaluation
length ``L > train_length``: inference-time only, the way users extend RoPE models; at
``L <= train_length`` the factor is 1 and the variant is the unscaled model (its number is
copied, not recomputed). Weights are evaluated in bf16 on CUDA (as trained) and fp32 on CPU; a
run trained with ``train.encoding_fp32`` keeps its encoding's parameters fp32 (as trained).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from .plan import Plan

RESULT = "study_eval.json"


def variant_options(scaling: str, factor: float, train_length: int) -> dict:
    """model.position.options of RoPE evaluated with ``scaling`` at ``factor`` (>= 1)."""
    if scaling == "none" or factor <= 1.0:
        return {}
    if scaling == "linear":
        return {"scaling": "linear", "factor": float(factor)}
    return {"scaling": "yarn", "factor": float(factor), "original_max_positions": int(train_length)}


class RunModels:
    """The run's weights, built into a GPT per position-options variant (cached by options)."""

    def __init__(self, run_dir: Path, device: str):
        from megafire.train.load import load_state_dict
        self.cfg, self.state = load_state_dict(run_dir)
        self.device = device
        self.dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        self._cache: dict[str, torch.nn.Module] = {}

    def get(self, options: dict):
        key = json.dumps(options, sort_keys=True)
        if key not in self._cache:
            from megafire.export.load import build_gpt
            cfg = copy.deepcopy(self.cfg)
            cfg.model.position.options = {**cfg.model.position.options, **options}
            if len(self._cache) >= 12:   # RoPE: 1 + 2 scalings x 4 factors; others: 1
                self._cache.clear()
            gpt = build_gpt(cfg, self.state, dtype=self.dtype)
            if cfg.train.encoding_fp32:
                keep_encoding_fp32(gpt, self.state)
            self._cache[key] = gpt.to(self.device).eval()
        return self._cache[key]


def keep_encoding_fp32(gpt: torch.nn.Module, state: dict) -> None:
    """A run trained with ``train.encoding_fp32`` is evaluated as trained: the encodings' own
    parameters back to their fp32 values from the (fp32) checkpoint state, the rest as built."""
    from megafire.train.components import encodings_of
    for path, enc in encodings_of(gpt).items():
        for name, p in enc.named_parameters():
            p.data = state[f"{path}.{name}"].to(device=p.device, dtype=torch.float32)


def heldout_tokens(set_dir: Path, tokenizer, min_tokens: int, max_docs: int) -> list[np.ndarray]:
    """Token arrays of the held-out documents with at least ``min_tokens`` tokens (file order)."""
    from megafire.data.corpus import load_corpus
    docs = [np.asarray(tokenizer.encode(d.text), dtype=np.int64) for d in load_corpus(set_dir, split="eval")]
    return [d for d in docs if len(d) >= min_tokens][:max_docs]


def _perplexities(models: RunModels, scaling: str, docs: list, lengths: list[int], train_length: int,
                  eos_id: int, batch_size: int, base: dict | None) -> dict[int, float]:
    from megafire.eval.length import perplexity_by_length
    out = {}
    for length in lengths:
        factor = length / train_length
        if base is not None and factor <= 1.0:
            out[length] = base[length]
            continue
        gpt = models.get(variant_options(scaling, factor, train_length))

        def forward(ids, pos, gpt=gpt):
            return gpt.gather_logits(gpt(ids.to(models.device), pos.to(models.device)))
        res = perplexity_by_length(forward, docs, [length], eos_id=eos_id, batch_size=batch_size)
        out[length] = res["perplexity"][length]
    return out


def _passkey(models: RunModels, scaling: str, tokenizer, lengths: list[int], train_length: int, plan: Plan,
             base: dict | None) -> dict:
    from megafire.eval.passkey import evaluate_passkey
    from megafire.model import generate
    accuracy, means = {}, {}
    for length in lengths:
        if base is not None and length <= train_length:
            accuracy[length], means[length] = base["accuracy"][length], base["mean_accuracy"][length]
            continue
        gpt = models.get(variant_options(scaling, length / train_length, train_length))

        def gen(ids, max_new, gpt=gpt):
            x = torch.tensor([ids], dtype=torch.long, device=models.device)
            return generate(gpt, x, max_new, eos_id=tokenizer.eos_id)[0, len(ids):].tolist()
        # seed per length: every variant sees the same keys at the same length
        res = evaluate_passkey(gen, tokenizer, [length], plan.eval.passkey_depths, plan.eval.passkey_trials,
                               plan.eval.passkey_digits, seed=length)
        accuracy[length], means[length] = res["accuracy"][length], res["mean_accuracy"][length]
    return {"accuracy": accuracy, "mean_accuracy": means}


def evaluate_run(run_dir: str | Path, plan: Plan, scalings: list[str], device: str) -> dict:
    """Evaluate the run (see the module docstring) and write ``run_dir/eval/study_eval.json``."""
    from megafire.data.tokenizer import Tokenizer
    t0 = time.time()
    run_dir = Path(run_dir)
    models = RunModels(run_dir, device)
    cfg = models.cfg
    train_length = cfg.train_length
    lengths = [m * train_length for m in plan.eval.multiples]
    tokenizer = Tokenizer(plan.data.tokenizer_dir)
    if cfg.model.position.name != "rope":
        scalings = ["none"]
    sets = {name: heldout_tokens(path, tokenizer, max(lengths), plan.eval.max_windows)
            for name, path in plan.eval.sets.items()}
    empty = [n for n, d in sets.items() if not d]
    if empty:
        raise ValueError(f"held-out set(s) {empty} have no document of {max(lengths)} tokens")
    ppl, passkey, errors = {}, {}, {}
    pk_lengths = [m * train_length for m in plan.eval.passkey_multiples]
    for scaling in scalings:                  # "none" first: the scaled variants copy its 1x numbers
        base = None if scaling == "none" else ppl["none"]
        ppl[scaling] = {name: _perplexities(models, scaling, docs, lengths, train_length, tokenizer.eos_id,
                                            plan.eval.batch_size, base and base[name])
                        for name, docs in sets.items()}
    for scaling in scalings if pk_lengths else []:
        try:           # a passkey failure must not cost the perplexities: record it and go on
            passkey[scaling] = _passkey(models, scaling, tokenizer, pk_lengths, train_length, plan,
                                        None if scaling == "none" else passkey.get("none"))
        except Exception as e:  # noqa: BLE001
            errors[f"passkey/{scaling}"] = f"{type(e).__name__}: {e}"
            print(f"[study] passkey {scaling} failed: {errors[f'passkey/{scaling}']}", flush=True)
    result = {"run": run_dir.name, "encoding": cfg.model.position.name, "train_length": train_length,
              "lengths": lengths, "device": str(device), "dtype": str(models.dtype).replace("torch.", ""),
              "settings": plan.eval.settings(), "perplexity": ppl,
              "num_windows": {n: len(d) for n, d in sets.items()},
              "doc_tokens": {n: [int(len(x)) for x in d] for n, d in sets.items()},
              "passkey": passkey, "errors": errors, "seconds": round(time.time() - t0, 2)}
    out = run_dir / "eval" / RESULT
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    return result
