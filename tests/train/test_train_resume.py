"""Resume reproduces the uninterrupted loss trace bit for bit (fp32, CPU); checkpoints are
atomic (a kill during a write leaves a usable run)."""
import json

import pytest

from megafire.train import checkpoint as ckpt
from megafire.train.loop import train
from megafire.train.metrics import read_metrics

from _train_util import Crash, crash_after, tiny_config

TRACE = ("step", "tokens", "loss", "lr", "seq_len", "grad_norm")


def trace(run_dir):
    return [tuple(r[k] for k in TRACE) for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    train(tiny_config(run, {"train": {"checkpoint_every_steps": 2}}))
    return run


def test_uninterrupted_run_crosses_a_stage(uninterrupted):
    t = trace(uninterrupted)
    assert [r[0] for r in t] == [1, 2, 3, 4, 5, 6]
    assert [r[4] for r in t] == [16, 16, 32, 32, 32, 32]


def test_resume_equals_uninterrupted(tmp_path, uninterrupted):
    run = tmp_path / "run"
    # killed after step 3: the checkpoint at step 2 is the latest; step 3 is in metrics.jsonl
    with pytest.raises(Crash):
        train(tiny_config(run, {"train": {"checkpoint_every_steps": 2}}), callbacks=[crash_after(3)])
    assert ckpt.latest_checkpoint(run / "checkpoints").name == "step_00000002"
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    result = train(tiny_config(run, {"train": {"checkpoint_every_steps": 2, "resume": True}}))
    assert result.steps == 6
    assert trace(run) == trace(uninterrupted)          # exact: same floats, same stages, same rates


def test_kill_during_checkpoint_write(tmp_path, uninterrupted, monkeypatch):
    """A kill after the files are written but before the rename leaves a temp directory;
    `latest` still names the previous complete checkpoint and the resumed run is exact."""
    run = tmp_path / "run"
    real_save = ckpt.save_checkpoint

    def killed_at_step_4(engine, root, *, step, **kw):
        if step == 4:
            def die(tmp_dir):
                assert (tmp_dir / "meta.json").is_file()
                raise Crash("killed while committing checkpoint 4")
            kw["before_commit"] = die
        return real_save(engine, root, step=step, **kw)

    monkeypatch.setattr(ckpt, "save_checkpoint", killed_at_step_4)
    with pytest.raises(Crash):
        train(tiny_config(run, {"train": {"checkpoint_every_steps": 2}}))
    monkeypatch.undo()
    root = run / "checkpoints"
    assert (root / ".tmp-step_00000004").is_dir()
    assert (root / ckpt.LATEST).read_text().strip() == "step_00000002"
    assert ckpt.latest_checkpoint(root).name == "step_00000002"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000002"]
    train(tiny_config(run, {"train": {"checkpoint_every_steps": 2, "resume": True}}))
    assert trace(run) == trace(uninterrupted)
    assert not any(p.name.startswith(ckpt.TMP_PREFIX) for p in root.iterdir())


def test_checkpoint_layout_and_retention(uninterrupted):
    root = uninterrupted / "checkpoints"
    # keep_checkpoints=2: steps 4 and 6 remain, `latest` names step 6
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000004", "step_00000006"]
    latest = ckpt.latest_checkpoint(root)
    assert latest.name == "step_00000006"
    meta = json.loads((latest / "meta.json").read_text())
    assert meta["step"] == 6 and meta["tokens"] == 6 * 128 and meta["seq_len"] == 32 and meta["world_size"] == 1
    assert (latest / "config.yaml").is_file() and (latest / "ds").is_dir()
    assert (latest / ckpt.rank_state_file(0)).is_file()


def test_latest_pointer_to_missing_dir_falls_back(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (root / ckpt.checkpoint_name(step)).mkdir(parents=True)
        (root / ckpt.checkpoint_name(step) / "meta.json").write_text("{}")
    (root / ".tmp-step_00000006").mkdir()
    (root / ckpt.LATEST).write_text("step_00000006\n")     # never committed
    assert ckpt.latest_checkpoint(root).name == "step_00000004"
    (root / ckpt.LATEST).write_text("step_00000002\n")
    assert ckpt.latest_checkpoint(root).name == "step_00000002"
