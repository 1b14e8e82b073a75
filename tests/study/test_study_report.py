"""study.json / study.md from run directories, against numbers computed by hand: means and
spreads over seeds, rows of the RoPE variants, ablations apart from the main table; plans."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megafire.study.plan import PlanError, load_plan, select_jobs
from megafire.study.report import MergeError, write_report

LENGTHS = [8, 16, 32]


def _run(out, name, ppl: dict, passkey=None, scalings=("none",), tokens_per_step=64, settings=None,
         doc_tokens=None):
    run = out / "runs" / name
    (run / "eval").mkdir(parents=True)
    per_variant = {s: {"prose": {str(L): ppl[s][i] for i, L in enumerate(LENGTHS)},
                       "code": {str(L): 2 * ppl[s][i] for i, L in enumerate(LENGTHS)}} for s in scalings}
    ev = {"run": name, "encoding": "rope" if "linear" in scalings else "fire", "train_length": 8, "lengths": LENGTHS,
          "settings": settings or {"x": 1}, "perplexity": per_variant, "num_windows": {"prose": 3, "code": 2},
          "doc_tokens": doc_tokens or {"prose": [40, 50, 60], "code": [33, 99]}, "dtype": "float32", "seconds": 1.5,
          "passkey": {s: {"mean_accuracy": {"16": 0.5 if passkey is None else passkey}, "accuracy": {}} for s in scalings}}
    (run / "eval" / "study_eval.json").write_text(json.dumps(ev))
    (run / "train_done.json").write_text(json.dumps({"rc": 0, "max_steps": 2, "seconds": 10.0, "concurrency": 2}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "tokens": tokens_per_step * s, "loss": 5.0 - s,
                                                           "tokens_per_s": 100.0 * s}) + "\n" for s in (1, 2)))


def test_numbers_table_and_rows(tmp_path):
    out = tmp_path / "out"
    _run(out, "fire-s1", {"none": [10.0, 11.0, 12.0]}, passkey=1.0)
    _run(out, "fire-s2", {"none": [12.0, 13.0, 18.0]}, passkey=0.0)
    _run(out, "rope-s1", {"none": [9.0, 20.0, 40.0], "linear": [9.0, 15.0, 25.0], "yarn": [9.0, 14.0, 20.0]},
         scalings=("none", "linear", "yarn"))
    _run(out, "fire_L32-s1", {"none": [11.0, 11.5, 12.5]})
    arms = {"fire": {"ablation": ""}, "rope": {"ablation": ""}, "fire_L32": {"ablation": "(c) init_L = 32"}}
    report = write_report(out, arms)
    on_disk = json.loads((out / "study.json").read_text())
    assert on_disk["train_length"] == 8 and on_disk["lengths"] == LENGTHS
    assert list(on_disk["results"]) == ["fire", "rope", "rope_pi", "rope_yarn", "fire_L32"]
    assert on_disk["results"]["fire"] == {"8": 11.0, "16": 12.0, "32": 15.0}
    assert on_disk["results_code"]["fire"]["32"] == 30.0
    assert on_disk["results"]["rope_pi"]["32"] == 25.0 and on_disk["results"]["rope_yarn"]["16"] == 14.0
    st = report["spread"]["prose"]["fire"][32]
    assert (st["min"], st["max"], st["n"]) == (12.0, 18.0, 2) and st["sd"] == pytest.approx(4.242640687)
    assert on_disk["passkey"]["fire"] == {"16": 0.5}
    assert on_disk["gpu_seconds"]["fire"] == {"train": 20.0, "eval": 3.0, "runs": 2}
    assert on_disk["runs"]["fire-s1"]["final_loss"] == 3.0 and on_disk["runs"]["fire-s1"]["tokens"] == 128
    md = (out / "study.md").read_text()
    main, rest = md.split("## Passkey")
    ablations = rest.split("## Ablations")[1]
    assert "| fire | 2 | 11.00 ± 1.00 | 12.00 ± 1.00 | 15.00 ± 3.00 | 1.36 |" in main
    assert "| rope_yarn | 1 | 9.00 | 14.00 | 20.00 | 2.22 |" in main
    assert "fire_L32" not in main and "| fire_L32 | 1 |" in ablations and "(c) init_L = 32" in ablations
    assert (out / "study.png").stat().st_size > 10_000


def test_merge_published_report_with_new_runs(tmp_path):
    """A published study.json (no run directories) + the runs of a later call: the second seed
    of an ablation joins the first in one row, a run in both is taken from the new directory,
    the token-budget trend pairs the half-budget arms with their baselines (hand-computed)."""
    old = tmp_path / "old"
    _run(old, "fire-s1", {"none": [10.0, 11.0, 12.0]})
    _run(old, "alibi-s1", {"none": [5.0, 5.0, 5.0]})
    _run(old, "lr10-s1", {"none": [8.0, 9.0, 10.0]})
    _run(old, "lr10_half-s1", {"none": [99.0, 99.0, 99.0]}, tokens_per_step=32)     # to be replaced
    arms = {"fire": {"ablation": ""}, "alibi": {"ablation": ""},
            "lr10": {"ablation": "(a) 10x", "baseline": "fire"},
            "lr10_half": {"ablation": "(h) half", "baseline": "lr10", "tokens": "0.5x"},
            "alibi_half": {"ablation": "(h) half", "baseline": "alibi", "tokens": "0.5x"}}
    write_report(old, arms)
    published = tmp_path / "published.json"
    published.write_text((old / "study.json").read_text())
    new = tmp_path / "new"
    _run(new, "lr10-s2", {"none": [10.0, 11.0, 14.0]})
    _run(new, "lr10_half-s1", {"none": [12.0, 12.0, 13.0]}, tokens_per_step=32)
    _run(new, "alibi_half-s1", {"none": [6.0, 6.0, 6.5]}, tokens_per_step=32)
    report = write_report(new, arms, merge=[published])
    on_disk = json.loads((new / "study.json").read_text())
    assert set(on_disk["runs"]) == {"fire-s1", "alibi-s1", "lr10-s1", "lr10-s2", "lr10_half-s1", "alibi_half-s1"}
    assert on_disk["per_seed"]["prose"]["lr10"] == {"1": {"8": 8.0, "16": 9.0, "32": 10.0},
                                                    "2": {"8": 10.0, "16": 11.0, "32": 14.0}}
    assert on_disk["results"]["lr10"] == {"8": 9.0, "16": 10.0, "32": 12.0}
    assert on_disk["results_code"]["lr10"]["32"] == 24.0
    assert on_disk["results"]["lr10_half"] == {"8": 12.0, "16": 12.0, "32": 13.0}      # the new run, not 99
    assert on_disk["results"]["fire"] == {"8": 10.0, "16": 11.0, "32": 12.0}           # from the published file
    assert on_disk["gpu_seconds"]["lr10"] == {"train": 20.0, "eval": 3.0, "runs": 2}
    # token budgets: runs of 2 steps x 64 (128) and x 32 (64) tokens
    assert on_disk["budgets"] == {"lr10": {"64": "lr10_half", "128": "lr10"},
                                  "alibi": {"64": "alibi_half", "128": "alibi"}}
    gap = report["budget_gaps"]["lr10"]["prose"]
    assert gap[128] == pytest.approx({8: 9.0 / 5.0, 16: 10.0 / 5.0, 32: 12.0 / 5.0})
    assert gap[64] == pytest.approx({8: 12.0 / 6.0, 16: 12.0 / 6.0, 32: 13.0 / 6.5})
    md = (new / "study.md").read_text()
    ablations = md.split("## Ablations")[1].split("## Token budget")[0]
    budget = md.split("## Token budget")[1].split("## Training")[0]
    assert "- `lr10_half` (vs `lr10`): (h) half" in ablations
    prose = ablations.split("code:")[0]
    assert [ln.split(" | ")[0] for ln in prose.splitlines() if ln.startswith("| ") and " | " in ln][1:] == \
        ["| fire", "| lr10", "| lr10_half", "| alibi", "| alibi_half"]        # each baseline, then its ablations
    assert "| lr10 | 2 | 9.00 ± 1.00 | 10.00 ± 1.00 | 12.00 ± 2.00 | 1.33 |" in prose
    assert "| lr10_half | 64 | 1 | 12.00 | 12.00 | 13.00 | 1.08 |" in budget
    assert "| lr10 | 128 | 2 | 9.00 ± 1.00 | 10.00 ± 1.00 | 12.00 ± 2.00 | 1.33 |" in budget
    assert "| lr10 | 64 | 2.000 | 2.000 | 2.000 |" in budget and "| lr10 | 128 | 1.800 | 2.000 | 2.400 |" in budget
    assert "tokens per run: 128 (2 steps); other budgets: 64" in md
    # the merged report merges again to the same numbers (the published file can be rebuilt from itself)
    again = write_report(tmp_path / "again", arms, merge=[new / "study.json"])
    assert json.loads((tmp_path / "again" / "study.json").read_text())["results"] == on_disk["results"]
    assert again["budgets"] == report["budgets"]


def test_other_budgets_without_a_plan_budget_are_noted_not_trended(tmp_path):
    """An ablation run on other tokens than its baseline by accident (e.g. another --tokens in a
    later call) is flagged under the ablations; only arms with their own `tokens` make the trend."""
    out = tmp_path / "out"
    _run(out, "fire-s1", {"none": [10.0, 11.0, 12.0]})
    _run(out, "lr30-s1", {"none": [9.0, 9.0, 9.0]}, tokens_per_step=32)
    _run(out, "lr10-s1", {"none": [9.0, 9.0, 9.0]})
    _run(out, "lr10-s2", {"none": [9.0, 9.0, 9.0]}, tokens_per_step=32)
    report = write_report(out, {"fire": {"ablation": ""}, "lr30": {"ablation": "30x", "baseline": "fire"},
                                "lr10": {"ablation": "10x", "baseline": "fire"}})
    assert report["budgets"] == {} and report["budget_gaps"] == {}
    md = (out / "study.md").read_text()
    assert "- note: `lr30` trained on 64 tokens, its baseline `fire` on 128" in md
    assert "- note: the runs of `lr10` trained on different budgets (64, 128)" in md
    assert "## Token budget" not in md


def test_merge_refuses_other_evaluations(tmp_path):
    old = tmp_path / "old"
    _run(old, "fire-s1", {"none": [10.0, 11.0, 12.0]})
    write_report(old, {"fire": {"ablation": ""}})
    new = tmp_path / "new"
    _run(new, "fire-s2", {"none": [10.0, 11.0, 12.0]}, settings={"x": 2})
    with pytest.raises(MergeError, match="eval_settings"):
        write_report(new, {"fire": {"ablation": ""}}, merge=[old / "study.json"])


def test_merge_across_data_builds_only_when_told_and_recorded(tmp_path):
    """Runs on a rebuild of the study data (same held-out documents, other token counts) are
    refused with a hint; with allow_data_rebuild they merge and the report lists each run's build
    (tokenizer checksum, documents, token counts) in the JSON and in study.md's setup."""
    old = tmp_path / "old"
    _run(old, "fire-s1", {"none": [10.0, 11.0, 12.0]})
    _run(old, "alibi-s1", {"none": [8.0, 8.5, 9.0]})
    data_a = {"train": {"num_docs": 10, "num_tokens": 1000}, "tokenizer": {"vocab_size": 64, "sha256": "a" * 64}}
    (old / "study.json").write_text("{}")
    report = write_report(old, {"fire": {"ablation": ""}, "alibi": {"ablation": ""}})
    published = json.loads((old / "study.json").read_text())
    published["data"] = data_a
    (tmp_path / "published.json").write_text(json.dumps(published))
    new = tmp_path / "new"
    rebuilt = {"prose": [41, 50, 59], "code": [33, 98]}
    _run(new, "fire-s2", {"none": [10.5, 11.5, 12.5]}, doc_tokens=rebuilt)
    _run(new, "alibi-s1", {"none": [7.0, 7.5, 8.0]}, doc_tokens=rebuilt)     # replaces the published alibi-s1
    data_b = {"train": {"num_docs": 9, "num_tokens": 990}, "tokenizer": {"vocab_size": 64, "sha256": "b" * 64}}
    (new / "study.json").write_text(json.dumps({"data": data_b}))
    arms = {"fire": {"ablation": ""}, "alibi": {"ablation": ""}}
    with pytest.raises(MergeError, match="--allow-data-rebuild"):
        write_report(new, arms, merge=[tmp_path / "published.json"])
    report = write_report(new, arms, merge=[tmp_path / "published.json"], allow_data_rebuild=True)
    builds = report["data_builds"]
    assert [(b["tokenizer_sha256"][0], b["train_docs"], b["runs"]) for b in builds] == \
        [("a", 10, ["fire-s1"]), ("b", 9, ["alibi-s1", "fire-s2"])]
    assert builds[1]["eval_docs"]["prose"] == {"num_docs": 3, "min_tokens": 41, "max_tokens": 59}
    assert report["per_seed"]["prose"]["fire"] == {1: {8: 10.0, 16: 11.0, 32: 12.0}, 2: {8: 10.5, 16: 11.5, 32: 12.5}}
    assert report["per_seed"]["prose"]["alibi"] == {1: {8: 7.0, 16: 7.5, 32: 8.0}}
    md = (new / "study.md").read_text()
    assert "2 builds of the study data" in md and "tokenizer sha256 aaaaaaaaaaaa..., 10 training documents" in md
    assert "bbbbbbbbbbbb..., 9 training documents, held-out code 33-98 tokens; prose 41-59 tokens: alibi-s1, fire-s2" in md
    with pytest.raises(MergeError, match="eval_settings"):   # anything else still refuses, flag or not
        _run(tmp_path / "other", "fire-s3", {"none": [1.0, 1.0, 1.0]}, settings={"x": 2}, doc_tokens=rebuilt)
        write_report(tmp_path / "other", arms, merge=[tmp_path / "published.json"], allow_data_rebuild=True)


