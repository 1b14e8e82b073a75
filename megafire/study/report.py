"""The study's numbers, table and plot, rebuilt from the run directories.

``build_report(out)`` reads ``OUT/runs/<arm>-s<seed>/`` (``config.yaml``, ``metrics.jsonl``,
``train_done.json``, ``eval/study_eval.json``) and writes:

* ``OUT/study.json``: the demo's ``length_generalization.json`` format -- ``train_length``,
  ``lengths``, ``results``: row -> length -> perplexity on the held-out prose, the mean over
  seeds -- plus ``results_code`` (the code set), ``per_seed`` and ``spread`` (min, max, sd
  over seeds) per set, ``passkey`` (row -> length -> accuracy, mean over seeds and depths),
  ``passkey_per_seed``, ``runs`` (per run: steps, tokens, final loss, tokens/s, wall seconds
  of training and evaluation, FIRE's final c and L) and ``arms`` (config, seeds, ablation).
  A row is an arm evaluated as trained, or ``rope_pi`` / ``rope_yarn``: the rope runs with
  position interpolation / YaRN at factor eval length / train length (inference only).
* ``OUT/study.md``: setup, the tables (mean +- half the range over seeds; n seeds), passkey,
  ablations against ``fire``, training summary, the plot; the reading is left to a person.
* ``OUT/study.png``: log perplexity against length, one line per row, prose and code panels,
  error bars min..max over seeds.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Optional

from .evaluate import RESULT
from .plan import VARIANT_SUFFIX
from .runner import TRAIN_DONE

MAIN_ORDER = ("fire", "fire_s", "rope", "rope_pi", "rope_yarn", "alibi", "kerple_log", "t5", "nope")


def _json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _split_name(name: str) -> tuple[str, int]:
    arm, _, seed = name.rpartition("-s")
    return arm, int(seed)


def collect_runs(out: Path) -> list[dict]:
    """One record per run directory that has an evaluation (others are listed as incomplete)."""
    runs = []
    for run in sorted(p for p in (out / "runs").glob("*-s*") if p.is_dir()):
        arm, seed = _split_name(run.name)
        runs.append({"name": run.name, "arm": arm, "seed": seed, "dir": run, "eval": _json(run / "eval" / RESULT),
                     "train": _json(run / TRAIN_DONE), "metrics": _metrics(run)})
    return runs


def _train_summary(r: dict) -> dict:
    m, t = r["metrics"], r["train"] or {}
    rates = sorted(x["tokens_per_s"] for x in m if x.get("tokens_per_s"))
    summary = {"arm": r["arm"], "seed": r["seed"], "steps": m[-1]["step"] if m else 0,
               "tokens": m[-1]["tokens"] if m else 0,
               "final_loss": m[-1]["loss"] if m else None,
               "loss_last10": statistics.fmean(x["loss"] for x in m[-10:]) if m else None,
               "tokens_per_s_median": rates[len(rates) // 2] if rates else None,
               "train_seconds": t.get("seconds"), "concurrency": t.get("concurrency"),
               "eval_seconds": (r["eval"] or {}).get("seconds")}
    if m:
        summary["encoding_values"] = {k: v for k, v in m[-1].items() if k.startswith("pos/")}
    return summary


def _gpu_seconds(runs: list[dict]) -> dict:
    """Per arm: wall seconds of training and evaluation summed over its seeds (each process
    shared the GPU with up to concurrency - 1 others, so this is an upper bound of its share)."""
    out: dict = {}
    for r in runs:
        a = out.setdefault(r["arm"], {"train": 0.0, "eval": 0.0, "runs": 0})
        a["train"] += (r["train"] or {}).get("seconds") or 0.0
        a["eval"] += (r["eval"] or {}).get("seconds") or 0.0
        a["runs"] += 1
    return out


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def _row_order(rows) -> list[str]:
    main = [r for r in MAIN_ORDER if r in rows]
    return main + sorted(r for r in rows if r not in main)


def build_numbers(out: Path, plan_arms: Optional[dict] = None) -> dict:
    """study.json's content from the run directories."""
    runs = collect_runs(out)
    done = [r for r in runs if r["eval"]]
    if not done:
        raise FileNotFoundError(f"no evaluated run under {out / 'runs'} (eval/{RESULT})")
    train_length = max(r["eval"]["train_length"] for r in done)
    lengths = sorted({int(L) for r in done for L in r["eval"]["lengths"]})
    sets = sorted({s for r in done for v in r["eval"]["perplexity"].values() for s in v},
                  key=lambda s: (s != "prose", s))      # prose first: the demo-format "results"
    per_seed = {s: {} for s in sets}
    passkey_per_seed: dict = {}
    for r in done:
        for scaling, by_set in r["eval"]["perplexity"].items():
            row = r["arm"] + VARIANT_SUFFIX[scaling]
            for s, by_len in by_set.items():
                per_seed[s].setdefault(row, {})[r["seed"]] = {int(L): p for L, p in by_len.items()}
        for scaling, pk in r["eval"].get("passkey", {}).items():
            row = r["arm"] + VARIANT_SUFFIX[scaling]
            passkey_per_seed.setdefault(row, {})[r["seed"]] = {int(L): a for L, a in pk["mean_accuracy"].items()}
    spread = {s: {row: {L: _stats([v[L] for v in seeds.values() if L in v]) for L in lengths}
                  for row, seeds in rows.items()} for s, rows in per_seed.items()}
    means = {s: {row: {L: st["mean"] for L, st in by_len.items()} for row, by_len in spread[s].items()}
             for s in sets}
    passkey = {row: {L: statistics.fmean(v[L] for v in seeds.values()) for L in sorted({L for v in seeds.values() for L in v})}
               for row, seeds in passkey_per_seed.items()}
    order = _row_order(set().union(*(set(v) for v in per_seed.values())))
    first = "prose" if "prose" in sets else sets[0]
    report = {"train_length": train_length, "lengths": lengths,
              "results": {row: means[first][row] for row in order if row in means[first]},
              "sets": sets, "rows": order,
              "per_seed": per_seed, "spread": spread, "passkey": passkey, "passkey_per_seed": passkey_per_seed,
              "runs": {r["name"]: _train_summary(r) for r in runs},
              "incomplete": [r["name"] for r in runs if not r["eval"]],
              "eval_errors": {r["name"]: r["eval"]["errors"] for r in done if r["eval"].get("errors")},
              "gpu_seconds": _gpu_seconds(runs),
              "eval_settings": done[0]["eval"]["settings"],
              "eval_docs": {s: {"num_docs": done[0]["eval"]["num_windows"][s],
                                "min_tokens": min(done[0]["eval"]["doc_tokens"][s]),
                                "max_tokens": max(done[0]["eval"]["doc_tokens"][s])} for s in sets},
              "eval_dtype": done[0]["eval"].get("dtype")}
    for s in sets:
        if s != first:
            report[f"results_{s}"] = {row: means[s][row] for row in order if row in means[s]}
    if plan_arms:
        report["arms"] = plan_arms
    return report


