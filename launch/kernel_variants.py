"""A copy of the package with some of the fused kernels' exact changes undone, for A/B timing in one
device call (``launch/device_speed.sh relaxed``): ``python3 launch/kernel_variants.py DEST [CHANGE ...]``
copies megafire/, configs/, launch/ and pyproject.toml to DEST and undoes each CHANGE in DEST's
megafire/attention/fused/_kernels.py. Run DEST's code with ``PYTHONPATH=DEST`` (and cwd DEST).

Changes (session 9, untimed when made; docs/kernels.md "Session 9"):
  relaxed  the parameter-sum atomics with ``sem="relaxed"``; undone: Triton's default ``acq_rel``
  pair     two row-vector sums in one ``tl.reduce`` (one shared-memory pass); undone: two ``tl.sum``

Each undo is a literal replacement that must match exactly once: if the code has moved on, this says so
instead of timing something else.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = Path("megafire/attention/fused/_kernels.py")

UNDO = {
    "relaxed": [('mask=lanes == idx, sem="relaxed")', "mask=lanes == idx)"),
                ('mask=lanes < NS, sem="relaxed")', "mask=lanes < NS)")],
    "pair": [("return tl.reduce((a, b), 0, _add_pair)", "return tl.sum(a, 0), tl.sum(b, 0)")],
}


def undo(text: str, change: str) -> str:
    for new, old in UNDO[change]:
        n = text.count(new)
        if n != 1:
            raise SystemExit(f"kernel_variants: {change!r}: {new!r} occurs {n} times in {KERNELS} (expected 1)")
        text = text.replace(new, old)
    return text


def main(argv: list[str]) -> int:
    if not argv or any(c not in UNDO for c in argv[1:]):
        print(__doc__, file=sys.stderr)
        print(f"changes: {', '.join(UNDO)}", file=sys.stderr)
        return 2
    dest = Path(argv[0]).resolve()
    if dest == ROOT or dest in ROOT.parents or ROOT in dest.parents:   # DEST is emptied first
        raise SystemExit(f"kernel_variants: DEST {dest} is, holds or lies inside the repository")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in ("megafire", "configs", "launch"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    text = (dest / KERNELS).read_text()
    for change in argv[1:]:
        text = undo(text, change)
    (dest / KERNELS).write_text(text)
    print(f"kernel_variants: {dest} with {', '.join(argv[1:]) or 'nothing'} undone")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
