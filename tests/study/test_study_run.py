"""`megafire study run` + `report` end to end on a tiny CPU study: the JSON format (the demo's
keys, per-seed numbers, finite perplexities, rope PI/YaRN rows), resumability (a second run
trains and evaluates nothing), the results tarball, and MLflow (one run per arm and seed,
with the plot), also when logged again and from the tarball on another directory. Then a
later call as launch/device_study_call3.sh makes it: only the new jobs (a second seed, a
half-budget arm, the precision arm), detached and followed twice, folded into the first
study's published report."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile

import pytest

from _study_util import FIRST_ARMS, LATER_JOBS, ROOT, make_study

pytestmark = pytest.mark.timeout(300)


def _study(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, "-m", "megafire.cli", "study", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=280)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    plan = make_study(root)
    res = _study(["run", "--plan", str(plan), "--arms", FIRST_ARMS, "--out", "out", "--device", "cpu",
                  "--export-dir", "export"], root)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return root, plan, res


def test_json_has_the_demo_format_and_every_row(study):
    root, _, _ = study
    report = json.loads((root / "out" / "study.json").read_text())
    assert report["train_length"] == 32 and report["lengths"] == [32, 64, 128, 256]
    rows = {"fire", "fire_lr10", "rope", "rope_pi", "rope_yarn"}
    assert set(report["results"]) == rows and set(report["results_code"]) == rows
    for table in (report["results"], report["results_code"]):
        for by_len in table.values():
            assert set(by_len) == {"32", "64", "128", "256"}
            assert all(math.isfinite(p) and 1 < p < 1000 for p in by_len.values())
    # per-seed numbers; the mean is their mean
    fire = report["per_seed"]["prose"]["fire"]
    assert set(fire) == {"1", "2"}
    assert report["results"]["fire"]["256"] == pytest.approx((fire["1"]["256"] + fire["2"]["256"]) / 2)
    assert fire["1"]["256"] != fire["2"]["256"]                  # the seeds are different runs
    # inference-time scaling: identical at 1x (factor 1), different beyond
    r = report["results"]
    assert r["rope_pi"]["32"] == r["rope"]["32"] == r["rope_yarn"]["32"]
    assert r["rope_pi"]["256"] != r["rope"]["256"] and r["rope_yarn"]["256"] != r["rope"]["256"]
    assert set(report["passkey"]) == rows and all(0 <= a <= 1 for v in report["passkey"].values() for a in v.values())
    assert set(report["runs"]) == {"fire-s1", "fire-s2", "rope-s1", "fire_lr10-s1"}
    assert all(run["steps"] == 3 and run["tokens"] == 1536 for run in report["runs"].values())
    md = (root / "out" / "study.md").read_text()
    assert "| rope_yarn | 1 |" in md and "| fire | 2 |" in md and "study.png" in md
    assert (root / "out" / "study.png").stat().st_size > 10_000


def test_second_run_skips_everything(study):
    """Repeated as the GPU machine repeats it: detached, followed, exported; nothing redone."""
    root, plan, _ = study
    before = {p: p.stat().st_mtime for p in (root / "out" / "runs").rglob("study_eval.json")}
    res = _study(["run", "--plan", str(plan), "--arms", FIRST_ARMS, "--out", "out", "--device", "cpu", "--detach",
                  "--wait", "200", "--export-dir", "export2"], root)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "run: all done" in res.stdout and (root / "export2" / "study_results.tar.gz").is_file()
    assert res.stdout.count("train: done before, skipped") == 4
    assert res.stdout.count("eval: done before, skipped") == 4
    assert "train: start" not in res.stdout and "eval: start" not in res.stdout
    assert before == {p: p.stat().st_mtime for p in before}


def test_tarball_holds_results_not_checkpoints(study):
    root, _, _ = study
    with tarfile.open(root / "export" / "study_results.tar.gz") as tf:
        names = tf.getnames()
    for run in ("fire-s1", "fire-s2", "rope-s1", "fire_lr10-s1"):
        assert f"runs/{run}/eval/study_eval.json" in names and f"runs/{run}/metrics.jsonl" in names
    assert "study.json" in names and not any("checkpoints" in n for n in names)
    assert (root / "export" / "study.png").is_file()


def test_report_logs_one_mlflow_run_per_arm_and_seed(study, tmp_path):
    from mlflow.tracking import MlflowClient
    root, _, _ = study
    fresh = tmp_path / "cpu_side"
    for _ in range(2):       # logging again replaces, never duplicates
        res = _study(["report", "--out", str(fresh), "--from-tarball", str(root / "export" / "study_results.tar.gz")],
                     tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((fresh / "study.json").read_text())["results"] == \
        json.loads((root / "out" / "study.json").read_text())["results"]
    client = MlflowClient(tracking_uri=f"sqlite:///{fresh / 'mlflow.db'}")
    exp = client.get_experiment_by_name("megafire-study")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["study-fire-s1", "study-fire-s2", "study-fire_lr10-s1",
                                                     "study-rope-s1"]
    for r in runs:
        arts = {a.path for a in client.list_artifacts(r.info.run_id, "study")}
        assert "study/study.png" in arts and "study/study.json" in arts
        assert len(client.get_metric_history(r.info.run_id, "train/loss")) == 3
        assert r.data.params["study.arm"] in ("fire", "fire_lr10", "rope") and r.data.params["train.max_steps"] == "3"
    rope = next(r for r in runs if r.info.run_name == "study-rope-s1")
    assert "eval/prose/yarn/ppl_256" in rope.data.metrics and "eval/code/linear/ppl_256" in rope.data.metrics


def test_later_call_runs_only_new_jobs_then_merges(study, tmp_path):
    """As launch/device_study_call3.sh: `--arms` names only the new jobs; the first call detaches
    the runner and returns while it works (exit 3), the second follows it to the end (exit 0).
    Per-arm budget: the half arm trains 768 -> 1 step of 512 tokens. The precision arm trains in
    bf16 + ZeRO-1 with its encoding fp32. `report --merge` folds the first study's published
    study.json with the new tarball: fire_lr10 has both seeds, seed 1 as published."""
    root, plan, _ = study
    out = tmp_path / "out3"
    common = ["run", "--plan", str(plan), "--arms", LATER_JOBS, "--out", str(out), "--device", "cpu", "--detach"]
    first = _study(common + ["--wait", "0", "--export-dir", str(tmp_path / "export_a")], root)
    assert first.returncode == 3, first.stdout[-3000:] + first.stderr[-3000:]
    second = _study(common + ["--wait", "250", "--export-dir", str(tmp_path / "export_b")], root)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["fire_enc_fp32-s1", "fire_lr10-s2", "fire_lr10_half-s1"]
    done = {p.name: json.loads((p / "train_done.json").read_text()) for p in (out / "runs").iterdir()}
    assert {n: (d["max_steps"], d["tokens"]) for n, d in done.items()} == {
        "fire_enc_fp32-s1": (3, 1536), "fire_lr10-s2": (3, 1536), "fire_lr10_half-s1": (1, 512)}
    from megafire.config import load_config
    cfg = load_config(out / "runs" / "fire_enc_fp32-s1" / "config.yaml")
    assert (cfg.train.encoding_fp32, cfg.train.precision, cfg.parallel.zero_stage) == (True, "bf16", 1)
    status = _study(["status", "--out", str(out), "--log-lines", "0"], root)
    assert status.stdout.count(" evaluated ") == 3 and "fire_lr10_half-s1" in status.stdout

    merged = tmp_path / "merged"
    res = _study(["report", "--out", str(merged), "--merge", str(root / "out" / "study.json"), "--from-tarball",
                  str(tmp_path / "export_b" / "study_results.tar.gz"), "--plan", str(plan), "--no-tracking"], root)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report, published = (json.loads(p.read_text()) for p in (merged / "study.json", root / "out" / "study.json"))
    new = json.loads((out / "study.json").read_text())
    assert set(report["runs"]) == set(published["runs"]) | set(new["runs"]) and len(report["runs"]) == 7
    lr10 = report["per_seed"]["prose"]["fire_lr10"]
    assert lr10["1"] == published["per_seed"]["prose"]["fire_lr10"]["1"]
    assert lr10["2"] == new["per_seed"]["prose"]["fire_lr10"]["2"]
    assert report["results"]["fire_lr10"]["256"] == pytest.approx((lr10["1"]["256"] + lr10["2"]["256"]) / 2)
    assert report["results"]["fire"] == published["results"]["fire"]
    assert report["budgets"] == {"fire_lr10": {"512": "fire_lr10_half", "1536": "fire_lr10"}}
    assert all(math.isfinite(p) for p in report["results"]["fire_enc_fp32"].values())
    md = (merged / "study.md").read_text()
    assert "| fire_lr10 | 2 |" in md.split("## Ablations")[1] and "| fire_lr10_half | 512 | 1 |" in md