def test_plan_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("model: {}\n")
    bad = {"arms: {x: {config: missing.yaml}}": "does not exist",
           "arms: {x: {config: a.yaml, eval_scalings: [linear]}}": "must include 'none'",
           "arms: {x: {config: a.yaml, colour: red}}": "unknown key",
           "arms: {x: {config: a.yaml, tokens: half}}": "tokens must be",
           "arms: {x: {config: a.yaml, tokens: -5}}": "tokens must be",
           "arms: {x: {config: a.yaml, ablation: y, baseline: z}}": "baseline 'z' is not an arm",
           "arms: {x-s1: {config: a.yaml}}": "job names",
           "bogus: 1": "unknown key"}
    for text, message in bad.items():
        (tmp_path / "plan.yaml").write_text(text + "\neval: {sets: {prose: p}}\ndata: {tokenizer_dir: t, shards_dir: s}\n")
        with pytest.raises(PlanError, match=message):
            load_plan(tmp_path / "plan.yaml")


def test_arm_budgets_and_job_selection(tmp_path):
    (tmp_path / "a.yaml").write_text("model: {}\n")
    (tmp_path / "plan.yaml").write_text(
        "tokens: 1000\nseeds: [1, 2]\narms:\n  a: {config: a.yaml}\n  a_half: {config: a.yaml, tokens: 0.5x}\n"
        "  a_fixed: {config: a.yaml, tokens: 300, seeds: [7]}\n  b: {config: a.yaml, ablation: y, baseline: a}\n"
        "eval: {sets: {prose: p}}\ndata: {tokenizer_dir: t, shards_dir: s}\n")
    plan = load_plan(tmp_path / "plan.yaml")
    assert [plan.arms[a].budget(1000) for a in ("a", "a_half", "a_fixed")] == [1000, 500, 300]
    assert plan.arms["a_half"].budget(4096) == 2048 and plan.arms["a_fixed"].budget(4096) == 300
    assert plan.arms["b"].baseline == "a" and plan.arms["a"].baseline == ""
    jobs = select_jobs(plan, tmp_path, ["a_fixed", "a-s2", "b", "a-s2"])
    assert [j.name for j in jobs] == ["a_fixed-s7", "a-s2", "b-s1", "b-s2"]
    assert [j.name for j in select_jobs(plan, tmp_path, ["a", "b-s9"], seeds=[5])] == ["a-s5", "b-s9"]
    with pytest.raises(PlanError, match="unknown arm"):
        select_jobs(plan, tmp_path, ["c-s1"])