def _cell(st: dict) -> str:
    if st["n"] > 1:
        return f"{st['mean']:.2f} ± {(st['max'] - st['min']) / 2:.2f}"
    return f"{st['mean']:.2f}"


def _ppl_table(report: dict, s: str, rows: list[str]) -> list[str]:
    T, lengths = report["train_length"], report["lengths"]
    head = "| row | seeds | " + " | ".join(f"{L} ({L // T}x)" for L in lengths) + f" | {lengths[-1] // T}x / 1x |"
    lines = [head, "|" + "---|" * (len(lengths) + 3)]
    for row in rows:
        st = report["spread"][s].get(row)
        if not st:
            continue
        ratio = st[lengths[-1]]["mean"] / st[lengths[0]]["mean"]
        n = st[lengths[0]]["n"]
        lines.append(f"| {row} | {n} | " + " | ".join(_cell(st[L]) for L in lengths) + f" | {ratio:.2f} |")
    return lines


def write_markdown(report: dict, path: Path, data: Optional[dict] = None, reading: Optional[str] = None) -> Path:
    """study.md: setup, tables, plot; the honest reading is left for a person to write."""
    T = report["train_length"]
    rows = report["rows"]
    ablations = {a for a, spec in (report.get("arms") or {}).items() if spec.get("ablation")}
    main = [r for r in rows if r.split("_pi")[0].split("_yarn")[0] not in ablations]
    abl = ["fire"] + [r for r in rows if r in ablations] if ablations else []
    any_run = next(iter(report["runs"].values()), {})
    lines = ["# Length generalization at GPU scale: our own runs", "",
             "## Setup", "",
             f"- training length {T}; evaluation at {', '.join(str(L) for L in report['lengths'])} tokens, each window "
             "starting at a document start, the same documents at every length "
             f"(`megafire.eval.length`); weights in {report.get('eval_dtype')}.",
             f"- tokens per run: {any_run.get('tokens', 0):,} ({any_run.get('steps', 0)} steps); "
             f"runs trained {any_run.get('concurrency') or '?'} at a time on one GPU.",
             "- held-out sets: " + "; ".join(f"{s}: {d['num_docs']} documents of {d['min_tokens']:,}-"
                                             f"{d['max_tokens']:,} tokens" for s, d in report["eval_docs"].items()),
             "- rows `rope_pi` / `rope_yarn`: the rope runs evaluated with position interpolation / YaRN at "
             "factor = eval length / train length (inference-time only, no extra training).", ""]
    if data:
        lines += [f"- training data: {data['train']['num_tokens']:,} tokens in {data['train']['num_docs']:,} documents "
                  f"(prose and Python code), tokenizer BPE {data['tokenizer']['vocab_size']}.", ""]
    for s in report["sets"]:
        lines += [f"## Perplexity, held-out {s} (mean ± half the range over seeds)", ""]
        lines += _ppl_table(report, s, main) + [""]
    if report["passkey"]:
        pk_lengths = sorted({L for v in report["passkey"].values() for L in v})
        lines += ["## Passkey retrieval (accuracy, mean over depths and seeds)", "",
                  "| row | " + " | ".join(str(L) for L in pk_lengths) + " |", "|" + "---|" * (len(pk_lengths) + 1)]
        lines += [f"| {row} | " + " | ".join(f"{report['passkey'][row].get(L, float('nan')):.2f}" for L in pk_lengths)
                  + " |" for row in rows if row in report["passkey"]] + [""]
    if abl:
        notes = {a: spec["ablation"] for a, spec in report["arms"].items() if spec.get("ablation")}
        lines += ["## Ablations (each differs from `fire` in one thing)", ""]
        lines += [f"- `{a}`: {n}" for a, n in notes.items()] + [""]
        for s in report["sets"]:
            lines += [f"{s}:", ""] + _ppl_table(report, s, abl) + [""]
    lines += ["## Training", "", "| run | steps | tokens | final loss | loss (last 10) | tokens/s | train s | eval s |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in report["runs"].items():
        fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-"  # noqa: E731
        lines.append(f"| {name} | {r['steps']} | {r['tokens']:,} | {fmt(r['final_loss'], '.3f')} | "
                     f"{fmt(r['loss_last10'], '.3f')} | {fmt(r['tokens_per_s_median'], ',.0f')} | "
                     f"{fmt(r['train_seconds'], '.0f')} | {fmt(r['eval_seconds'], '.0f')} |")
    if report["incomplete"]:
        lines += ["", f"Not evaluated (incomplete): {', '.join(report['incomplete'])}"]
    lines += ["", "![length generalization](study.png)", "", "## Reading", "",
              reading.strip() if reading else "(to be written: `megafire study report --reading FILE`)", ""]
    path.write_text("\n".join(lines))
    return path


def plot(report: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sets = report["sets"]
    fig, axes = plt.subplots(1, len(sets), figsize=(6.5 * len(sets), 4.6), dpi=120, squeeze=False)
    ablations = {a for a, spec in (report.get("arms") or {}).items() if spec.get("ablation")}
    # one colour per row (the default cycle has 10; a study has more rows than that)
    palette = plt.get_cmap("tab20").colors
    colors = {row: palette[(2 * i) % 20 + (2 * i) // 20 % 2] for i, row in enumerate(report["rows"])}
    for ax, s in zip(axes[0], sets):
        for row in report["rows"]:
            st = report["spread"][s].get(row)
            if not st:
                continue
            Ls = sorted(st)
            mean = [math.log(st[L]["mean"]) for L in Ls]
            err = [[mean[i] - math.log(st[L]["min"]) for i, L in enumerate(Ls)],
                   [math.log(st[L]["max"]) - mean[i] for i, L in enumerate(Ls)]]
            style = "--" if row in ablations else (":" if row.startswith("rope_") else "-")
            ax.errorbar(Ls, mean, yerr=err, marker="o", markersize=3, linestyle=style, capsize=2, label=row,
                        color=colors[row])
        ax.axvline(report["train_length"], color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_ylabel("log perplexity")
        ax.set_title(f"held-out {s}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    from megafire.eval.plots import save_figure
    return save_figure(fig, path)


def write_report(out: Path, plan_arms: Optional[dict] = None, data_summary: Optional[Path] = None,
                 reading: Optional[Path] = None) -> dict:
    """study.json, study.md and study.png under ``out``; returns the report. ``reading``: a
    Markdown file with a person's reading of the numbers, placed under study.md's "Reading"
    (kept in the repository, so a rebuilt report keeps it)."""
    previous = _json(out / "study.json") or {}
    report = build_numbers(out, plan_arms or previous.get("arms"))
    data = _json(data_summary) if data_summary else previous.get("data")
    if data:
        report["data"] = data
    tmp = out / "study.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(out / "study.json")
    write_markdown(report, out / "study.md", data, reading.read_text() if reading else None)
    plot(report, out / "study.png")
    return report
