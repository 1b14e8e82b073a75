"""study.json / study.md from run directories, against numbers computed by hand: means and
spreads over seeds, rows of the RoPE variants, ablations apart from the main table; plans."""
from __future__ import annotations

import json

import pytest

from megafire.study.plan import PlanError, load_plan
from megafire.study.report import write_report

LENGTHS = [8, 16, 32]


def _run(out, name, ppl: dict, passkey=None, scalings=("none",)):
    run = out / "runs" / name
    (run / "eval").mkdir(parents=True)
    per_variant = {s: {"prose": {str(L): ppl[s][i] for i, L in enumerate(LENGTHS)},
                       "code": {str(L): 2 * ppl[s][i] for i, L in enumerate(LENGTHS)}} for s in scalings}
    ev = {"run": name, "encoding": "rope" if "linear" in scalings else "fire", "train_length": 8, "lengths": LENGTHS,
          "settings": {"x": 1}, "perplexity": per_variant, "num_windows": {"prose": 3, "code": 2},
          "doc_tokens": {"prose": [40, 50, 60], "code": [33, 99]}, "dtype": "float32", "seconds": 1.5,
          "passkey": {s: {"mean_accuracy": {"16": 0.5 if passkey is None else passkey}, "accuracy": {}} for s in scalings}}
    (run / "eval" / "study_eval.json").write_text(json.dumps(ev))
    (run / "train_done.json").write_text(json.dumps({"rc": 0, "max_steps": 2, "seconds": 10.0, "concurrency": 2}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "tokens": 64 * s, "loss": 5.0 - s,
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


def test_plan_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("model: {}\n")
    bad = {"arms: {x: {config: missing.yaml}}": "does not exist",
           "arms: {x: {config: a.yaml, eval_scalings: [linear]}}": "must include 'none'",
           "arms: {x: {config: a.yaml, colour: red}}": "unknown key",
           "bogus: 1": "unknown key"}
    for text, message in bad.items():
        (tmp_path / "plan.yaml").write_text(text + "\neval: {sets: {prose: p}}\ndata: {tokenizer_dir: t, shards_dir: s}\n")
        with pytest.raises(PlanError, match=message):
            load_plan(tmp_path / "plan.yaml")


def test_the_study_plan_loads():
    from pathlib import Path
    plan = load_plan(Path(__file__).resolve().parents[2] / "configs" / "study" / "plan.yaml")
    assert {"fire", "fire_s", "rope", "alibi", "kerple_log", "t5", "nope"} <= set(plan.arms)
    assert plan.arms["fire"].seeds == plan.arms["alibi"].seeds == [1234, 1235]
    assert plan.arms["rope"].scalings == ["none", "linear", "yarn"]
    assert sum(bool(a.ablation) for a in plan.arms.values()) == 3


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