ROOT = Path(__file__).resolve().parents[2]


def test_the_study_plan_loads():
    plan = load_plan(ROOT / "configs" / "study" / "plan.yaml")
    assert {"fire", "fire_s", "rope", "alibi", "kerple_log", "t5", "nope"} <= set(plan.arms)
    assert plan.arms["fire"].seeds == plan.arms["alibi"].seeds == [1234, 1235]
    assert plan.arms["fire_enc_lr10"].seeds == [1234, 1235]
    assert plan.arms["rope"].scalings == ["none", "linear", "yarn"]
    budgets = {a.name: a.budget(plan.tokens) for a in plan.arms.values() if a.budget(plan.tokens) != plan.tokens}
    assert budgets == {"fire_enc_lr10_half": 10_485_760, "alibi_half": 10_485_760,
                       "fire_enc_lr10_2x": 41_943_040, "alibi_2x": 41_943_040}
    assert {a.name: a.baseline for a in plan.arms.values() if a.ablation} == {
        "fire_enc_lr10": "fire", "fire_L512": "fire", "fire_L32": "fire", "fire_enc_lr30": "fire",
        "fire_enc_fp32": "fire", "fire_fp32": "fire", "fire_enc_lr10_half": "fire_enc_lr10",
        "fire_enc_lr10_2x": "fire_enc_lr10", "fire_s_enc_lr10": "fire_s", "t5_enc_lr10": "t5",
        "alibi_half": "alibi", "alibi_2x": "alibi"}


