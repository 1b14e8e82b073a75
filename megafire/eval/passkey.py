"""Passkey retrieval: can the model fetch a number hidden at depth d of a context of length n?

The task of Mohtashami & Jaggi (2023), as used for length generalization (FIRE paper,
arXiv 2310.04418, Section 4.2). The prompt is

    INTRO + FILLER * a + NEEDLE(key) + FILLER * b + QUESTION

with ``a + b`` the largest number of filler lines for which the tokenized prompt still fits
in ``n`` tokens, and ``a = round(d * (a + b))`` (d = 0: right after the intro; d = 1: right
before the question). The model decodes greedily ``len(tokens(" " + key)) + 2`` tokens; a
trial is correct iff the first run of digits in the decoded text equals the key:

    accuracy(n, d) = (1 / trials) * sum_t [ first_digits(decode(greedy(prompt_t))) == key_t ]

Keys are uniform ``digits``-digit numbers (no leading zero) from a seeded RNG, so runs are
repeatable and every (n, d) cell sees different keys. The prompt starts at position 0, as
training documents do.

CLI: ``megafire eval passkey --checkpoint PATH [--lengths 256,512] [--depths 0,0.5,1] ...``
writes ``passkey.json`` and ``passkey.png`` (heatmap), prints the table, and logs to the
run's MLflow run when its tracking is enabled.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

from megafire.config import ConfigError

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
_DIGITS = re.compile(r"\d+")

# generate(prompt ids, max_new_tokens) -> the new token ids only
GenerateFn = Callable[[list[int], int], list[int]]


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class PasskeyPrompt:
    ids: list[int]
    passkey: str
    target_length: int
    depth: float
    filler_before: int       # filler lines before the needle (a)
    filler_after: int        # and after it (b)

    @property
    def length(self) -> int:
        return len(self.ids)


def prompt_text(passkey: str, before: int, after: int) -> str:
    return INTRO + FILLER * before + NEEDLE.format(key=passkey) + FILLER * after + QUESTION


def _split(total: int, depth: float) -> tuple[int, int]:
    before = int(round(depth * total))
    return before, total - before


def build_prompt(tokenizer: TextTokenizer, length: int, depth: float, passkey: str) -> PasskeyPrompt:
    """The longest prompt (in whole filler lines) of at most ``length`` tokens, needle at ``depth``."""
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"depth must be in [0, 1], got {depth}")
    fixed = len(tokenizer.encode(prompt_text(passkey, 0, 0)))
    if fixed > length:
        raise ConfigError(f"length {length} is too short for a passkey prompt: it needs at least {fixed} tokens")
    per_line = len(tokenizer.encode(FILLER * 16)) / 16
    total = max(0, int((length - fixed) / per_line) + 1)        # a guess from above; shrink to fit
    while True:
        before, after = _split(total, depth)
        ids = tokenizer.encode(prompt_text(passkey, before, after))
        if len(ids) <= length or total == 0:
            return PasskeyPrompt(ids, passkey, length, depth, before, after)
        total -= 1


def random_passkey(rng: random.Random, digits: int) -> str:
    if digits < 1:
        raise ConfigError(f"digits must be >= 1, got {digits}")
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def extract_passkey(text: str) -> Optional[str]:
    """The first run of digits in the model's continuation (None if it produced none)."""
    match = _DIGITS.search(text)
    return match.group(0) if match else None


def score(continuation: str, passkey: str) -> bool:
    return extract_passkey(continuation) == passkey


def new_tokens_for(tokenizer: TextTokenizer, passkey: str) -> int:
    """Enough greedy steps for " <key>" plus a little slack (a stray space or period)."""
    return len(tokenizer.encode(" " + passkey)) + 2


