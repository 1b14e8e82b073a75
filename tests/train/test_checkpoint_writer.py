"""The checkpoint writer's deletions (pruning, re-writing a step) never leave a partial directory
under a checkpoint's name when they are cut short (the kill-at-every-point test in
tests/parallel/test_parallel_kill.py found the kill during pruning: ``step_X`` kept its
meta.json after its weights were gone). In-process: a fake DeepSpeed engine writes the model
file; the deletion is cut short by an ``os.unlink`` that fails after its first file."""
from __future__ import annotations

import os

import pytest
import torch

from megafire.train import checkpoint as ckpt


class FakeEngine:
    def save_checkpoint(self, save_dir, tag, save_latest):
        os.makedirs(os.path.join(save_dir, tag))
        torch.save({"module": {"w": torch.ones(2)}}, os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))


def save(root, step, keep):
    return ckpt.save_checkpoint(FakeEngine(), root, step=step, meta={"tokens": step, "world_size": 1},
                                rank_state={"step": step}, config_yaml="model: {}\n", keep=keep, rank=0,
                                barrier=lambda: None)


class Killed(BaseException):
    pass


@pytest.fixture
def unlink_dies_after_one(monkeypatch):
    """``os.unlink`` removes one file, then the process 'dies' (raises Killed) at the next one;
    later calls (the restarted process) work."""
    real, calls = os.unlink, {"n": 0}

    def unlink(path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed(path)
        return real(path, *args, **kwargs)

    def arm():
        monkeypatch.setattr(os, "unlink", unlink)
    return arm


def assert_no_partial_checkpoint(root):
    for path in ckpt.list_checkpoints(root):
        ckpt.verify_checkpoint(path)          # CheckpointError if a file is missing
    assert ckpt.find_checkpoint(root, fallback=False) is not None


def test_killed_while_pruning(tmp_path, unlink_dies_after_one):
    root = tmp_path / "checkpoints"
    save(root, 1, keep=1)
    unlink_dies_after_one()
    with pytest.raises(Killed):
        save(root, 2, keep=1)                 # committed, `latest` moved, then pruning step 1 is cut short
    assert (root / ckpt.LATEST).read_text() == "step_00000002\n"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000002"]
    assert_no_partial_checkpoint(root)
    save(root, 3, keep=1)                     # the next write removes the leftover
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003"]


def test_killed_while_replacing_a_step_written_before(tmp_path, unlink_dies_after_one):
    """Re-writing step 2 after a resume from step 1 (a kill had come before `latest` moved to 2)."""
    root = tmp_path / "checkpoints"
    save(root, 1, keep=0)
    save(root, 2, keep=0)
    (root / ckpt.LATEST).write_text("step_00000001\n")
    unlink_dies_after_one()
    with pytest.raises(Killed):
        save(root, 2, keep=0)                 # the old step 2 is being deleted when the kill comes
    assert (root / ckpt.LATEST).read_text() == "step_00000001\n"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000001"]
    assert_no_partial_checkpoint(root)
