"""Issue 13's faults met through the command line, as a user meets them: ``megafire.cli.main``
(what ``megafire`` and ``python -m megafire`` run) with a user's arguments, in this process, on
a tiny synthetic config. Each case checks the exit status, the one ``error:`` line (or the
warning) and what is on disk afterwards. The same faults through the Python API:
test_train_faults.py; subprocess runs of the CLI: tests/test_cli_errors.py,
tests/parallel/test_parallel_kill.py.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from megafire.cli import main
from megafire.train import checkpoint as ckpt

from _train_util import TINY

STEP_4 = Path("checkpoints") / "step_00000004"
WEIGHTS = STEP_4 / "ds" / "mp_rank_00_model_states.pt"


def write_config(path: Path, run_dir: Path) -> str:
    path.write_text(yaml.safe_dump({**TINY, "run": {"dir": str(run_dir)}}))
    return str(path)


def error_lines(capsys) -> tuple[list[str], str]:
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.startswith("error:")], err


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def listing(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """``megafire train``: 4 steps, checkpoints after steps 2 and 4 (a template, copied per test)."""
    d = tmp_path_factory.mktemp("cli-faults")
    config = write_config(d / "tiny.yaml", d / "run")
    assert main(["train", "--config", config, "--train.max_steps=4", "--train.checkpoint_every_steps=2"]) == 0
    return d / "run"


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    shutil.copytree(base_run, tmp_path / "run")
    return tmp_path / "run"


def resume_args(run: Path, *extra: str) -> list[str]:
    return ["train", "--config", write_config(run.parent / "tiny.yaml", run), "--train.max_steps=6",
            "--train.checkpoint_every_steps=2", "--train.resume=true", *extra]


# --- 1. divergence -------------------------------------------------------------------------
def test_divergence_in_stop_mode_exits_3_at_the_step(tmp_path, capsys):
    """lr=1e6: the first non-finite step stops the run (exit 3); the message names the step, the
    mode and the last checkpoint, which `latest` still names; no checkpoint from that step on."""
    run = tmp_path / "run"
    code = main(["train", "--config", write_config(tmp_path / "tiny.yaml", run), "--train.lr=1e6",
                 "--train.warmup_tokens=0", "--train.nonfinite=stop", "--train.max_steps=12",
                 "--train.checkpoint_every_steps=1", "--train.keep_checkpoints=0"])
    lines, err = error_lines(capsys)
    assert code == 3 and len(lines) == 1, err[-3000:]
    found = re.match(r"error: training diverged at step (\d+): loss \S+, grad norm \S+ \(not finite\); stopped after "
                     r"train\.nonfinite=stop; .*the last checkpoint is (\S+)\)", lines[0])
    assert found, lines[0]
    step = int(found.group(1))
    assert "Traceback" not in err and 1 < step <= 12
    good = ckpt.checkpoint_name(step - 1)
    assert found.group(2) == str(run / "checkpoints" / good)
    assert (run / "checkpoints" / ckpt.LATEST).read_text() == good + "\n"
    assert listing(run) == [ckpt.LATEST] + [ckpt.checkpoint_name(s) for s in range(1, step)]   # none for step, no temp
    assert steps_logged(run) == list(range(1, step + 1))                                           # the step is logged
    from megafire.train.universal import consolidated_state_dict
    assert all(torch.isfinite(v).all() for v in consolidated_state_dict(run / "checkpoints" / good)[1].values())


def test_eval_refuses_nonfinite_weights(run, tmp_path, capsys):
    blob = torch.load(run / WEIGHTS, map_location="cpu", weights_only=False)
    name = sorted(k for k, v in blob["module"].items() if torch.is_tensor(v) and v.is_floating_point())[0]
    blob["module"][name].view(-1)[0] = float("nan")
    torch.save(blob, run / WEIGHTS)
    assert main(["eval", "--checkpoint", str(run), "--no-tracking", "--out", str(tmp_path / "eval")]) == 2
    lines, err = error_lines(capsys)
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert f"has non-finite weights: {name.removeprefix('model.')} (1 of " in lines[0]
    assert "--allow-nonfinite" in lines[0]
    assert not (tmp_path / "eval").exists() and not (run / "length_generalization.json").exists()


# --- 2. resume from a damaged `latest` -------------------------------------------------------
def test_resume_refuses_a_damaged_latest_then_falls_back_when_told(run, capsys):
    weights = run / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    before = weights.read_bytes()
    assert main(resume_args(run)) == 2
    lines, err = error_lines(capsys)
    assert lines == [f"error: checkpoint {run / STEP_4} is damaged: cannot read {weights}: truncated or corrupt (not a "
                     f"complete torch archive: RuntimeError); pass --train.resume_fallback=true to move it aside and "
                     f"resume from the newest complete checkpoint (the next older checkpoint is step_00000002)"], err
    assert weights.read_bytes() == before and steps_logged(run) == [1, 2, 3, 4]               # nothing touched
    assert listing(run) == [ckpt.LATEST, "step_00000002", "step_00000004"]

    assert main(resume_args(run, "--train.resume_fallback=true")) == 0
    lines, err = error_lines(capsys)
    assert not lines, err[-3000:]
    aside = [n for n in listing(run) if n.startswith("step_00000004.damaged-")]
    assert len(aside) == 1
    assert (f"skipping damaged checkpoint step_00000004: checkpoint {run / STEP_4} is damaged: cannot read {weights}"
            in err and f"moved aside to {aside[0]}" in err)
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} at step 2" in err
    assert (run / "checkpoints" / aside[0] / "ds" / weights.name).read_bytes() == before      # kept, not overwritten
    assert (run / "checkpoints" / ckpt.LATEST).read_text() == "step_00000006\n"
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]


def test_resume_from_a_latest_whose_directory_is_gone(run, capsys):
    shutil.rmtree(run / STEP_4)
    assert main(resume_args(run)) == 2
    lines, err = error_lines(capsys)
    assert lines == [f"error: checkpoint {run / STEP_4} is missing: the directory does not exist; pass "
                     f"--train.resume_fallback=true to move it aside and resume from the newest complete checkpoint "
                     f"(the next older checkpoint is step_00000002)"], err
    assert listing(run) == [ckpt.LATEST, "step_00000002"] and steps_logged(run) == [1, 2, 3, 4]


# --- 3. every reader names the damaged file ----------------------------------------------------
def damage(run: Path, how: str) -> tuple[Path, str]:
    weights = run / WEIGHTS
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
        return weights, f"is damaged: cannot read {weights}: truncated or corrupt"
    if how == "deleted":
        weights.unlink()
        return weights, f"is damaged: {weights} is missing (model weights, tp rank 0)"
    (run / STEP_4 / "meta.json").unlink()
    return run / STEP_4 / "meta.json", "is incomplete: it has no meta.json"


@pytest.mark.parametrize("how", ["truncated", "deleted", "no-meta"])
@pytest.mark.parametrize("reader", ["resume", "eval", "export", "init-from"])
def test_every_reader_names_the_damaged_checkpoint(run, tmp_path, capsys, reader, how):
    damaged, what = damage(run, how)
    out = tmp_path / "out"
    argv = {"resume": resume_args(run),
            "eval": ["eval", "--checkpoint", str(run / STEP_4), "--no-tracking", "--out", str(out)],
            "export": ["export", "--checkpoint", str(run / STEP_4), "--out", str(out)],
            "init-from": ["train", "--config", write_config(tmp_path / "new.yaml", out), "--init-from",
                          str(run / STEP_4)]}[reader]
    left = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main(argv) == 2
    lines, err = error_lines(capsys)
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert f"checkpoint {run / STEP_4} {what}" in lines[0]
    assert not out.exists()                                                   # nothing written
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == left         # nothing moved or removed


def test_resume_with_another_model_shape_names_the_keys(run, capsys):
    assert main(resume_args(run, "--model.hidden_size=64", "--model.num_heads=4")) == 2
    lines, err = error_lines(capsys)
    assert lines == [f"error: cannot resume {run / STEP_4}: its model differs from this run's: model.hidden_size: "
                     f"checkpoint 32, this run 64; model.num_heads: checkpoint 2, this run 4 (resume with the "
                     f"checkpoint's model settings, see its config.yaml, or start a new run.dir)"], err
    assert listing(run) == [ckpt.LATEST, "step_00000002", "step_00000004"] and steps_logged(run) == [1, 2, 3, 4]


# --- 4. a plain JSONL corpus with the default flags ----------------------------------------------
def test_prep_shards_of_a_plain_jsonl_with_default_flags(tmp_path, capsys):
    from megafire.data.corpus import Document, load_corpus
    from megafire.data.tokenizer import train_tokenizer
    docs = [Document(x.id, x.title, x.text[:6_000]) for x in load_corpus("default")[:12]]
    train_tokenizer(docs, tmp_path / "tok", vocab_size=400)
    corpus = tmp_path / "plain.jsonl"
    corpus.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    capsys.readouterr()
    assert main(["prep", "shards", "--corpus", str(corpus), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "shards")]) == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "no eval_ids" in line]
    assert len(said) == 1 and said[0].startswith(f"corpus {corpus}: no eval_ids in plain.meta.json; holding out ")
    assert not error_lines(capsys)[0] and "Traceback" not in err
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert 0 < manifest["num_docs"] < len(docs), manifest          # the train split: the held-out ones left out


# --- a run directory that holds a run; a stop request ----------------------------------------------
def test_training_into_a_run_directory_that_holds_a_run(run, capsys):
    config = write_config(run.parent / "tiny.yaml", run)
    assert main(["train", "--config", config, "--train.max_steps=6"]) == 2
    lines, err = error_lines(capsys)
    assert lines == [f"error: run.dir={str(run)!r} already holds a run; pass --train.resume=true to continue it or "
                     f"choose another run.dir"], err
    assert listing(run) == [ckpt.LATEST, "step_00000002", "step_00000004"] and steps_logged(run) == [1, 2, 3, 4]


def test_stop_file_exits_124_after_a_checkpoint(run, capsys):
    """``touch run.dir/STOP`` (what slurm/lib.sh writes before forwarding SIGUSR1): checkpoint after
    the step, remove the file, exit 124; the resumed run goes on from there."""
    (run / "STOP").touch()
    assert main(resume_args(run)) == 124
    err = capsys.readouterr().err
    assert f"stopping on request (file {run / 'STOP'}) after step 5; resume with --train.resume=true" in err
    assert not (run / "STOP").exists() and (run / "checkpoints" / ckpt.LATEST).read_text() == "step_00000005\n"
    assert steps_logged(run) == [1, 2, 3, 4, 5]
    assert main(resume_args(run)) == 0 and steps_logged(run) == [1, 2, 3, 4, 5, 6]
