"""The study's numbers, table and plot, rebuilt from the run directories.

``write_report(out)`` reads ``OUT/runs/<arm>-s<seed>/`` (``config.yaml``, ``metrics.jsonl``,
``train_done.json``, ``eval/study_eval.json``), folds in any written study.json given as
``merge`` (e.g. the published docs/study.json: a later GPU call adds runs to it without
re-running the old ones; a run directory replaces the merged run of the same arm and seed;
results evaluated differently are refused), and writes:

* ``OUT/study.json``: the demo's ``length_generalization.json`` format -- ``train_length``,
  ``lengths``, ``results``: row -> length -> perplexity on the held-out prose, the mean over
  seeds -- plus ``results_code`` (the code set), ``per_seed`` and ``spread`` (min, max, sd
  over seeds) per set, ``passkey`` (row -> length -> accuracy, mean over seeds and depths),
  ``passkey_per_seed``, ``runs`` (per run: steps, tokens, final loss, tokens/s, wall seconds
  of training and evaluation, FIRE's final c and L), ``arms`` (config, seeds, ablation,
  baseline, own token budget), ``budgets`` (arm -> tokens -> row, for arms trained at several
  budgets) and ``budget_gaps`` (their perplexity over BUDGET_REFERENCE's at the same budget).
  A row is an arm evaluated as trained, or ``rope_pi`` / ``rope_yarn``: the rope runs with
  position interpolation / YaRN at factor eval length / train length (inference only).
* ``OUT/study.md``: setup, the tables (mean +- half the range over seeds; n seeds), passkey,
  ablations (each after its baseline), the token-budget trend, training summary, the plot;
  the reading is left to a person.
* ``OUT/study.png``: log perplexity against length, one line per row, prose and code panels,
  error bars min..max over seeds.
"""
from __future__ import annotations

import copy
import json
import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional

from megafire.config import ConfigError, MissingFileError

from .evaluate import RESULT
from .plan import DEFAULT_BASELINE, VARIANT_SUFFIX
from .runner import TRAIN_DONE

MAIN_ORDER = ("fire", "fire_s", "rope", "rope_pi", "rope_yarn", "alibi", "kerple_log", "t5", "nope")
#: the token-budget section compares every arm trained at several budgets with this one (the
#: study's best baseline) at the same budget
BUDGET_REFERENCE = "alibi"


def _json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _metrics(run: Path) -> list[dict]:
    """The records of a run's metrics.jsonl; a last line still being written (a live run, read by
    ``study status``) is left out, a malformed earlier one raises."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines[:-1]]
    try:
        records += [json.loads(lines[-1])] if lines else []
    except json.JSONDecodeError:
        pass
    return records


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


def _gpu_seconds(runs: dict) -> dict:
    """Per arm: wall seconds of training and evaluation summed over its seeds (each process
    shared the GPU with up to concurrency - 1 others, so this is an upper bound of its share)."""
    out: dict = {}
    for r in runs.values():
        a = out.setdefault(r["arm"], {"train": 0.0, "eval": 0.0, "runs": 0})
        a["train"] += r.get("train_seconds") or 0.0
        a["eval"] += r.get("eval_seconds") or 0.0
        a["runs"] += 1
    return out


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def _row_order(rows) -> list[str]:
    main = [r for r in MAIN_ORDER if r in rows]
    return main + sorted(r for r in rows if r not in main)


class MergeError(ConfigError):
    """Results that cannot share one table (different evaluation settings or held-out sets)."""


def collect_numbers(out: Path) -> Optional[dict]:
    """The per-run numbers of the run directories under ``out`` (None: no evaluated run):
    per_seed / passkey_per_seed by set, row and seed, the runs' training summaries and the
    evaluation's settings; :func:`derive` turns them into the report."""
    runs = collect_runs(out)
    done = [r for r in runs if r["eval"]]
    if not done:
        return None
    sets = sorted({s for r in done for v in r["eval"]["perplexity"].values() for s in v})
    per_seed: dict = {s: {} for s in sets}
    passkey_per_seed: dict = {}
    for r in done:
        for scaling, by_set in r["eval"]["perplexity"].items():
            row = r["arm"] + VARIANT_SUFFIX[scaling]
            for s, by_len in by_set.items():
                per_seed[s].setdefault(row, {})[r["seed"]] = {int(L): p for L, p in by_len.items()}
        for scaling, pk in r["eval"].get("passkey", {}).items():
            row = r["arm"] + VARIANT_SUFFIX[scaling]
            passkey_per_seed.setdefault(row, {})[r["seed"]] = {int(L): a for L, a in pk["mean_accuracy"].items()}
    first = done[0]["eval"]
    return {"train_length": max(r["eval"]["train_length"] for r in done),
            "lengths": sorted({int(L) for r in done for L in r["eval"]["lengths"]}),
            "per_seed": per_seed, "passkey_per_seed": passkey_per_seed,
            "runs": {r["name"]: _train_summary(r) for r in runs},
            "incomplete": [r["name"] for r in runs if not r["eval"]],
            "eval_errors": {r["name"]: r["eval"]["errors"] for r in done if r["eval"].get("errors")},
            "eval_settings": first["settings"],
            "eval_docs": {s: {"num_docs": first["num_windows"][s], "min_tokens": min(first["doc_tokens"][s]),
                              "max_tokens": max(first["doc_tokens"][s])} for s in sets},
            "eval_dtype": first.get("dtype")}


