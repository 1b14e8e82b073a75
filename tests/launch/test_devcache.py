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
             "triton/K1/kern.json": b'{"name": "kern"}', "triton/K1/kern.ptx": b"// ptx\n" * 400,
             "triton/K1/__grp__kern.json": b'{"child_paths": {}}'}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "triton" / "K1" / "lock").write_bytes(b"")   # per process: not carried
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
    assert dc.keep(str(files_at), keep_dir) == 0
    # the next machine: the same fixed root, empty before the restore
    root2 = tmp_path / "dev2" / "inductor"
    dc2 = _load(root2)
    assert dc2.restore(str(keep_dir)) == 0
    got = {str(p.relative_to(root2)): p.read_bytes() for p in root2.rglob("*") if p.is_file()}
    assert got == files


def test_over_limit_drops_intermediates_first(tmp_path):
    root = tmp_path / "inductor"
    _fill(root)
    (root / "triton" / "K2").mkdir(parents=True)
    (root / "triton" / "K2" / "big.ptx").write_bytes(os.urandom(40_000))   # incompressible, skippable
    out = tmp_path / "out"
    out.mkdir()
    dc = _load(root)
    dc.MAX_BYTES = 20_000
    dc.save(str(out))
    with tarfile.open(out / dc.NAME) as tar:
        names = tar.getnames()
    assert "inductor/triton/K1/kern.cubin" in names and "inductor/fxgraph/ab/key1" in names
    assert not any(n.endswith(".ptx") for n in names)
    dc.MAX_BYTES = 1_000   # not even the binaries fit: nothing is written
    dc.save(str(out))
    assert not (out / dc.NAME).exists()


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
