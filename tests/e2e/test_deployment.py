"""The repository's prefect.yaml, deployed for real: a Prefect server, a process work pool,
`prefect deploy`, a worker and `prefect deployment run`, as docs/deployments.md tells a user,
on the tiny demo world (demo_data and pretrain only)."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.settings import PREFECT_API_URL, temporary_settings

from pipeline.runtime.process import free_port
from tests.e2e.test_stages import TINY

REPO = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]  # the venv's Prefect, and the venv's Python for the stages


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else "(no log)"


class PrefectWorld:
    """A Prefect server of its own (PREFECT_HOME and SQLite in tmp), and the processes started
    against it, each in its own process group so that teardown ends its children too."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        # The session's test harness points this process at its own API; the children must
        # talk to this server only, and keep MLflow in the config's results folder.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "POSTTRAIN_"))}
        self.env = env | {
            "PREFECT_HOME": str(tmp_path / "prefect-home"),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",  # poll the pool every second, not every 10
        }
        self.processes: list[tuple[subprocess.Popen, Path]] = []

    def start(self, name: str, args: list[str], cwd: Path) -> subprocess.Popen:
        log = self.tmp_path / f"{name}.log"
        process = subprocess.Popen(args, cwd=cwd, env=self.env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes.append((process, log))
        return process

    def run(self, args: list[str], cwd: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
        result = subprocess.run(args, cwd=cwd, env=self.env | env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}\n{self.logs()}"
        return result

    def wait_healthy(self, timeout: float) -> None:
        server = self.processes[0][0]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert server.poll() is None, f"prefect server exited:\n{self.logs()}"
            try:
                with urllib.request.urlopen(f"{self.api}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"no healthy Prefect server after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {log.name} ---\n{_tail(log)}" for _, log in self.processes)

    def stop(self) -> None:
        for process, _ in reversed(self.processes):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                except ProcessLookupError:
                    pass


@pytest.fixture
def prefect_world(tmp_path):
    world = PrefectWorld(tmp_path)
    try:
        yield world
    finally:
        world.stop()


def test_prefect_yaml_deploys_to_a_process_pool_and_a_worker_runs_it(prefect_world, tmp_path):
    world = prefect_world
    results = tmp_path / "results"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny", "results_dir": str(results), **TINY}))

    world.start("server", [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(world.port)], tmp_path)
    world.wait_healthy(timeout=120)
    world.run([*PREFECT, "work-pool", "create", "posttrain", "--type", "process"], tmp_path, timeout=60)
    # The worker runs elsewhere (the deployment's pull step takes the run to the repository),
    # and starts while the deployment is made.
    world.start("worker", [*PREFECT, "worker", "start", "--pool", "posttrain", "--name", "test-worker"], tmp_path)
    # From the repository root, as a user does; POSTTRAIN_HOME fixes the pull step's directory.
    deployed = world.run([*PREFECT, "--no-prompt", "deploy", "-n", "posttrain-demo"], REPO, timeout=120,
                         POSTTRAIN_HOME=str(REPO))
    assert "posttrain-config/posttrain-demo" in deployed.stdout
    # A relative config path is relative to the flow run's working directory (the repository).
    relative = os.path.relpath(config, REPO)
    ran = world.run([*PREFECT, "deployment", "run", "posttrain-config/posttrain-demo", "--param", f"config={relative}",
                     "--param", "stage=pretrain", "--watch", "--watch-timeout", "300"], tmp_path, timeout=330)
    assert "Completed" in ran.stdout, ran.stdout + world.logs()
    with temporary_settings({PREFECT_API_URL: world.api}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("posttrain-config/posttrain-demo")
        flow_runs = client.read_flow_runs()
        stages_table = ArtifactFilter(key=ArtifactFilterKey(any_=["posttrain-stages"]))
        artifacts = client.read_artifacts(artifact_filter=stages_table)
    # `prefect deploy` filled in POSTTRAIN_HOME: the path is fixed in the deployment.
    assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    # The deployment's run, and the stage flow and the pipeline flow under it, all Completed.
    assert len(flow_runs) == 3, [r.name for r in flow_runs]
    assert all(r.state.is_completed() for r in flow_runs), [(r.name, r.state) for r in flow_runs]
    # The deployment's flow run shows its stages as a table in Prefect's UI.
    assert len(artifacts) == 1 and artifacts[0].type == "table"
    table = artifacts[0].data if isinstance(artifacts[0].data, list) else json.loads(artifacts[0].data)
    assert [row["stage"] for row in table] == ["demo_data", "pretrain"]

    manifests = list((results / "pretrain").glob("*/manifest.json"))
    assert len(manifests) == 1, world.logs()
    assert list((results / "demo_data").glob("*/manifest.json"))
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("posttrain")
    pipeline = client.search_runs([experiment.experiment_id], "tags.`posttrain.kind` = 'pipeline'")
    assert len(pipeline) == 1 and pipeline[0].info.status == "FINISHED"
    stages = client.search_runs([experiment.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{pipeline[0].info.run_id}'")
    assert {r.data.tags["posttrain.stage"] for r in stages} == {"demo_data", "pretrain"}
    pretrain = next(r for r in stages if r.data.tags["posttrain.stage"] == "pretrain")
    assert pretrain.data.tags["posttrain.key"] == manifests[0].parent.name


def test_every_deployment_in_prefect_yaml_runs_the_config_flow_with_its_parameters():
    """The container variants are not deployed here (no Docker, no Kubernetes): at least their
    entry point and parameters must be what the flow takes."""
    import inspect

    from flows.pipeline_flow import run_config

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    accepted = set(inspect.signature(run_config.fn).parameters)
    assert {d["name"] for d in spec["deployments"]} >= {"posttrain-demo", "posttrain-docker-gpu", "posttrain-k8s-gpu"}
    for deployment in spec["deployments"]:
        assert deployment["entrypoint"] == "flows/pipeline_flow.py:run_config"
        assert "config" in deployment["parameters"] and set(deployment["parameters"]) <= accepted
        assert deployment["work_pool"]["name"]
