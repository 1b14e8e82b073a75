"""``megafire bench {attention,train,rotary,overhead,resources,tiles} ...``."""
from __future__ import annotations

import importlib
import sys

BENCHES = {"attention": "megafire.bench.attention", "train": "megafire.bench.train",
           "rotary": "megafire.bench.rotary", "overhead": "megafire.bench.overhead",
           "resources": "megafire.bench.resources", "tiles": "megafire.bench.tiles"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHES:
        print(f"usage: megafire bench {{{','.join(BENCHES)}}} [args]", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHES[argv[0]]).main(argv[1:]) or 0)
