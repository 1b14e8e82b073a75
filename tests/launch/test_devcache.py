"""launch/devcache.py: the compile caches survive a save / keep / restore round trip byte for byte, a
tarball over the size limit drops the intermediate forms first, and a tarball holding paths outside the
cache root is refused (nothing is written outside it)."""
import importlib.util
import os
import tarfile
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("devcache", Path(__file__).parents[2] / "launch" / "devcache.py")


def _load(root: Path):
    os.environ["DEVCACHE_ROOT"] = str(root)
    try:
        mod = importlib.util.module_from_spec(SPEC)
        SPEC.loader.exec_module(mod)
    finally:
        del os.environ["DEVCACHE_ROOT"]
    return mod


def _fill(root: Path) -> dict[str, bytes]:
    files = {"fxgraph/ab/key1": os.urandom(3000), "triton/K1/kern.cubin": os.urandom(5000),
             "triton/K1/kern.json": b'{"name": "kern"}', "triton/K1/__grp__kern.json": b'{"child_paths": {}}',
             "7x/c7xabc.py": b"# generated\n" * 50}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "triton" / "K1" / "lock").write_bytes(b"")       # per process: not carried
    (root / "triton" / "K1" / "kern.ptx").write_bytes(b"//")  # intermediate form: not carried
    return files


def test_round_trip(tmp_path):
    root = tmp_path / "dev1" / "inductor"
    files = _fill(root)
    out, files_at, keep_dir = tmp_path / "out", tmp_path / "back", tmp_path / "repo" / ".devcache"
    out.mkdir()
    dc = _load(root)
    assert dc.save(str(out)) == 0
    files_at.mkdir()
    (files_at / dc.NAME).write_bytes((out / dc.NAME).read_bytes())
    (keep_dir).mkdir(parents=True)
    (keep_dir / "compile_cache.1.tgz").write_bytes(b"stale part of an older call")
    assert dc.keep(str(files_at), keep_dir) == 0
    assert sorted(p.name for p in keep_dir.iterdir()) == [dc.NAME]   # the stale part is gone
    # the next machine: the same fixed root, empty before the restore
    root2 = tmp_path / "dev2" / "inductor"
    dc2 = _load(root2)
    assert dc2.restore(str(keep_dir)) == 0
    got = {str(p.relative_to(root2)): p.read_bytes() for p in root2.rglob("*") if p.is_file()}
    assert got == files


def _names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_parts_and_priority_when_over_the_limit(tmp_path):
    """Kernels first, then graphs, then the rest; a kernel's files never split across parts or dropped alone;
    what no part can hold is dropped last-ranked first."""
    root = tmp_path / "inductor"
    for k in range(4):   # four incompressible 6 kB kernels: two per 15 kB part
        (root / "triton" / f"K{k}").mkdir(parents=True)
        (root / "triton" / f"K{k}" / "k.cubin").write_bytes(os.urandom(5000))
        (root / "triton" / f"K{k}" / "k.json").write_bytes(os.urandom(1000))
    (root / "fxgraph" / "g").mkdir(parents=True)
    (root / "fxgraph" / "g" / "entry").write_bytes(os.urandom(6000))
    (root / "zz").mkdir()
    (root / "zz" / "code.py").write_bytes(os.urandom(9000))   # fits no part after the graph
    out = tmp_path / "out"
    out.mkdir()
    dc = _load(root)
    dc.MAX_BYTES, dc.MAX_PARTS = 2**16 + 15_000, 3   # the save keeps 64 KiB for the archive's end
    dc.save(str(out))
    parts = sorted(out.iterdir())
    assert [p.name for p in parts] == ["compile_cache.1.tgz", "compile_cache.2.tgz", "compile_cache.tgz"]
    names = {p.name: _names(p) for p in parts}
    kernels = [sorted({n.split("/")[2] for n in ns if "/triton/" in n}) for ns in
               (names["compile_cache.tgz"], names["compile_cache.1.tgz"])]
    assert kernels == [["K0", "K1"], ["K2", "K3"]]
    assert names["compile_cache.2.tgz"] == ["inductor/fxgraph/g/entry"]   # the source file did not fit
    dc2 = _load(tmp_path / "dev2" / "inductor")
    dc2.restore(str(out))
    assert len([p for p in (tmp_path / "dev2").rglob("*") if p.is_file()]) == 9


def test_foreign_paths_refused(tmp_path, capsys):
    evil = tmp_path / "src"
    evil.mkdir()
    victim = tmp_path / "elsewhere.txt"
    payload = tmp_path / "payload"
    payload.write_bytes(b"x")
    dc = _load(tmp_path / "root" / "inductor")
    with tarfile.open(evil / dc.NAME, "w:gz") as tar:
        tar.add(payload, arcname="elsewhere.txt")
    assert dc.restore(str(evil)) == 0
    assert "outside" in capsys.readouterr().err
    assert not victim.exists() and not (tmp_path / "root").exists()


def test_keep_without_a_saved_cache(tmp_path, capsys):
    dc = _load(tmp_path / "inductor")
    assert dc.keep(str(tmp_path), tmp_path / ".devcache") == 1
    assert "saved none" in capsys.readouterr().err
    assert not (tmp_path / ".devcache").exists()


@pytest.mark.parametrize("missing", ["restore", "save"])
def test_absent_inputs_are_cold_not_errors(tmp_path, missing, capsys):
    dc = _load(tmp_path / "inductor")
    assert getattr(dc, missing)(str(tmp_path)) == 0
    assert "devcache:" in capsys.readouterr().out


_COMPILE = """
import torch
from torch._dynamo.utils import counters
f = torch.compile(lambda x: torch.sin(x) * 2 + x.cumsum(0))
x = torch.arange(8.0)
assert torch.allclose(f(x), torch.sin(x) * 2 + x.cumsum(0))
print("HITS", counters["inductor"]["fxgraph_cache_hit"], "MISSES", counters["inductor"]["fxgraph_cache_miss"])
"""


def test_inductor_hits_the_restored_cache(tmp_path):
    """The real thing on CPU: a compile, its cache saved and wiped, restored at the same root; a fresh process
    then loads the compiled graph from the cache instead of compiling it (inductor's own hit counter)."""
    import subprocess
    import sys
    root = tmp_path / "inductor"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(root), "TRITON_CACHE_DIR": str(root / "triton"),
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}

    def compile_once() -> str:
        r = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.split("HITS", 1)[1].split()

    hits, _, misses = compile_once()
    assert (hits, misses) == ("0", "1")
    dc = _load(root)
    out = tmp_path / "out"
    out.mkdir()
    dc.save(str(out))
    import shutil
    shutil.rmtree(root)
    assert compile_once()[::2] == ["0", "1"]   # wiped: a cold compile again
    shutil.rmtree(root)
    dc.restore(str(out))
    hits, _, misses = compile_once()
    assert (hits, misses) == ("1", "0")


def test_parts_leave_room_for_the_calls_results(tmp_path):
    """A call brings back at most 8 files: with 7 results in $OUT the cache takes one part (the kernels)."""
    root = tmp_path / "inductor"
    _fill(root)
    out = tmp_path / "out"
    out.mkdir()
    for i in range(7):
        (out / f"r{i}.json").write_text("{}")
    dc = _load(root)
    dc.MAX_BYTES = 2**16 + 9_000   # one kernel group per part
    dc.save(str(out))
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tgz") == [dc.NAME]
    assert all(n.startswith("inductor/triton/") for n in _names(out / dc.NAME))
    (out / "r7.json").write_text("{}")
    (out / dc.NAME).unlink()
    dc.save(str(out))
    assert not (out / dc.NAME).exists()