def numbers_from_report(report: dict) -> dict:
    """:func:`collect_numbers`'s content from a written study.json (JSON keys back to ints)."""
    def by_seed(rows: dict) -> dict:
        return {row: {int(seed): {int(L): v for L, v in by_len.items()} for seed, by_len in seeds.items()}
                for row, seeds in rows.items()}
    keys = ("train_length", "lengths", "runs", "incomplete", "eval_errors", "eval_settings", "eval_docs", "eval_dtype")
    out = {k: copy.deepcopy(report.get(k)) for k in keys}
    out["lengths"] = [int(L) for L in out["lengths"]]
    out["incomplete"], out["eval_errors"] = out["incomplete"] or [], out["eval_errors"] or {}
    out["per_seed"] = {s: by_seed(rows) for s, rows in report["per_seed"].items()}
    out["passkey_per_seed"] = by_seed(report.get("passkey_per_seed") or {})
    return out


def _comparable(n: dict) -> dict:
    """What must agree for two sets of numbers to share a table (held-out set paths may differ
    between machines; their names, sizes and the evaluation settings may not)."""
    settings = dict(n["eval_settings"] or {})
    settings["sets"] = sorted(settings.get("sets") or {})
    return {"train_length": n["train_length"], "lengths": n["lengths"], "eval_settings": settings,
            "eval_docs": n["eval_docs"], "eval_dtype": n["eval_dtype"]}


def _same_documents(a: dict, b: dict) -> bool:
    """Two ``eval_docs`` of the same held-out sets and document counts (token counts may differ)."""
    return {s: d["num_docs"] for s, d in a.items()} == {s: d["num_docs"] for s, d in b.items()}


def merge_numbers(base: dict, new: dict, allow_data_rebuild: bool = False) -> dict:
    """``base`` + ``new`` (numbers of :func:`collect_numbers` / :func:`numbers_from_report`); a run
    in both (same arm and seed) is taken from ``new``. Refused when the evaluations differ, except,
    with ``allow_data_rebuild``, in the held-out documents' token counts alone (the same documents
    under a rebuilt tokenizer: :func:`build_numbers` records which runs used which build)."""
    a, b = _comparable(base), _comparable(new)
    if a != b:
        diff = sorted(k for k in a if a[k] != b[k])
        rebuild = diff == ["eval_docs"] and _same_documents(a["eval_docs"], b["eval_docs"])
        if not (rebuild and allow_data_rebuild):
            hint = (" (the same documents with other token counts: another build of the study data; "
                    "--allow-data-rebuild merges them and records each run's build)") if rebuild else ""
            raise MergeError(f"study report: the results to merge were evaluated differently ({', '.join(diff)}): "
                             + "; ".join(f"{k}: {a[k]} vs {b[k]}" for k in diff) + hint)
    out = copy.deepcopy(base)
    for s, rows in new["per_seed"].items():
        for row, seeds in rows.items():
            out["per_seed"].setdefault(s, {}).setdefault(row, {}).update(copy.deepcopy(seeds))
    for row, seeds in new["passkey_per_seed"].items():
        out["passkey_per_seed"].setdefault(row, {}).update(copy.deepcopy(seeds))
    out["runs"].update(copy.deepcopy(new["runs"]))
    out["eval_errors"].update(new["eval_errors"])
    done = {name for name in new["runs"] if name not in new["incomplete"]}
    out["incomplete"] = sorted((set(out["incomplete"]) - done) | set(new["incomplete"]))
    return out


