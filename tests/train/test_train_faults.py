"""Faults never pass silently: non-finite steps are skipped (bounded) or stop the run, no
checkpoint holds a non-finite weight, and a damaged checkpoint is refused by name.

Real runs of the trainer on tiny CPU configs; NaN is injected deterministically through a
forward hook (a whole step's loss) or a gradient hook (a finite loss with an inf gradient).
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megafire.config import ConfigError
from megafire.train import checkpoint as ckpt
from megafire.train.components import DataBundle, build_data, build_model
from megafire.train.faults import TrainingDiverged
from megafire.train.loop import train
from megafire.train.metrics import read_metrics

from _train_util import tiny_config

#: one sequence length, constant rate: a run that skips step k equals a run that never saw step k's batches
FLAT = {"curriculum": {"stages": []}, "data": {"seq_len": 16},
        "train": {"max_steps": 4, "warmup_tokens": 0, "min_lr_ratio": 1.0}}
MICRO_STEPS = 2   # tokens_per_step 128 / micro_batch_tokens 64


def nan_loss_at(steps: set[int], micro: int = 1):
    """model_factory: the GPT, whose embedding output is NaN on micro-batch ``micro`` of each 1-based step in ``steps``."""
    calls = {"n": 0}

    def factory(cfg, ctx):
        model = build_model(cfg, ctx)

        def hook(module, args, output):
            step, index = divmod(calls["n"], MICRO_STEPS)
            calls["n"] += 1
            return output * float("nan") if step + 1 in steps and index == micro else output
        model.embedding.register_forward_hook(hook)
        return model
    return factory


def inf_grad_at(step: int):
    """model_factory: finite losses, but one weight's gradient is inf in 1-based step ``step``."""
    calls = {"n": 0}

    def factory(cfg, ctx):
        model = build_model(cfg, ctx)
        weight = model.embedding.word.weight

        def hook(grad):
            calls["n"] += 1
            return grad * float("inf") if (calls["n"] - 1) // MICRO_STEPS + 1 == step else grad
        weight.register_hook(hook)
        return model
    return factory


def without_step(step: int):
    """data_factory: the usual batches, minus the micro-batches of 1-based ``step``."""
    def factory(cfg, ctx):
        bundle = build_data(cfg, ctx)
        source, calls = bundle.source, {"n": 0}
        real = source.next_batch

        def next_batch(micro_batch_size, seq_len):
            if calls["n"] == (step - 1) * MICRO_STEPS:
                for _ in range(MICRO_STEPS):
                    real(micro_batch_size, seq_len)
            calls["n"] += 1
            return real(micro_batch_size, seq_len)
        source.next_batch = next_batch
        return DataBundle(source, bundle.tokenizer_sha256, bundle.tokenizer_vocab_size)
    return factory


def weights(run_or_ckpt) -> dict:
    from megafire.train.universal import consolidated_state_dict
    return consolidated_state_dict(run_or_ckpt)[1]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def cfg(tmp_path, name, *sections):
    merged: dict = {}
    for s in (FLAT, *sections):
        for key, value in s.items():
            merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) and value else value
    return tiny_config(tmp_path / name, merged)


# --- 1. non-finite steps -------------------------------------------------------------------
@pytest.mark.parametrize("zero,precision", [(0, "fp32"), (1, "fp32"), (1, "bf16")])
def test_skip_mode_skips_exactly_the_poisoned_step(tmp_path, zero, precision):
    z = {"parallel": {"zero_stage": zero}, "train": {"precision": precision}}
    result = train(cfg(tmp_path, "poisoned", z), model_factory=nan_loss_at({2}))
    records = read_metrics(tmp_path / "poisoned")
    assert [r["skipped"] for r in records] == [False, True, False, False]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 1]
    assert result.skipped_steps == 1 and result.steps == 4
    assert records[1]["loss"] != records[1]["loss"]          # NaN, logged as such
    # the same weights (and optimizer moments: later updates agree) as a run that never saw step 2
    train(cfg(tmp_path, "never", z, {"train": {"max_steps": 3}}), data_factory=without_step(2))
    assert_same_weights(weights(tmp_path / "poisoned"), weights(tmp_path / "never"))
    assert [r["loss"] for r in records[2:]] == [r["loss"] for r in read_metrics(tmp_path / "never")[1:]]


