"""``megafire eval``: length-generalization perplexity of one or more runs, in one plot.

    megafire eval --checkpoint RUN_DIR [--checkpoint RUN_DIR ...] --lengths 128,256,512
    megafire eval --checkpoint RUN_DIR --multiples 1,2,4,8,16      (x the run's training length)
    megafire eval passkey ...                                      (megafire.eval.passkey)

Writes ``{out}/length_generalization.json``::

    {"train_length": T, "lengths": [...],
     "results": {run_name: {length: perplexity}},
     "details": {run_name: {"run_dir", "encoding", "num_windows", "tokens", ...}}}

and ``{out}/length_generalization.png`` (log perplexity against length, one line per run,
the training length marked). With tracking on, both go into each run's MLflow run as
artifacts and the perplexities as metrics ``eval/ppl@L``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from megafire.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megafire eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", action="append", required=True,
                   help="run directory or checkpoint directory (repeat to compare runs)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--lengths", help="comma-separated evaluation lengths in tokens")
    g.add_argument("--multiples", help="comma-separated multiples of the training length (default: eval.length_multiples)")
    p.add_argument("--out", help="output directory (default: the first run's directory)")
    p.add_argument("--name", action="append", help="display name per --checkpoint (default: the encoding)")
    p.add_argument("--max-windows", type=int, help="documents per length (default: eval.max_windows)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--per-position", action="store_true", help="also store the mean NLL at every position")
    p.add_argument("--no-tracking", action="store_true", help="do not log to the runs' MLflow stores")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="evaluate weights holding NaN or inf (a diverged run; for forensics) instead of refusing")
    return p


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"megafire eval: {flag} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ConfigError(f"megafire eval: {flag} needs positive integers, got {text!r}")
    return values


def eval_heldout_documents(cfg) -> tuple[list, int]:
    """The run's held-out documents tokenized with the run's tokenizer -> (token arrays, eos_id)."""
    import numpy as np

    from megafire.data.corpus import load_corpus
    from megafire.data.tokenizer import Tokenizer
    from megafire.train.data_adapter import data_paths
    tokenizer = Tokenizer(data_paths(cfg)[0])
    docs = load_corpus(cfg.data.corpus, split="eval")
    return [np.asarray(tokenizer.encode(d.text), dtype=np.int64) for d in docs], tokenizer.eos_id


def evaluate_run(path: str, lengths: list[int] | None, multiples: list[int] | None, args) -> dict:
    from megafire.train import load_model

    from .length import perplexity_by_length
    model, cfg = load_model(path, device=args.device, with_config=True, allow_nonfinite=args.allow_nonfinite)
    train_length = cfg.train_length
    if lengths is None:
        lengths = [m * train_length for m in (multiples or cfg.eval.length_multiples)]
    docs, eos_id = eval_heldout_documents(cfg)

    def forward(input_ids, positions):
        return model.gather_logits(model(input_ids.to(args.device), positions.to(args.device)))

    res = perplexity_by_length(forward, docs, lengths, eos_id=eos_id, batch_size=args.batch_size,
                               max_windows=args.max_windows or cfg.eval.max_windows, per_position=args.per_position)
    res.update(run_dir=str(cfg.run.dir), encoding=cfg.model.position.name, train_length=train_length)
    return res


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "passkey":
        from .passkey import main as passkey_main
        return passkey_main(argv[1:])
    args = build_parser().parse_args(argv)
    lengths = _int_list(args.lengths, "--lengths") if args.lengths else None
    multiples = _int_list(args.multiples, "--multiples") if args.multiples else None
    if args.name and len(args.name) != len(args.checkpoint):
        raise ConfigError("megafire eval: give one --name per --checkpoint")
    results, details = {}, {}
    for i, path in enumerate(args.checkpoint):
        res = evaluate_run(path, lengths, multiples, args)
        name = args.name[i] if args.name else res["encoding"]
        if name in results:
            name = f"{name}#{i}"
        results[name] = res["perplexity"]
        details[name] = {k: v for k, v in res.items() if k != "perplexity"}
        table = "  ".join(f"{L}:{p:.2f}" for L, p in res["perplexity"].items())
        print(f"{name:<14} ppl  {table}", flush=True)
    train_lengths = sorted({d["train_length"] for d in details.values()})
    out = Path(args.out or details[next(iter(details))]["run_dir"])
    write_report(out, results, details, train_lengths[-1])
    if not args.no_tracking:
        log_to_runs(out, details)
    return 0


def write_report(out: Path, results: dict, details: dict, train_length: int) -> tuple[Path, Path]:
    from .plots import plot_length_generalization
    out.mkdir(parents=True, exist_ok=True)
    lengths = sorted({int(L) for r in results.values() for L in r})
    report = {"train_length": train_length, "lengths": lengths, "results": results, "details": details}
    js = out / "length_generalization.json"
    tmp = js.with_name(js.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(js)
    png = plot_length_generalization(results, train_length, out / "length_generalization.png")
    print(f"wrote {js} and {png}")
    return js, png


def log_to_runs(out: Path, details: dict) -> None:
    """Each run's MLflow run receives its perplexities and the comparison artifacts."""
    from megafire.tracking import open_run
    report = json.loads((out / "length_generalization.json").read_text())
    for name, d in details.items():
        tracker = open_run(d["run_dir"])
        if not tracker.enabled:
            continue
        tracker.log_metrics({f"eval/ppl@{L}": p for L, p in report["results"][name].items()}, step=0)
        tracker.log_artifact(out / "length_generalization.json", "eval")
        tracker.log_artifact(out / "length_generalization.png", "eval")
        tracker.end()