def derive(n: dict, plan_arms: Optional[dict] = None) -> dict:
    """study.json's content from the per-run numbers: means and spreads over seeds per row."""
    lengths = n["lengths"]
    sets = sorted(n["per_seed"], key=lambda s: (s != "prose", s))      # prose first: the demo-format "results"
    per_seed = n["per_seed"]
    spread = {s: {row: {L: _stats([v[L] for v in seeds.values() if L in v]) for L in lengths}
                  for row, seeds in rows.items()} for s, rows in per_seed.items()}
    means = {s: {row: {L: st["mean"] for L, st in by_len.items()} for row, by_len in spread[s].items()}
             for s in sets}
    passkey = {row: {L: statistics.fmean(v[L] for v in seeds.values() if L in v)
                     for L in sorted({L for v in seeds.values() for L in v})}
               for row, seeds in n["passkey_per_seed"].items()}
    order = _row_order(set().union(*(set(v) for v in per_seed.values())))
    first = "prose" if "prose" in sets else sets[0]
    runs = dict(sorted(n["runs"].items()))
    report = {"train_length": n["train_length"], "lengths": lengths,
              "results": {row: means[first][row] for row in order if row in means[first]},
              "sets": sets, "rows": order,
              "per_seed": per_seed, "spread": spread, "passkey": passkey, "passkey_per_seed": n["passkey_per_seed"],
              "runs": runs, "incomplete": n["incomplete"], "eval_errors": n["eval_errors"],
              "gpu_seconds": _gpu_seconds(runs),
              "eval_settings": n["eval_settings"], "eval_docs": n["eval_docs"], "eval_dtype": n["eval_dtype"]}
    for s in sets:
        if s != first:
            report[f"results_{s}"] = {row: means[s][row] for row in order if row in means[s]}
    if plan_arms:
        report["arms"] = plan_arms
    report["budgets"], report["budget_gaps"] = token_budgets(report)
    return report


def _data_build(numbers: dict, data: Optional[dict]) -> dict:
    """What identifies one build of the study data: the tokenizer's checksum (when known), the
    training documents and the held-out token counts."""
    tok = (data or {}).get("tokenizer") or {}
    train = (data or {}).get("train") or {}
    return {"tokenizer_sha256": tok.get("sha256"), "train_docs": train.get("num_docs"),
            "train_tokens": train.get("num_tokens"), "eval_docs": numbers["eval_docs"]}


def build_numbers(out: Path, plan_arms: Optional[dict] = None, merge: Iterable[dict] = (), *,
                  data: Optional[dict] = None, allow_data_rebuild: bool = False) -> dict:
    """study.json's content from the run directories under ``out`` (trained on the study data
    ``data`` describes), folded over the published reports in ``merge`` (in order; the run
    directories last, so they win for a shared run). Runs of more than one data build (merged
    with ``allow_data_rebuild``) are listed by build under ``data_builds``."""
    parts = [(numbers_from_report(m), m.get("data")) for m in merge]
    found = collect_numbers(out)
    if found is not None:
        parts.append((found, data))
    if not parts:
        raise FileNotFoundError(f"no evaluated run under {out / 'runs'} (eval/{RESULT})")
    numbers = parts[0][0]
    for part, _ in parts[1:]:
        numbers = merge_numbers(numbers, part, allow_data_rebuild)
    builds: list[dict] = []
    for i, (part, part_data) in enumerate(parts):
        later = {name for p, _ in parts[i + 1:] for name in p["runs"]}
        runs = sorted(name for name in part["runs"] if name not in later)
        build = _data_build(part, part_data)
        same = next((b for b in builds if {k: v for k, v in b.items() if k != "runs"} == build), None)
        if same is not None:
            same["runs"] = sorted(same["runs"] + runs)
        elif runs:
            builds.append({**build, "runs": runs})
    report = derive(numbers, plan_arms)
    if len(builds) > 1:
        report["data_builds"] = builds
    return report


