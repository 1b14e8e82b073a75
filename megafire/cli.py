"""One entry point: ``megafire {prep, train, eval, export, import, bench, demo} ...``.

Each subcommand lives with the layer it belongs to and exposes ``main(argv)``; this file
only dispatches, so importing the CLI stays cheap (no torch/DeepSpeed for ``--help``).

Expected errors (:class:`megafire.config.ConfigError` and its subclasses: a bad config key or
value, a missing file or checkpoint, an unreadable corpus) print one ``error: ...`` line on
stderr and exit 2, here and nowhere else; any other exception is a bug and keeps its traceback.
Under torchrun each failing rank prints its own line, tagged with its rank.
"""
from __future__ import annotations

import importlib
import os
import sys

EXIT_ERROR = 2

COMMANDS = {
    "prep": ("megafire.data.prep", "build a tokenizer or webdataset shards"),
    "train": ("megafire.train.cli", "train a model with DeepSpeed (--config FILE --section.key=value ...)"),
    "eval": ("megafire.eval.cli", "length-generalization perplexity / passkey retrieval"),
    "export": ("megafire.export.cli", "export a checkpoint to Hugging Face format"),
    "import": ("megafire.export.import_cli", "import a Hugging Face export back into a megafire checkpoint"),
    "bench": ("megafire.bench.cli", "benchmarks (attention kernels, training throughput)"),
    "demo": ("megafire.demo", "the CPU demo: every encoding family trained and evaluated end to end"),
    "study": ("megafire.study.cli", "the length-generalization study: every arm trained, evaluated, reported"),
}


def usage() -> str:
    lines = ["usage: megafire <command> [args]", "", "commands:"]
    lines += [f"  {name:<8} {doc}" for name, (_, doc) in COMMANDS.items()]
    lines += ["", "megafire <command> --help: that command's options (megafire train --help: every config key)"]
    return "\n".join(lines)


def error_line(err: BaseException) -> str:
    """``error: <message>`` on one line (``error: [rank R] ...`` when several ranks run)."""
    message = " ".join(str(err).split()) or type(err).__name__
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"error: [rank {os.environ.get('RANK', '?')}] {message}" if world > 1 else f"error: {message}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"megafire: unknown command {name!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    import warnings
    # megatron-core warns at import that optional CUDA packages are absent, and per layer that
    # tp_group will be mandatory; neither is actionable here and they bury the progress lines.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*tp_group is None.*")
    from megafire.config import ConfigError
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except ConfigError as e:
        sys.stderr.write(error_line(e) + "\n")   # one write: ranks sharing a pipe do not interleave
        sys.stderr.flush()
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
