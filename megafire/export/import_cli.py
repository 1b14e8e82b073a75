"""``megafire import DIR --out RUN_DIR [--overwrite]``.

Turns a Hugging Face directory written by ``megafire export`` back into a megafire run
directory (checkpoint layout of megafire.train.checkpoint; weights bit-identical to the
exported checkpoint; no optimizer state). Exit status 2 on an unusable directory.
"""
from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megafire import", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", help="Hugging Face model directory (from megafire export)")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace checkpoints already in --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    from megafire.config import ConfigError

    from .importer import import_export
    try:   # an unusable export or --out: one `error:` line from megafire.cli
        path = import_export(args.hf_dir, args.out, overwrite=args.overwrite)
    except (FileExistsError, FileNotFoundError, KeyError, ValueError) as e:
        raise ConfigError(f"megafire import: {e}") from None
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
