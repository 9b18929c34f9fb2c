"""The MLflow store going away, for real: a tracking server that is stopped and started again."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml
from prefect.settings import PREFECT_API_URL
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from pipeline.runtime.process import free_port
from pipeline.tracking.tracker import ui_command
from tests.e2e.test_stages import TINY

REPO = Path(__file__).resolve().parents[2]


def start_server(store: Path, port: int, ui: bool = False) -> subprocess.Popen:
    """A tracking server on the store, for runs to log to; `ui`: the one `posttrain ui` starts."""
    command, env = ui_command(f"sqlite:///{store / 'mlflow.db'}", port) if ui else (
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--default-artifact-root", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], {})
    server = subprocess.Popen(command, env=os.environ | env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    for _ in range(120):
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return server
        except requests.ConnectionError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("mlflow server did not start")


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)  # the server and its uvicorn worker
    server.wait()


def test_a_lost_tracking_server_never_loses_work_and_results_are_logged_when_it_is_back(tmp_path):
    port, store = free_port(), tmp_path / "store"
    store.mkdir()
    config = tmp_path / "tiny.yaml"
    pretrain = {"trainer": TINY["pretrain"]["trainer"] | {"max_steps": 30}}  # a few seconds of training
    config.write_text(yaml.safe_dump({"name": "tiny", "results_dir": str(tmp_path / "results"), **TINY,
                                      "pretrain": pretrain, "tracking": {"uri": f"http://127.0.0.1:{port}"}}))
    server = start_server(store, port)
    try:
        first = CliRunner().invoke(app, ["run", str(config), "--stage", "demo_data"])
        assert first.exit_code == 0, first.output
    finally:
        stop_server(server)

    # 1. The server is down when a run starts: refused at once, nothing run.
    down = CliRunner().invoke(app, ["run", str(config), "--stage", "pretrain"])
    assert down.exit_code == 2
    assert f"the MLflow tracking server http://127.0.0.1:{port} does not answer" in down.output
    assert "nothing was run" in down.output and "Traceback" not in down.output
    assert not (tmp_path / "results" / "pretrain").exists()

    # 2. The server goes away while a stage trains: training finishes and its result is kept.
    server = start_server(store, port)
    # The test session's Prefect server, rather than a temporary one of its own (20 s to start).
    quick = os.environ | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                          "PREFECT_API_URL": PREFECT_API_URL.value()}
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(config), "--stage", "pretrain"],
                           cwd=REPO, env=quick, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in run.stdout:
        output.append(line)
        if line.startswith("[pretrain] running"):
            stop_server(server)
            break
    output += run.stdout.readlines()
    output = "".join(output)
    assert run.wait() == 2, output
    assert "error: stage 'pretrain' is done and its result kept in" in output
    assert "MLflow stopped answering" in output  # the stage's warning: it trained on without logging
    (folder,) = (tmp_path / "results" / "pretrain").iterdir()
    assert (folder / "manifest.json").is_file() and (folder / "model" / "model.safetensors").is_file()

    # 3. The server is back: the kept result is reused, not trained again, and logged.
    server = start_server(store, port)
    try:
        back = CliRunner().invoke(app, ["run", str(config), "--stage", "pretrain"])
        assert back.exit_code == 0, back.output
        assert f"[pretrain] cached: {folder}" in back.output
        client = MlflowClient(f"http://127.0.0.1:{port}")
        experiment = client.get_experiment_by_name("posttrain").experiment_id
        runs = client.search_runs(experiment, "tags.`posttrain.stage` = 'pretrain'", order_by=["start_time ASC"])
        assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]  # the lost run is ended, not left RUNNING
        assert runs[1].data.tags["posttrain.cached"] == "true"
        assert runs[1].data.tags["posttrain.produced_by_run"] == runs[0].info.run_id
        # The run that logs the kept result holds its whole training curve, from log_history.json.
        logged = [(h["step"], h["loss"]) for h in json.loads((folder / "log_history.json").read_text()) if "loss" in h]
        curve = client.get_metric_history(runs[1].info.run_id, "loss")
        assert len(logged) > 1 and sorted((m.step, m.value) for m in curve) == logged
        assert not [k for k in runs[1].data.metrics if k.startswith("final/")]  # the curves' last points, not charts
    finally:
        stop_server(server)


def test_a_locked_sqlite_store_stops_a_run_before_any_work(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny", "results_dir": str(tmp_path / "results"), **TINY}))
    first = CliRunner().invoke(app, ["run", str(config), "--stage", "demo_data"])
    assert first.exit_code == 0, first.output
    database = tmp_path / "results" / "mlflow.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sqlite3, time\nc = sqlite3.connect({str(database)!r}, isolation_level=None)\n"
         "c.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\ntime.sleep(300)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        locked = CliRunner().invoke(app, ["run", str(config), "--stage", "pretrain"])
    finally:
        holder.kill()
        holder.wait()
    assert locked.exit_code == 2
    assert f"the MLflow store sqlite:///{database} cannot be used" in locked.output and "database is locked" in locked.output
    assert "nothing was run" in locked.output and not (tmp_path / "results" / "pretrain").exists()