@pytest.mark.parametrize("zero", [2, 3])
def test_skipped_step_leaves_weights_unchanged(tmp_path, zero):
    """A finite loss with an inf gradient: the optimizer's own norm check skips the update."""
    c = cfg(tmp_path, "run", {"parallel": {"zero_stage": zero}, "train": {"max_steps": 3, "checkpoint_every_steps": 1,
                                                                      "keep_checkpoints": 0}})
    train(c, model_factory=inf_grad_at(2))
    records = read_metrics(tmp_path / "run")
    assert [r["skipped"] for r in records] == [False, True, False]
    assert math.isfinite(records[1]["loss"]) and not math.isfinite(records[1]["grad_norm"])
    root = tmp_path / "run" / "checkpoints"
    after_1, after_2, after_3 = (weights(root / ckpt.checkpoint_name(s)) for s in (1, 2, 3))
    assert_same_weights(after_1, after_2)
    assert any(not torch.equal(after_2[k], after_3[k]) for k in after_2)


def test_stop_mode_stops_at_the_step(tmp_path):
    c = cfg(tmp_path, "run", {"train": {"nonfinite": "stop", "checkpoint_every_steps": 1}})
    with pytest.raises(TrainingDiverged, match=r"at step 3: loss nan.*train\.nonfinite=stop.*step_00000002"):
        train(c, model_factory=nan_loss_at({3}))
    assert (tmp_path / "run" / "checkpoints" / ckpt.LATEST).read_text().strip() == "step_00000002"
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_skip_bounds_consecutive_and_fraction(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"at step 3: .*2 non-finite steps in a row"):
        train(cfg(tmp_path, "a", {"train": {"max_skipped_consecutive": 2}}), model_factory=nan_loss_at({2, 3}))
    # 2 of 4 may be skipped (max(2, 0.25 * 4)); the third, at step 6, is one too many (max(2, 1.5))
    c = cfg(tmp_path, "b", {"train": {"max_steps": 8, "max_skipped_consecutive": 2, "max_skipped_fraction": 0.25}})
    with pytest.raises(TrainingDiverged, match=r"at step 6: .*3 of 6 steps skipped"):
        train(c, model_factory=nan_loss_at({2, 4, 6}))


def test_no_checkpoint_with_nonfinite_weights(tmp_path):
    """A weight turned NaN after step 3 (before its checkpoint): that checkpoint is refused; `latest`
    and the older checkpoints stay."""
    def poison_after_3(trainer, record):
        if record["step"] == 3:
            with torch.no_grad():
                next(trainer.engine.module.parameters()).fill_(float("nan"))

    c = cfg(tmp_path, "run", {"train": {"max_steps": 6, "checkpoint_every_steps": 1, "keep_checkpoints": 2}})
    with pytest.raises(TrainingDiverged, match=r"by step 3: weight model\.\S+ \(\d+ of \d+ values NaN or inf\).*"
                                               r"`latest` still names .*step_00000002"):
        train(c, callbacks=[poison_after_3])
    root = tmp_path / "run" / "checkpoints"
    assert (root / ckpt.LATEST).read_text().strip() == "step_00000002"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000001", "step_00000002"]
    assert not any(p.name.startswith(ckpt.TMP_PREFIX) for p in root.iterdir())


def test_cli_divergence_exit_code(tmp_path, capsys):
    import yaml
    from _train_util import TINY

    from megafire.train.cli import main
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "run": {"dir": str(tmp_path / "run")}}))
    code = main(["--config", str(config), "--train.lr=1e6", "--train.warmup_tokens=0", "--train.max_steps=12",
                 "--train.checkpoint_every_steps=2"])
    err = capsys.readouterr().err
    assert code == 3, err[-2000:]
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "training diverged at step" in line[0] and "train.lr" in line[0]
    latest = ckpt.find_checkpoint(tmp_path / "run" / "checkpoints", fallback=False)
    assert all(torch.isfinite(v).all() for v in weights(latest).values())


