"""One entry point: ``megafire {prep, train, eval, export, import, bench, demo} ...``.

Each subcommand lives with the layer it belongs to and exposes ``main(argv)``; this file
only dispatches, so importing the CLI stays cheap (no torch/DeepSpeed for ``--help``).
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "prep": ("megafire.data.prep", "build a tokenizer or webdataset shards"),
    "train": ("megafire.train.cli", "train a model with DeepSpeed (--config FILE --section.key=value ...)"),
    "eval": ("megafire.eval.cli", "length-generalization perplexity / passkey retrieval"),
    "export": ("megafire.export.cli", "export a checkpoint to Hugging Face format"),
    "import": ("megafire.export.import_cli", "import a Hugging Face export back into a megafire checkpoint"),
    "bench": ("megafire.bench.cli", "benchmarks (attention kernels, training throughput)"),
    "demo": ("megafire.demo", "the CPU demo: every encoding family trained and evaluated end to end"),
}


def usage() -> str:
    lines = ["usage: megafire <command> [args]", "", "commands:"]
    lines += [f"  {name:<8} {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"megafire: unknown command {name!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
