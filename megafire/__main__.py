"""``python -m megafire ...`` is ``megafire ...`` (megafire.cli)."""
import sys

from megafire.cli import main

if __name__ == "__main__":
    sys.exit(main())