def _arm_of(row: str, arms: dict) -> str:
    """The arm of a row (rope_pi / rope_yarn are rows of the rope arm)."""
    if row in arms:
        return row
    for suffix in VARIANT_SUFFIX.values():
        if suffix and row.endswith(suffix) and row[: -len(suffix)] in arms:
            return row[: -len(suffix)]
    return row


def _baseline(arm: str, arms: dict) -> str:
    spec = arms.get(arm) or {}
    if not spec.get("ablation"):
        return ""
    return spec.get("baseline") or DEFAULT_BASELINE


def _row_tokens(report: dict, row: str) -> Optional[int]:
    """The training tokens of a row's runs (None: none recorded, or they differ between seeds)."""
    tokens = {r["tokens"] for r in report["runs"].values() if r["arm"] == row and r.get("tokens")}
    return tokens.pop() if len(tokens) == 1 else None


def _budget_arm(arm: str, arms: dict) -> bool:
    """An ablation whose plan entry gives it its own token budget (``tokens``)."""
    return bool(_baseline(arm, arms)) and (arms.get(arm) or {}).get("tokens") is not None


def token_budgets(report: dict) -> tuple[dict, dict]:
    """The token-budget trend: ``{family: {tokens: row}}`` for each arm trained at several budgets
    (an ablation with its own ``tokens`` in the plan is its baseline at another budget), and
    each other family's ratio to BUDGET_REFERENCE at the budgets both have:
    ``{family: {set: {tokens: {L: ppl / reference ppl}}}}`` (> 1: behind the reference)."""
    arms = report.get("arms") or {}
    families: dict = {}
    for row in report["rows"]:
        if row not in arms or _row_tokens(report, row) is None:
            continue
        family = row
        while _budget_arm(family, arms):
            family = _baseline(family, arms)
        families.setdefault(family, {})[_row_tokens(report, row)] = row
    budgets = {f: dict(sorted(rows.items())) for f, rows in families.items() if len(rows) > 1}
    gaps: dict = {}
    ref = budgets.get(BUDGET_REFERENCE)
    for family, rows in budgets.items() if ref else ():
        if family == BUDGET_REFERENCE:
            continue
        for s in report["sets"]:
            means = report["spread"][s]
            for tokens, row in rows.items():
                if tokens in ref and row in means and ref[tokens] in means:
                    gaps.setdefault(family, {}).setdefault(s, {})[tokens] = {
                        L: means[row][L]["mean"] / means[ref[tokens]][L]["mean"] for L in report["lengths"]}
    return budgets, gaps


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


def _ablation_rows(report: dict) -> list[str]:
    """Rows of the ablation tables: each baseline followed by its ablations (depth first, row
    order), e.g. fire, fire_enc_lr10, fire_enc_lr10_half, ..., t5, t5_enc_lr10."""
    arms, rows = report.get("arms") or {}, report["rows"]
    children: dict = {}
    for row in rows:
        if _baseline(row, arms):
            children.setdefault(_baseline(row, arms), []).append(row)
    out: list[str] = []

    def visit(row):
        if row not in out:
            out.append(row)
            for child in children.get(row, []):
                visit(child)
    for row in rows:
        if row in children and not _baseline(row, arms):
            visit(row)
    for row in rows:                       # an ablation whose baseline has no results
        if row in children or _baseline(row, arms):
            visit(row)
    return out


