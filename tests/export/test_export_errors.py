"""Missing, half-written and unsupported checkpoints fail with errors that name the path."""
from __future__ import annotations

import json
import shutil

import pytest

from export_testlib import tiny_config, write_checkpoint


@pytest.fixture
def run(tmp_path, tokenizer_dir):
    return write_checkpoint(tiny_config("alibi", tmp_path / "run", tokenizer_dir))


def export_error(capsys, checkpoint, out) -> str:
    from megafire.cli import main
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert not out.exists()                      # nothing half-written either
    return capsys.readouterr().err


def test_missing_path(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "run"
    assert f"checkpoint path {missing} does not exist" in export_error(capsys, missing, tmp_path / "hf")


def test_run_without_a_complete_checkpoint(run, tmp_path, capsys):
    ckpt = run / "checkpoints" / "step_00000003"
    (ckpt / "meta.json").unlink()                                # the write never committed
    (run / "checkpoints" / "latest").unlink()
    err = export_error(capsys, run, tmp_path / "hf")
    assert f"no complete checkpoint under {run / 'checkpoints'}" in err and "step_00000003" in err
    err = export_error(capsys, ckpt, tmp_path / "hf")
    assert f"checkpoint {ckpt} is incomplete" in err and "meta.json" in err


def test_temporary_directory_of_an_interrupted_write(run, tmp_path, capsys):
    tmp = run / "checkpoints" / ".tmp-step_00000009"
    shutil.copytree(run / "checkpoints" / "step_00000003", tmp)
    (tmp / "meta.json").unlink()
    assert f"checkpoint {tmp} is incomplete" in export_error(capsys, tmp, tmp_path / "hf")
    # the run itself still resolves to the last committed checkpoint
    from megafire.export.checkpoint import resolve_checkpoint
    assert resolve_checkpoint(run).path.name == "step_00000003"


def test_latest_naming_a_deleted_checkpoint_falls_back(run):
    from megafire.export.checkpoint import resolve_checkpoint
    (run / "checkpoints" / "latest").write_text("step_00000099\n")
    assert resolve_checkpoint(run).path.name == "step_00000003"


def test_missing_or_truncated_weights(run, tmp_path, capsys):
    states = run / "checkpoints" / "step_00000003" / "ds" / "mp_rank_00_model_states.pt"
    data = states.read_bytes()
    states.write_bytes(data[: len(data) // 3])
    err = export_error(capsys, run, tmp_path / "hf")
    assert f"cannot read {states}" in err
    states.unlink()
    assert f"{states} is missing" in export_error(capsys, run, tmp_path / "hf")


def test_sharded_checkpoint_with_missing_shards_is_a_clear_error(run, tmp_path, capsys):
    # a checkpoint that claims tp=2 but holds one rank's files: the merge names the checkpoint
    meta_path = run / "checkpoints" / "step_00000003" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "tp": 2, "world_size": 2}))
    assert "step_00000003" in export_error(capsys, run, tmp_path / "hf")


def test_wrong_tokenizer_is_refused(run, tmp_path, capsys):
    meta_path = run / "checkpoints" / "step_00000003" / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "tokenizer_sha256": "ab" * 32}))
    assert "is not the one checkpoint" in export_error(capsys, run, tmp_path / "hf")


def test_load_checkpoint_errors_name_the_path(tmp_path):
    import megafire
    from megafire.export.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match=str(tmp_path / "nothing")):
        megafire.load_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a megafire run directory"):
        megafire.load_checkpoint(tmp_path / "empty")
