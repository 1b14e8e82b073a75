"""Carry the compile caches (inductor's and Triton's) from one lent GPU machine to the next.

Every device call starts on a bare machine, and the GPU suite and the trainer benches spend most of a
call compiling (Triton's and inductor's compiles on the host: the same kernels, call after call). The
caches of one call come back as one file under $OUT, are kept here in ``.devcache/`` (ignored by git)
and travel with the next call (``carry: [".whl", ".devcache"]``); ``launch/device_setup.sh`` restores
them. Compiled code only: a cache hit changes no number (the benches time warm steps after warm-up).

Triton's cache records its files by absolute path, so both ends use the same fixed directories:
``TORCHINDUCTOR_CACHE_DIR=/tmp/inductor`` and ``TRITON_CACHE_DIR=/tmp/inductor/triton``.

    python3 launch/devcache.py save $OUT          # on the device, at the end of a call
    python3 launch/devcache.py restore .devcache  # on the device, by device_setup.sh
    python3 launch/devcache.py keep FILES_AT      # here, after a call: FILES_AT/compile_cache.tgz -> .devcache/
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(os.environ.get("DEVCACHE_ROOT", "/tmp/inductor"))   # TORCHINDUCTOR_CACHE_DIR (device_setup.sh)
NAME = "compile_cache.tgz"
#: one file back from $OUT may hold 16 MiB (the device's limit); the carry is 64 MiB with the tree
MAX_BYTES = 15 * 2**20
#: what a tarball may drop when it is too large, in order (the first loses least: Triton's own
#: intermediate forms, which no cache lookup needs, then inductor's generated sources)
SKIPPABLE = ((".ttir", ".ttgir", ".llir", ".ptx", ".source"), (".py", ".cpp"))


def _members(root: Path, skip: tuple[str, ...]) -> list[Path]:
    # lock files and partial writes are per process: never carried
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith((".lock", ".tmp"))
                  and "lock" != p.name and not p.name.endswith(skip))


def save(out_dir: str) -> int:
    if not ROOT.is_dir():
        print(f"devcache: nothing to save ({ROOT} absent)")
        return 0
    dest = Path(out_dir) / NAME
    skip: tuple[str, ...] = ()
    for level in range(len(SKIPPABLE) + 1):
        files = _members(ROOT, skip)
        with tarfile.open(dest, "w:gz", compresslevel=6) as tar:
            for p in files:
                tar.add(p, arcname=str(p.relative_to(ROOT.parent)))
        size = dest.stat().st_size
        if size <= MAX_BYTES:
            print(f"devcache: {len(files)} files, {size / 2**20:.1f} MiB -> {dest}"
                  + (f" (without {', '.join(skip)})" if skip else ""))
            return 0
        if level < len(SKIPPABLE):
            skip = skip + SKIPPABLE[level]
    dest.unlink()
    print(f"devcache: over {MAX_BYTES / 2**20:.0f} MiB even without {', '.join(skip)}; not saved")
    return 0


def restore(src_dir: str) -> int:
    src = Path(src_dir) / NAME
    if not src.is_file():
        print(f"devcache: no {src}; cold compiles")
        return 0
    with tarfile.open(src, "r:gz") as tar:
        names = tar.getnames()
        if any(not n.startswith(ROOT.name + "/") for n in names):
            print(f"devcache: {src} holds paths outside {ROOT.name}/; ignored", file=sys.stderr)
            return 0
        tar.extractall(ROOT.parent, filter="data")
    print(f"devcache: {len(names)} files restored under {ROOT}")
    return 0


def keep(files_at: str, dest: Path | None = None) -> int:
    src = Path(files_at) / NAME
    if not src.is_file():
        print(f"devcache: no {src} (the call saved none); .devcache/ unchanged", file=sys.stderr)
        return 1
    dest = dest or Path(__file__).resolve().parent.parent / ".devcache"
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / (NAME + ".part")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest / NAME)   # atomic: a cut copy never replaces a good cache
    print(f"devcache: {dest / NAME} ({(dest / NAME).stat().st_size / 2**20:.1f} MiB); carry .devcache")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("verb", choices=("save", "restore", "keep"))
    ap.add_argument("dir")
    a = ap.parse_args(argv)
    return {"save": save, "restore": restore, "keep": keep}[a.verb](a.dir)


if __name__ == "__main__":
    sys.exit(main())