def test_each_ablation_differs_from_its_baseline_in_one_thing():
    """Resolved configs: one key apart (besides run.name), or none and another token budget."""
    from megafire.config import load_config
    plan = load_plan(ROOT / "configs" / "study" / "plan.yaml")
    for arm in (a for a in plan.arms.values() if a.ablation):
        base = plan.arms[arm.baseline]
        mine, theirs = load_config(arm.config).flat(), load_config(base.config).flat()
        diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k) and k != "run.name")
        other_budget = arm.budget(plan.tokens) != base.budget(plan.tokens)
        assert len(diff) + other_budget == 1, (arm.name, diff, other_budget)


def test_the_third_call_runs_only_jobs_of_the_plan_and_they_are_published():
    """launch/device_study_call3.sh: its jobs are jobs of the plan, and since the call ran
    (2026-12-03) every one of them is in docs/study.json, under the second data build (the first
    build holds the twelve earlier runs alone)."""
    import re
    script = (ROOT / "launch" / "device_study_call3.sh").read_text()
    jobs = re.search(r'^ARMS="?([^"\s]+)"?', script, re.M).group(1).split(",")
    plan = load_plan(ROOT / "configs" / "study" / "plan.yaml")
    names = {j.name for j in select_jobs(plan, Path("/x"), jobs)}
    report = json.loads((ROOT / "docs" / "study.json").read_text())
    first, second = report["data_builds"]
    assert names and set(second["runs"]) == names and not names & set(first["runs"]) and len(first["runs"]) == 12
    assert set(report["runs"]) == names | set(first["runs"])
    assert names == {"fire_enc_lr10-s1235", "fire_enc_lr30-s1234", "fire_s_enc_lr10-s1234", "t5_enc_lr10-s1234",
                     "fire_enc_fp32-s1234", "fire_enc_lr10_half-s1234", "alibi_half-s1234"}


