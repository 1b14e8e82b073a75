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
NAME = "compile_cache.tgz"   # the first part; the others compile_cache.1.tgz, ...
#: one file back from $OUT may hold 16 MiB, at most 8 files a call, and the carry is 64 MiB with the tree
#: (~15 MiB with the wheels): three parts of <= 15 MiB
MAX_BYTES = 15 * 2**20
MAX_PARTS = 3
#: Triton's intermediate forms: no cache lookup reads them (a hit needs a kernel's metadata JSON and binary)
SKIP = (".ttir", ".ttgir", ".llir", ".ptx", ".source")
#: what goes first when not everything fits: Triton's kernels (the megafire kernels' compiles are the longest),
#: then inductor's compiled graphs, then the rest (generated sources, autotune picks)
RANK = {"triton": 0, "fxgraph": 1, "aotautograd": 1}


def _part(i: int) -> str:
    return NAME if i == 0 else NAME.replace(".tgz", f".{i}.tgz")


def _groups(root: Path) -> list[list[Path]]:
    """The cache's files in the order they are carried; one Triton kernel's files stay together (a group
    missing its binary would be a failed lookup, not a miss). Lock files are per process: never carried."""
    groups: dict[tuple[str, ...], list[Path]] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name == "lock" or p.name.endswith((".lock", ".tmp") + SKIP):
            continue
        rel = p.relative_to(root).parts
        groups.setdefault(rel[:2] if rel[0] == "triton" else rel, []).append(p)
    return sorted(groups.values(), key=lambda g: (RANK.get(g[0].relative_to(root).parts[0], 2), str(g[0])))


def save(out_dir: str) -> int:
    if not ROOT.is_dir():
        print(f"devcache: nothing to save ({ROOT} absent)")
        return 0
    # the call brings back at most 8 files: the cache takes the room the call's own results leave
    room = min(MAX_PARTS, 8 - sum(1 for p in Path(out_dir).rglob("*") if p.is_file()))
    if room <= 0:
        print(f"devcache: {out_dir} already holds 8 files (a call's limit); not saved")
        return 0
    groups, parts, kept = _groups(ROOT), [], 0
    raw = tar = None
    for g in groups:
        need = sum(p.stat().st_size + 1024 for p in g)   # as if incompressible, with the tar headers
        if tar is not None and raw.tell() + need > MAX_BYTES - 2**16:   # 64 KiB: the archive's end blocks
            tar.close()
            raw.close()
            tar = None
        if tar is None:
            if len(parts) == room:
                break
            parts.append(Path(out_dir) / _part(len(parts)))
            raw = open(parts[-1], "wb")
            tar = tarfile.open(fileobj=raw, mode="w:gz", compresslevel=6)
        for p in g:
            tar.add(p, arcname=str(p.relative_to(ROOT.parent)))
        tar.fileobj.flush()   # a sync flush: raw.tell() is then the part's compressed size so far
        kept += 1
    if tar is not None:
        tar.close()
        raw.close()
    sizes = [p.stat().st_size for p in parts]
    while parts and sizes[-1] > MAX_BYTES:   # one group over the limit alone: not carried
        parts.pop().unlink()
        sizes.pop()
    print(f"devcache: {kept} of {len(groups)} kernels / graphs / files in {len(parts)} part(s), "
          f"{sum(sizes) / 2**20:.1f} MiB -> {out_dir}" + (" (the rest did not fit)" if kept < len(groups) else ""))
    return 0


def _parts_in(d: Path) -> list[Path]:
    return [d / _part(i) for i in range(MAX_PARTS) if (d / _part(i)).is_file()]


def restore(src_dir: str) -> int:
    parts = _parts_in(Path(src_dir))
    if not parts:
        print(f"devcache: no {Path(src_dir) / NAME}; cold compiles")
        return 0
    n = 0
    for src in parts:
        with tarfile.open(src, "r:gz") as tar:
            names = tar.getnames()
            if any(not name.startswith(ROOT.name + "/") for name in names):
                print(f"devcache: {src} holds paths outside {ROOT.name}/; ignored", file=sys.stderr)
                continue
            tar.extractall(ROOT.parent, filter="data")
            n += len(names)
    print(f"devcache: {n} files restored under {ROOT}")
    return 0


def keep(files_at: str, dest: Path | None = None) -> int:
    parts = _parts_in(Path(files_at))
    if not parts:
        print(f"devcache: no {Path(files_at) / NAME} (the call saved none); .devcache/ unchanged", file=sys.stderr)
        return 1
    dest = dest or Path(__file__).resolve().parent.parent / ".devcache"
    new = dest.with_name(dest.name + ".new")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    for p in parts:
        shutil.copyfile(p, new / p.name)
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    new.rename(dest)   # a cut copy never replaces a good cache, and no stale part of an older call stays
    shutil.rmtree(old, ignore_errors=True)
    size = sum(p.stat().st_size for p in dest.iterdir())
    print(f"devcache: {dest} ({len(parts)} part(s), {size / 2**20:.1f} MiB); carry .devcache")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("verb", choices=("save", "restore", "keep"))
    ap.add_argument("dir")
    a = ap.parse_args(argv)
    return {"save": save, "restore": restore, "keep": keep}[a.verb](a.dir)


if __name__ == "__main__":
    sys.exit(main())