def _budget_lines(report: dict) -> list[str]:
    """The token-budget section: each arm at its budgets, then the ratio to the reference."""
    budgets, gaps = report.get("budgets") or {}, report.get("budget_gaps") or {}
    if not budgets:
        return []
    T, lengths = report["train_length"], report["lengths"]
    lines = ["## Token budget (the same arm trained on more or fewer tokens)", ""]
    for s in report["sets"]:
        lines += [f"{s}:", "", "| row | tokens | seeds | " + " | ".join(f"{L} ({L // T}x)" for L in lengths)
                  + f" | {lengths[-1] // T}x / 1x |", "|" + "---|" * (len(lengths) + 4)]
        for family, rows in budgets.items():
            for tokens, row in rows.items():
                st = report["spread"][s].get(row)
                if st:
                    lines.append(f"| {row} | {tokens:,} | {st[lengths[0]]['n']} | "
                                 + " | ".join(_cell(st[L]) for L in lengths)
                                 + f" | {st[lengths[-1]]['mean'] / st[lengths[0]]['mean']:.2f} |")
        lines.append("")
        fam_gaps = {f: g[s] for f, g in gaps.items() if s in g}
        if fam_gaps:
            lines += [f"perplexity / `{BUDGET_REFERENCE}`'s at the same budget ({s}; > 1: behind it):", "",
                      "| arm | tokens | " + " | ".join(f"{L // T}x" for L in lengths) + " |",
                      "|" + "---|" * (len(lengths) + 2)]
            for family, by_tokens in fam_gaps.items():
                lines += [f"| {family} | {tokens:,} | " + " | ".join(f"{r[L]:.3f}" for L in lengths) + " |"
                          for tokens, r in by_tokens.items()]
            lines.append("")
    return lines


def _setup_lines(report: dict, data: Optional[dict]) -> list[str]:
    T = report["train_length"]
    runs = report["runs"].values()
    tokens = Counter((r.get("tokens", 0), r.get("steps", 0)) for r in runs)
    (common, steps), _ = tokens.most_common(1)[0] if tokens else ((0, 0), 0)
    others = sorted({t for t, _ in tokens} - {common})
    concurrency = sorted({r.get("concurrency") for r in runs if r.get("concurrency")})
    at_once = "-".join(str(c) for c in (concurrency[:1] + concurrency[-1:] if len(concurrency) > 1 else concurrency))
    lines = ["## Setup", "",
             f"- training length {T}; evaluation at {', '.join(str(L) for L in report['lengths'])} tokens, each window "
             "starting at a document start, the same documents at every length "
             f"(`megafire.eval.length`); weights in {report.get('eval_dtype')}.",
             f"- tokens per run: {common:,} ({steps} steps)"
             + (f"; other budgets: {', '.join(f'{t:,}' for t in others)} (section 'Token budget')" if others else "")
             + f"; runs trained {at_once or '?'} at a time on one GPU.",
             "- held-out sets: " + "; ".join(f"{s}: {d['num_docs']} documents of {d['min_tokens']:,}-"
                                             f"{d['max_tokens']:,} tokens" for s, d in report["eval_docs"].items()),
             "- rows `rope_pi` / `rope_yarn`: the rope runs evaluated with position interpolation / YaRN at "
             "factor = eval length / train length (inference-time only, no extra training).", ""]
    if data:
        lines += [f"- training data: {data['train']['num_tokens']:,} tokens in {data['train']['num_docs']:,} documents "
                  f"(prose and Python code), tokenizer BPE {data['tokenizer']['vocab_size']}.", ""]
    builds = report.get("data_builds") or []
    if builds:
        lines += [f"- **{len(builds)} builds of the study data** (`data_prep/build_study_data.py` on machines with other "
                  "Debian package versions: the same held-out documents, a retrained tokenizer, token counts that differ "
                  "slightly); the rows compare runs across builds:"]
        for b in builds:
            docs = "; ".join(f"{s} {d['min_tokens']:,}-{d['max_tokens']:,} tokens" for s, d in b["eval_docs"].items())
            sha = (b.get("tokenizer_sha256") or "unknown")[:12]
            train = f"{b['train_docs']:,} training documents, " if b.get("train_docs") else ""
            lines.append(f"  - tokenizer sha256 {sha}..., {train}held-out {docs}: {', '.join(b['runs'])}")
        lines.append("")
    return lines