def evaluate_passkey(generate: GenerateFn, tokenizer: TextTokenizer, lengths: Sequence[int],
                     depths: Sequence[float] = DEFAULT_DEPTHS, trials: int = 5, digits: int = 5,
                     seed: int = 0, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Accuracy per (length, depth) over ``trials`` keys; see the module docstring.

    Returns ``{"accuracy": {n: {d: acc}}, "mean_accuracy": {n: acc}, "overall": acc,
    "records": [per-trial dicts], "settings": {...}}``.
    """
    rng = random.Random(seed)
    accuracy: dict[int, dict[float, float]] = {}
    records = []
    for n in lengths:
        accuracy[int(n)] = {}
        for d in depths:
            hits = 0
            for t in range(trials):
                key = random_passkey(rng, digits)
                prompt = build_prompt(tokenizer, int(n), float(d), key)
                out = tokenizer.decode(generate(prompt.ids, new_tokens_for(tokenizer, key)))
                ok = score(out, key)
                hits += ok
                records.append({"length": int(n), "depth": float(d), "trial": t, "passkey": key,
                                "prompt_tokens": prompt.length, "output": out, "correct": bool(ok)})
            accuracy[int(n)][float(d)] = hits / trials
            if progress:
                progress(f"length {n} depth {d:.2f}: {hits}/{trials}")
    means = {n: sum(row.values()) / len(row) for n, row in accuracy.items()}
    return {"accuracy": accuracy, "mean_accuracy": means, "overall": sum(means.values()) / len(means),
            "records": records,
            "settings": {"lengths": [int(n) for n in lengths], "depths": [float(d) for d in depths],
                         "trials": trials, "digits": digits, "seed": seed}}


def format_table(result: dict) -> str:
    """Rows: depths; columns: lengths; last row: the mean over depths."""
    lengths = sorted(result["accuracy"])
    depths = sorted({d for row in result["accuracy"].values() for d in row})
    lines = ["depth \\ length " + "".join(f"{n:>9}" for n in lengths)]
    for d in depths:
        lines.append(f"{d:>14.0%} " + "".join(f"{result['accuracy'][n][d]:>9.2f}" for n in lengths))
    lines.append(f"{'mean':>14} " + "".join(f"{result['mean_accuracy'][n]:>9.2f}" for n in lengths))
    return "\n".join(lines)


# --- running it on a checkpoint ---------------------------------------------------------------
def model_generate_fn(model, eos_id: Optional[int] = None) -> GenerateFn:
    """Greedy KV-cache decoding of a ``megafire.load_checkpoint`` model as a :data:`GenerateFn`."""
    import torch

    def generate(ids: list[int], max_new_tokens: int) -> list[int]:
        x = torch.tensor([ids], dtype=torch.long, device=model.device)
        return model.generate(x, max_new_tokens, eos_id=eos_id)[0, len(ids):].tolist()
    return generate


def _json_ready(result: dict) -> dict:
    """JSON keys are strings: lengths as integers, depths as decimals."""
    out = dict(result)
    out["accuracy"] = {str(n): {f"{d:g}": a for d, a in row.items()} for n, row in result["accuracy"].items()}
    out["mean_accuracy"] = {str(n): a for n, a in result["mean_accuracy"].items()}
    return out


def write_outputs(result: dict, out_dir: Path, title: str) -> tuple[Path, Path]:
    """passkey.json and passkey.png (heatmap) under ``out_dir``."""
    from megafire.eval.plots import plot_passkey_heatmap
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "passkey.json", out_dir / "passkey.png"
    tmp = json_path.with_name(".passkey.json.tmp")
    tmp.write_text(json.dumps(_json_ready(result), indent=1) + "\n")
    tmp.replace(json_path)
    plot_passkey_heatmap(result["accuracy"], png_path, title=title)
    return json_path, png_path


def log_to_mlflow(result: dict, run_dir: Path, files: Sequence[Path], step: Optional[int]) -> bool:
    """Metrics ``passkey/len{n}/depth{d}``, ``passkey/len{n}/mean``, ``passkey/mean`` and the files,
    into the training run's MLflow run (megafire.tracking), if its tracking is enabled."""
    from megafire.tracking import open_run
    tracker = open_run(run_dir)
    if not tracker.enabled:
        return False
    metrics = {f"passkey/len{n}/depth{d:g}": a for n, row in result["accuracy"].items() for d, a in row.items()}
    metrics.update({f"passkey/len{n}/mean": a for n, a in result["mean_accuracy"].items()})
    metrics["passkey/mean"] = result["overall"]
    tracker.log_metrics(metrics, step=int(step or 0))
    for path in files:
        tracker.log_artifact(path, "eval/passkey")
    return True


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megafire eval passkey", description="Passkey retrieval accuracy by context "
                                "length and needle depth (greedy decoding).")
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoints/step_* or a megafire HF export")
    p.add_argument("--lengths", default="", help="comma-separated context lengths in tokens "
                   "(default: 1, 2, 4, 8 x the training length)")
    p.add_argument("--depths", default=",".join(f"{d:g}" for d in DEFAULT_DEPTHS), help="needle depths in [0, 1]")
    p.add_argument("--trials", type=int, default=5, help="keys per (length, depth)")
    p.add_argument("--digits", type=int, default=5, help="digits of the passkey")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="output directory (default: <run dir>/eval/passkey, else ./passkey)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default=None, help="attention.backend override (auto, reference, sdpa, fused)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="evaluate weights holding NaN or inf (a diverged run; for forensics) instead of refusing")
    return p


