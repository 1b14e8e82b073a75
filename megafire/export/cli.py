"""``megafire export --checkpoint RUN_DIR_or_CKPT --out DIR [--tokenizer PATH] [--overwrite]``.

Writes a Hugging Face model directory (megafire.export.export). RoPE models (scaling none,
linear, dynamic, yarn) load as plain ``LlamaForCausalLM``; every other encoding loads with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``. Exit status 2 on a
missing or unusable checkpoint.
"""
from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megafire export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory (its latest checkpoint) or a step_* directory")
    p.add_argument("--out", required=True, help="output directory (Hugging Face format)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (or its directory) if not the run's own")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="export weights holding NaN or inf (a diverged run; for forensics) instead of refusing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    from megafire.config import ConfigError

    from .export import export_checkpoint
    try:   # a bad checkpoint, tokenizer or --out: one `error:` line from megafire.cli
        export_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite,
                          allow_nonfinite=args.allow_nonfinite)
    except (FileExistsError, FileNotFoundError, ValueError, NotImplementedError) as e:
        raise ConfigError(f"megafire export: {e}") from None
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