def write_markdown(report: dict, path: Path, data: Optional[dict] = None, reading: Optional[str] = None) -> Path:
    """study.md: setup, tables, plot; the honest reading is left for a person to write."""
    rows = report["rows"]
    arms = report.get("arms") or {}
    ablations = {a for a, spec in arms.items() if spec.get("ablation")}
    main = [r for r in rows if _arm_of(r, arms) not in ablations]
    abl = _ablation_rows(report) if ablations & set(rows) else []
    lines = ["# Length generalization at GPU scale: our own runs", ""] + _setup_lines(report, data)
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
        lines += ["## Ablations (each differs from its baseline in one thing)", ""]
        lines += [f"- `{a}` (vs `{_baseline(a, arms)}`): {arms[a]['ablation']}" for a in abl if a in ablations]
        lines += [f"- note: `{a}` trained on {_row_tokens(report, a):,} tokens, its baseline `{_baseline(a, arms)}` on "
                  f"{_row_tokens(report, _baseline(a, arms)):,}" for a in abl if a in ablations
                  and not _budget_arm(a, arms) and None not in (_row_tokens(report, a), _row_tokens(report, _baseline(a, arms)))
                  and _row_tokens(report, a) != _row_tokens(report, _baseline(a, arms))]
        lines += [f"- note: the runs of `{a}` trained on different budgets "
                  f"({', '.join(f'{t:,}' for t in sorted({r['tokens'] for r in report['runs'].values() if r['arm'] == a}))})"
                  for a in abl if len({r["tokens"] for r in report["runs"].values() if r["arm"] == a}) > 1] + [""]
        for s in report["sets"]:
            lines += [f"{s}:", ""] + _ppl_table(report, s, abl) + [""]
    lines += _budget_lines(report)
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
    fig, axes = plt.subplots(1, len(sets), figsize=(6.5 * len(sets), 5.6), dpi=120, squeeze=False)
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
    # one legend under the panels (every panel has the same rows): inside, it hid the curves
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=7, frameon=False)
    fig.set_layout_engine("tight", rect=(0, 0.06 + 0.045 * math.ceil(len(labels) / 7), 1, 1))
    from megafire.eval.plots import save_figure
    return save_figure(fig, path)


def write_report(out: Path, plan_arms: Optional[dict] = None, data_summary: Optional[Path] = None,
                 reading: Optional[Path] = None, merge: Iterable[Path] = (), allow_data_rebuild: bool = False) -> dict:
    """study.json, study.md and study.png under ``out``; returns the report. ``reading``: a
    Markdown file with a person's reading of the numbers, placed under study.md's "Reading"
    (kept in the repository, so a rebuilt report keeps it). ``merge``: written study.json files
    (e.g. the published docs/study.json) whose runs are folded in without their run
    directories; a run under ``out`` replaces the merged one of the same arm and seed."""
    previous = _json(out / "study.json") or {}
    merged = []
    for path in merge:
        if _json(Path(path)) is None:
            raise MissingFileError(f"study report: {str(path)!r} is not a readable study.json")
        merged.append(_json(Path(path)))
    arms = plan_arms
    if arms is None:          # the arms as recorded: the merged reports', then this directory's
        arms = {}
        for rec in [*merged, previous]:
            arms.update(rec.get("arms") or {})
    own_data = _json(data_summary) if data_summary else previous.get("data")
    report = build_numbers(out, arms or None, merged, data=own_data, allow_data_rebuild=allow_data_rebuild)
    # the report's data: the first merged report's (the bulk of the runs), else this directory's
    data = next((m["data"] for m in merged if m.get("data")), None) or own_data
    if data:
        report["data"] = data
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "study.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(out / "study.json")
    write_markdown(report, out / "study.md", data, reading.read_text() if reading else None)
    plot(report, out / "study.png")
    return report