def test_reading_is_kept_under_its_heading(tmp_path):
    """`study report --reading FILE`: the person's reading replaces the placeholder, so a rebuilt
    report (new runs, same reading file) keeps it; without it the placeholder says how."""
    out = tmp_path / "out"
    _run(out, "fire-s1", {"none": [10.0, 11.0, 12.0]})
    write_report(out, {"fire": {"ablation": ""}})
    assert "(to be written: `megafire study report --reading FILE`)" in (out / "study.md").read_text()
    reading = tmp_path / "reading.md"
    reading.write_text("FIRE trails ALiBi here.\n")
    write_report(out, {"fire": {"ablation": ""}}, reading=reading)
    md = (out / "study.md").read_text()
    assert md.rstrip().endswith("## Reading\n\nFIRE trails ALiBi here.") and "to be written" not in md


def test_status_table_reads_live_and_finished_runs(tmp_path):
    """`study status`: one line per run; a run still writing metrics.jsonl (a torn last line) shows
    its last complete step as 'training', an evaluated one its prose perplexities."""
    from megafire.study.cli import status_table
    out = tmp_path / "out"
    _run(out, "fire-s1", {"none": [10.0, 11.0, 12.0]})
    live = out / "runs" / "rope-s1"
    live.mkdir(parents=True)
    (live / "metrics.jsonl").write_text(json.dumps({"step": 7, "tokens": 448, "loss": 3.25}) + '\n{"step": 8, "to')
    lines = status_table(out)
    assert len(lines) == 3
    fire, rope = lines[1].split(), lines[2].split()
    assert fire[:3] == ["fire-s1", "evaluated", "2/2"] and lines[1].endswith("10.00 / 12.00 / 12.00")
    assert rope[:4] == ["rope-s1", "training", "7/?", "448"] and "3.250" in rope