def _run_dir_and_step(path: Path) -> tuple[Optional[Path], Optional[int]]:
    from megafire.export.checkpoint import CheckpointError, resolve_checkpoint
    try:
        info = resolve_checkpoint(path)
    except CheckpointError:
        return None, None                     # an HF export: no run to log into
    return info.run_dir, info.meta.get("step")


def _lengths(args, cfg) -> list[int]:
    """--lengths, or 1, 2, 4, 8 x the training length; minus those a learned table cannot reach."""
    lengths = [int(v) for v in _floats(args.lengths)] or [m * cfg.train_length for m in (1, 2, 4, 8)]
    if cfg.model.position.name == "learned":
        limit = int(cfg.model.position.options.get("max_positions", cfg.model.max_positions))
        if any(n > limit for n in lengths):
            print(f"[passkey] skipping lengths beyond the learned position table ({limit}): "
                  f"{[n for n in lengths if n > limit]}", file=sys.stderr)
            lengths = [n for n in lengths if n <= limit]
    return lengths


def run(args) -> int:
    import megafire
    checkpoint = Path(args.checkpoint)
    model = megafire.load_checkpoint(checkpoint, device=args.device, backend=args.backend,
                                     allow_nonfinite=getattr(args, "allow_nonfinite", False))
    if model.tokenizer is None:
        raise FileNotFoundError(f"no tokenizer found for {checkpoint}")
    cfg = model.config
    lengths = _lengths(args, cfg)
    if not lengths:
        raise ConfigError("no context length to evaluate")
    build_prompt(model.tokenizer, min(lengths), 0.0, "9" * args.digits)   # fail before decoding if too short
    result = evaluate_passkey(model_generate_fn(model, model.tokenizer.eos_id), model.tokenizer, lengths,
                              _floats(args.depths), args.trials, args.digits, args.seed,
                              progress=lambda s: print(f"[passkey] {s}", file=sys.stderr, flush=True))
    run_dir, step = _run_dir_and_step(checkpoint)
    out_dir = Path(args.out) if args.out else (run_dir / "eval" / "passkey" if run_dir else Path("passkey"))
    name = cfg.model.position.name + (f" ({run_dir.name})" if run_dir else "")
    files = write_outputs(result, out_dir, title=f"Passkey retrieval: {name}")
    print(format_table(result))
    print(f"[passkey] wrote {files[0]} and {files[1]}", file=sys.stderr)
    if run_dir is not None and not args.no_tracking and log_to_mlflow(result, run_dir, files, step):
        print("[passkey] logged to MLflow", file=sys.stderr)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    import torch.distributed as dist
    from megafire.cli import EXIT_ERROR, error_line
    ours = not dist.is_initialized()     # load_checkpoint may start a one-process group: close it at exit
    try:
        return run(args)
    except ConfigError as e:   # bad input (a missing or damaged checkpoint, a bad value); bugs keep their traceback
        print(error_line(e), file=sys.stderr)
        return EXIT_ERROR
    finally:
        if ours and dist.is_initialized():
            from megafire.parallel import destroy_parallel
            destroy_parallel()


if __name__ == "__main__":
    sys.exit(main())