# --- 2. resume from a damaged `latest` -----------------------------------------------------
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A finished 4-step run with checkpoints after steps 2 and 4 (kept as a template)."""
    run = tmp_path_factory.mktemp("faults") / "run"
    train(tiny_config(run, {**FLAT, "train": {**FLAT["train"], "checkpoint_every_steps": 2}}))
    return run


@pytest.fixture
def run_copy(two_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    return run


def resume_config(run, **train_keys):
    return tiny_config(run, {**FLAT, "train": {**FLAT["train"], "checkpoint_every_steps": 2, "max_steps": 6,
                                               "resume": True, **train_keys}})


def test_resume_refuses_a_damaged_latest(run_copy):
    states = run_copy / "checkpoints" / "step_00000004" / "ds" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])
    with pytest.raises(ckpt.CheckpointError, match=rf"checkpoint {run_copy / 'checkpoints' / 'step_00000004'} is "
                                                   rf"damaged: cannot read {states}.*resume_fallback=true.*step_00000002"):
        train(resume_config(run_copy))
    assert len(states.read_bytes()) == 1000                    # untouched


def test_resume_fallback_sets_the_damaged_one_aside(run_copy, capsys):
    root = run_copy / "checkpoints"
    (root / "step_00000004" / "meta.json").unlink()            # an incomplete checkpoint that `latest` names
    result = train(resume_config(run_copy, resume_fallback=True))
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint step_00000004" in err and "has no meta.json" in err
    assert "resumed from" in err and "step_00000002" in err
    aside = [p for p in root.iterdir() if p.name.startswith("step_00000004.damaged-")]
    assert len(aside) == 1 and not (aside[0] / "meta.json").exists() and (aside[0] / "ds").is_dir()
    assert result.steps == 6 and (root / ckpt.LATEST).read_text().strip() == "step_00000006"
    assert [r["step"] for r in read_metrics(run_copy)] == [1, 2, 3, 4, 5, 6]


def test_resume_from_a_missing_latest_directory_refuses(run_copy):
    shutil.rmtree(run_copy / "checkpoints" / "step_00000004")
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000004 is missing: the directory does not exist"):
        train(resume_config(run_copy))


# --- 3. one check on every reader ----------------------------------------------------------
def damage(run: Path, how: str) -> Path:
    step = run / "checkpoints" / "step_00000004"
    target = {"truncated": step / "ds" / "mp_rank_00_model_states.pt", "deleted": step / "ds" / "mp_rank_00_model_states.pt",
              "state": step / ckpt.rank_state_file(0)}[how]
    if how == "truncated":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 3])
    else:
        target.unlink()
    return target


DAMAGE = {"truncated": "is damaged: cannot read {f}", "deleted": "is damaged: {f} is missing",
          "state": "is damaged: {f} is missing (the trainer state of rank 0 of 1)"}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_checkpoint_named_by_every_reader(run_copy, how, tmp_path):
    """Resume needs every file; the weights' readers need the model files (a missing trainer
    state does not stop an export: it reads none)."""
    f = damage(run_copy, how)
    step = run_copy / "checkpoints" / "step_00000004"
    expected = f"checkpoint {step} " + DAMAGE[how].format(f=f)
    with pytest.raises(ckpt.CheckpointError) as resume:                       # resume
        train(resume_config(run_copy))
    assert expected in str(resume.value)
    if how == "state":
        return
    from megafire.export import export_checkpoint
    from megafire.train import load_model
    from megafire.train.universal import init_from_factory, save_universal
    for read in (lambda: export_checkpoint(step, tmp_path / "hf"),            # export
                 lambda: load_model(step),                                    # eval
                 lambda: save_universal(step, tmp_path / "universal"),        # universal conversion
                 lambda: init_from_factory(step)):                            # --init-from
        with pytest.raises(ckpt.CheckpointError) as e:
            read()
        assert expected in str(e.value)


def test_readers_of_a_run_skip_a_damaged_latest_with_a_warning(run_copy, capsys):
    damage(run_copy, "deleted")
    from megafire.export.checkpoint import resolve_checkpoint
    assert resolve_checkpoint(run_copy).path.name == "step_00000002"
    assert "skipping damaged checkpoint step_00000004" in capsys.readouterr().err
    assert (run_copy / "checkpoints" / "step_00000004").is_dir()             # readers never move anything


def test_universal_cli_error_line(run_copy, tmp_path):
    f = damage(run_copy, "truncated")
    proc = subprocess.run([sys.executable, "-m", "megafire.train.universal", str(f.parents[1]), str(tmp_path / "u")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"error: checkpoint {f.parents[1]} is damaged: cannot read {f}" in proc.stderr


def test_resume_with_another_model_names_the_keys(run_copy):
    c = resume_config(run_copy)
    c.model.hidden_size, c.model.position.options["init_L"] = 64, 8.0
    with pytest.raises(ConfigError, match=r"its model differs from this run's: model.hidden_size: checkpoint 32, "
                                          r"this run 64; model.position.options.init_L: checkpoint 16, this run 8.0"):
        train(c)


# --- non-finite weights are refused by readers -----------------------------------------------
def test_export_and_eval_refuse_nonfinite_weights(run_copy, tmp_path, capsys):
    step = run_copy / "checkpoints" / "step_00000004"
    states = step / "ds" / "mp_rank_00_model_states.pt"
    blob = torch.load(states, map_location="cpu", weights_only=False)
    name = sorted(blob["module"])[3]
    blob["module"][name][0] = float("nan")
    torch.save(blob, states)
    from megafire.export import export_checkpoint
    from megafire.train import load_model
    gpt_name = name.removeprefix("model.")
    for read in (lambda: export_checkpoint(step, tmp_path / "hf"), lambda: load_model(step)):
        with pytest.raises(ckpt.CheckpointError, match=rf"checkpoint {step} has non-finite weights: {gpt_name} .*"
                                                       rf"--allow-nonfinite"):
            read()
    assert load_model(step, allow_nonfinite=True) is not None


@pytest.mark.distributed
def test_two_ranks_agree_on_a_skip(tmp_path):
    """DP=2 ZeRO-1, PP=2 ZeRO-1, TP=2 ZeRO-0: a NaN loss on one rank only; both ranks skip the update."""
    import os
    here = Path(__file__).parent
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                             "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(here.parents[1]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(here / "_dist_faults.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    expected = {"skipped": [False, True, False], "skipped_steps": 1, "same_after_1_and_2": True,
                "changed_by_3": True, "finite": True}
    assert result == {"dp2-z1": expected, "pp2-z1": expected, "tp2-z0": expected,
                      "dp2-z3-padding": {**expected, "skipped": [False, False, False], "skipped_steps": 0,
                                         "same_after_1_and_2": False}}


def test_export_cli_refuses_nonfinite_weights_unless_allowed(run_copy, tmp_path, capsys):
    from megafire.cli import main
    states = run_copy / "checkpoints" / "step_00000004" / "ds" / "mp_rank_00_model_states.pt"
    blob = torch.load(states, map_location="cpu", weights_only=False)
    next(v for k, v in sorted(blob["module"].items()) if torch.is_tensor(v) and v.dim() == 2)[0, 0] = float("inf")
    torch.save(blob, states)
    assert main(["export", "--checkpoint", str(run_copy), "--out", str(tmp_path / "hf")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "has non-finite weights" in err[0] and not (tmp_path / "hf").exists()
    assert main(["export", "--checkpoint", str(run_copy), "--out", str(tmp_path / "hf"), "--allow-nonfinite"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.parametrize("train_keys,msg", [
    ({"nonfinite": "ignore"}, "'train.nonfinite' = 'ignore' is not allowed; allowed: skip, stop"),
    ({"max_skipped_consecutive": 0}, "train.max_skipped_consecutive must be >= 1"),
    ({"max_skipped_fraction": 1.5}, "train.max_skipped_fraction must be in [0, 1]"),
])
def test_fault_keys_are_validated(tmp_path, train_keys, msg):
    with pytest.raises(ConfigError) as e:
        tiny_config(tmp_path / "run", {"train": train_keys})
    assert msg in str(e.value)


def test_a_file_corrupt_inside_is_named_on_resume(run_copy):
    """A complete archive whose contents do not load (here: the trainer state replaced by a zip
    archive that is not a torch file) still gives the error that names the checkpoint."""
    import zipfile
    state = run_copy / "checkpoints" / "step_00000004" / ckpt.rank_state_file(0)
    with zipfile.ZipFile(state, "w") as zf:      # a valid zip, not a torch file
        zf.writestr("junk", b"not a pickle")
    with pytest.raises(ckpt.CheckpointError, match=rf"checkpoint .*step_00000004 is damaged: cannot read {state}"):
        train(resume_config(run_copy))
