"""MLflow logging of a finished study, after the fact: ``megafire study report``.

Training on the GPU machine runs with tracking off (no mlflow there); this logs each run
directory (from the machine itself or unpacked from ``study_results.tar.gz``) as one MLflow
run of one experiment: params = the run's resolved ``config.yaml`` flattened (plus
``study.arm`` / ``study.seed``), metrics = every record of ``metrics.jsonl`` at its step (loss,
lr, tokens/s, grad norm, FIRE's c and L per layer), the evaluation numbers at step 0
(``eval/<set>/<variant>/ppl_<L>``, ``passkey/<variant>/len<L>``), and the artifacts
``study.png``, ``study.json``, ``study.md``, the run's ``study_eval.json``, config and metrics.

Idempotent: a run is tagged ``megafire.study.run = <arm>-s<seed>``; logging again deletes
the earlier MLflow run of that name in the experiment first, so the experiment always holds
one run per (arm, seed).
"""
from __future__ import annotations

import time
from pathlib import Path

from megafire.tracking import _BATCH, _PARAM_MAX_CHARS, metric_name

TAG = "megafire.study.run"
_METRICS_PER_BATCH = 1000          # MLflow's limit on metrics per log_batch call


def _experiment(client, name: str, out: Path, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (out.resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
    return client.create_experiment(name, artifact_location=location)


def _step_metrics(records: list[dict]):
    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    for r in records:
        step = int(r.get("step", 0))
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v \
                    and abs(v) != float("inf"):
                yield Metric(metric_name(f"train/{k}" if not k.startswith("pos/") else k), float(v), now, step)


def _eval_metrics(ev: dict) -> dict[str, float]:
    out = {}
    for variant, by_set in ev.get("perplexity", {}).items():
        for s, by_len in by_set.items():
            out.update({f"eval/{s}/{variant}/ppl_{L}": p for L, p in by_len.items()})
    for variant, pk in ev.get("passkey", {}).items():
        out.update({f"passkey/{variant}/len{L}": a for L, a in pk["mean_accuracy"].items()})
    return out


def log_run(client, exp_id: str, run: dict, out: Path) -> str:
    """One run directory -> one MLflow run (see the module docstring); returns its id."""
    from mlflow.entities import Metric, Param, RunTag

    from megafire.config import load_config
    for old in client.search_runs([exp_id], filter_string=f"tags.`{TAG}` = '{run['name']}'"):
        client.delete_run(old.info.run_id)
    mlrun = client.create_run(exp_id, run_name=f"study-{run['name']}",
                              tags={TAG: run["name"], "megafire.study.arm": run["arm"]})
    rid = mlrun.info.run_id
    flat = {}
    if (run["dir"] / "config.yaml").is_file():
        flat = load_config(run["dir"] / "config.yaml").flat()
    flat.update({"study.arm": run["arm"], "study.seed": run["seed"]})
    params = [Param(metric_name(k), str(v)[:_PARAM_MAX_CHARS]) for k, v in sorted(flat.items())]
    for i in range(0, len(params), _BATCH):
        client.log_batch(rid, params=params[i:i + _BATCH])
    metrics = list(_step_metrics(run["metrics"]))
    now = int(time.time() * 1000)
    if run["eval"]:
        metrics += [Metric(metric_name(k), float(v), now, 0) for k, v in _eval_metrics(run["eval"]).items()]
    for i in range(0, len(metrics), _METRICS_PER_BATCH):
        client.log_batch(rid, metrics=metrics[i:i + _METRICS_PER_BATCH])
    client.log_batch(rid, tags=[RunTag("megafire.study.evaluated", str(bool(run["eval"])))])
    for name in ("study.png", "study.json", "study.md"):
        if (out / name).is_file():
            client.log_artifact(rid, str(out / name), "study")
    for rel in ("config.yaml", "metrics.jsonl", "train_done.json", "eval/study_eval.json"):
        if (run["dir"] / rel).is_file():
            client.log_artifact(rid, str(run["dir"] / rel), "run")
    client.set_terminated(rid, status="FINISHED" if run["eval"] else "FAILED")
    return rid


def log_study(out: str | Path, report: dict, uri: str, experiment: str = "megafire-study") -> dict[str, str]:
    """Every run directory of ``out`` into ``experiment`` at ``uri`` -> {run name: MLflow run id}."""
    from mlflow.tracking import MlflowClient

    from .report import collect_runs
    out = Path(out)
    client = MlflowClient(tracking_uri=uri)
    exp_id = _experiment(client, experiment, out, uri)
    return {run["name"]: log_run(client, exp_id, run, out) for run in collect_runs(out)}
