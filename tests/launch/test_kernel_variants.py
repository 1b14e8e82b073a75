"""launch/kernel_variants.py: each undo of a timed-later kernel change still matches the committed kernels
exactly once (so the device call times the variant it names), a variant tree differs from the repository's
kernels in those lines only, and an undo that no longer matches is an error naming the change."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SPEC = importlib.util.spec_from_file_location("kernel_variants", ROOT / "launch" / "kernel_variants.py")
kv = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(kv)


@pytest.mark.parametrize("changes", [["relaxed"], ["pair"], ["relaxed", "pair"]])
def test_variant_tree_undoes_exactly_its_changes(tmp_path, changes):
    dest = tmp_path / "tree"
    assert kv.main([str(dest), *changes]) == 0
    ours = (ROOT / kv.KERNELS).read_text().splitlines()
    theirs = (dest / kv.KERNELS).read_text().splitlines()
    assert len(ours) == len(theirs)   # literal one-line replacements
    changed = [(a, b) for a, b in zip(ours, theirs) if a != b]
    pairs = [p for c in changes for p in kv.UNDO[c]]
    assert len(changed) == len(pairs)
    for new, old in pairs:
        assert sum(new in a and old in b for a, b in changed) == 1, new
    # the rest of the package is copied as it is
    assert (dest / "megafire/attention/fused/_function.py").read_bytes() == \
        (ROOT / "megafire/attention/fused/_function.py").read_bytes()
    assert (dest / "configs/arms/125m-fire.yaml").is_file() and (dest / "pyproject.toml").is_file()


def test_undo_that_no_longer_matches_names_the_change(monkeypatch):
    monkeypatch.setitem(kv.UNDO, "gone", [("no such code", "x")])
    with pytest.raises(SystemExit, match="'gone'.*occurs 0 times"):
        kv.undo((ROOT / kv.KERNELS).read_text(), "gone")


def test_unknown_change_and_the_repository_itself_are_refused(tmp_path, capsys, monkeypatch):
    assert kv.main([str(tmp_path / "t"), "nonsense"]) == 2
    assert "changes: relaxed, pair" in capsys.readouterr().err

    def no_delete(path, *a, **k):   # a broken guard must fail this test, not empty the checkout
        raise AssertionError(f"would have deleted {path}")
    monkeypatch.setattr(kv.shutil, "rmtree", no_delete)
    # it empties DEST first: never the repository, a folder holding it, or one inside it
    for dest in (ROOT, ROOT.parent, ROOT / "megafire"):
        with pytest.raises(SystemExit, match="is, holds or lies inside the repository"):
            kv.main([str(dest), "pair"])
