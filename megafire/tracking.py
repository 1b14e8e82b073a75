"""MLflow tracking: params (the flattened config), per-step metrics, artifacts.

Where: ``tracking.uri`` if set (an ``http://`` server or any MLflow store URI), else a
sqlite store inside the run directory, ``sqlite:///{run.dir}/mlflow.db``, with artifacts in
``{run.dir}/mlartifacts`` (MLflow's plain ``./mlruns`` file store is in maintenance mode).

Only rank 0 talks to MLflow; on other ranks every method is a no-op, so callers need no
rank checks. The MLflow run id is kept in ``{run.dir}/mlflow_run.json``: a resumed training
run, and the evaluation that follows it, log into the same MLflow run.

Uses ``MlflowClient`` rather than the fluent API, so nothing depends on a process-global
"active run" (tests and notebooks open several runs in one process).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional

RUN_FILE = "mlflow_run.json"
_PARAM_MAX_CHARS = 6000   # MLflow's limit on a param value
_BATCH = 100              # MLflow's limit on params per log_batch call
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9_\-. :/]")   # MLflow's metric/param name alphabet


def metric_name(key: str) -> str:
    """``key`` with characters MLflow refuses replaced by ``_`` (``eval/ppl@512`` -> ``eval/ppl_512``)."""
    return _NOT_ALLOWED.sub("_", key)


def tracking_uri(cfg) -> str:
    """``tracking.uri`` or the default sqlite store of ``run.dir``."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    return f"sqlite:///{Path(cfg.run.dir).resolve() / 'mlflow.db'}"


class Tracker:
    """One MLflow run tied to one run directory."""

    def __init__(self, cfg, *, rank: int = 0):
        self.cfg = cfg
        self.enabled = bool(cfg.tracking.enabled) and rank == 0
        self.run_dir = Path(cfg.run.dir)
        self.client = None
        self.run_id: Optional[str] = None

    # --- life cycle -----------------------------------------------------------------
    def start(self, *, log_params: bool = True) -> "Tracker":
        """Open (or re-open, from mlflow_run.json) the run and log the flattened config."""
        if not self.enabled:
            return self
        from mlflow.tracking import MlflowClient
        uri = tracking_uri(self.cfg)
        self.client = MlflowClient(tracking_uri=uri)
        run_file = self.run_dir / RUN_FILE
        if run_file.is_file():
            saved = json.loads(run_file.read_text())
            if saved.get("tracking_uri") == uri:
                self.run_id = saved["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
        if self.run_id is None:
            exp_id = self._experiment_id(uri)
            name = self.cfg.run.name or self.run_dir.name
            self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
            self.run_dir.mkdir(parents=True, exist_ok=True)
            run_file.write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id}))
        if log_params:
            self._log_params(self.cfg.flat())
        return self

    def _experiment_id(self, uri: str) -> str:
        name = self.cfg.tracking.experiment
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if uri.startswith("sqlite:"):   # else MLflow would put artifacts in ./mlruns of the CWD
            location = (self.run_dir.resolve() / "mlartifacts").as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def _log_params(self, flat: dict[str, Any]) -> None:
        from mlflow.entities import Param
        existing = self.client.get_run(self.run_id).data.params
        # A resumed run may not change a logged param (MLflow refuses); its new value is in config.yaml.
        params = [Param(metric_name(k), str(v)[:_PARAM_MAX_CHARS]) for k, v in sorted(flat.items()) if metric_name(k) not in existing]
        for i in range(0, len(params), _BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + _BATCH])

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    # --- logging ---------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Numeric, finite values only (MLflow rejects NaN in some stores; None means unknown);
        names pass through :func:`metric_name`."""
        if not self.enabled:
            return
        from mlflow.entities import Metric
        import time
        now = int(time.time() * 1000)
        batch = [Metric(metric_name(k), float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        """Upload a file or directory (config, eval JSON, plots) into the run's artifacts."""
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path), artifact_path)


def open_run(run_dir: str | Path, *, rank: int = 0) -> Tracker:
    """The tracker of an existing run directory (its config.yaml), for code that runs after
    training (evaluation): logs into the same MLflow run as the training did."""
    from megafire.config import load_config
    cfg = load_config(Path(run_dir) / "config.yaml")
    cfg.run.dir = str(run_dir)
    return Tracker(cfg, rank=rank).start(log_params=False)


def log_artifact(path: str | Path, run_dir: str | Path, artifact_path: Optional[str] = None) -> None:
    """One-shot: upload ``path`` into the MLflow run of ``run_dir``."""
    open_run(run_dir).log_artifact(path, artifact_path)
