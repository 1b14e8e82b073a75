"""MLflow against a real tracking server: params (flattened config), per-step metrics and
artifacts arrive; and the default sqlite store inside the run directory."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from megafire.train.loop import train

from _train_util import tiny_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    import deepspeed, megatron.core  # noqa: F401  (overlap the trainer's ~20 s of imports with server start-up)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, 15)       # the server's own process group (gunicorn/uvicorn workers)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


def test_params_metrics_artifacts_reach_the_server(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient
    run = tmp_path / "run"
    cfg = tiny_config(run, {"train": {"max_steps": 3},
                            "tracking": {"enabled": True, "uri": mlflow_server, "experiment": "megafire-test"}})
    train(cfg)
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("megafire-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED"
    flat = cfg.flat()
    assert r.data.params["model.position.name"] == "fire"
    assert r.data.params["train.tokens_per_step"] == "128"
    assert set(r.data.params) == set(flat)
    losses = client.get_metric_history(r.info.run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2, 3]
    assert "pos/blocks.0.attn.encoding/c" in r.data.metrics and "tokens_per_s" in r.data.metrics
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"config.yaml", "metrics.jsonl"} <= artifacts

    # evaluation code logs into the same MLflow run through the run directory
    from megafire.tracking import open_run
    report = tmp_path / "length_generalization.json"
    report.write_text("{}")
    tracker = open_run(run)
    tracker.log_artifact(report, "eval")
    tracker.log_metrics({"eval/ppl@32": 12.5}, step=0)
    tracker.end()
    assert {a.path for a in client.list_artifacts(r.info.run_id, "eval")} == {"eval/length_generalization.json"}
    assert client.get_run(r.info.run_id).data.metrics["eval/ppl_32"] == 12.5   # '@' is not allowed by MLflow


def test_default_store_is_sqlite_in_run_dir(tmp_path):
    from mlflow.tracking import MlflowClient
    run = tmp_path / "run"
    train(tiny_config(run, {"train": {"max_steps": 2}, "tracking": {"enabled": True}}))
    assert (run / "mlflow.db").is_file() and not (Path.cwd() / "mlruns").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{run.resolve() / 'mlflow.db'}")
    (r,) = client.search_runs([client.get_experiment_by_name("megafire").experiment_id])
    assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == [1, 2]
    assert (run / "mlartifacts").is_dir()
