"""A training stage killed mid-run (SIGKILL of the whole process group, as when a machine is
lost) continues from its last complete checkpoint on the next run, not from step 0, ends with
the same weights as a run that was never killed, and does not stay RUNNING in MLflow."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM

from pipeline.results.manifest import MANIFEST
from pipeline.training.train import CHECKPOINT_SEAL, last_complete_checkpoint
from tests.e2e.test_stages import TINY

MAX_STEPS = 80


def test_killed_sft_resumes_from_its_checkpoint(tmp_path):
    config = {"name": "resume", "results_dir": str(tmp_path / "results"), **TINY,
              "sft": {"trainer": {"max_steps": MAX_STEPS, "save_steps": 10, "per_device_train_batch_size": 8,
                                  "logging_steps": 10}}}
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "flows.cli", "run", str(path), "--stage", "sft"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after = 10 * random.randint(1, 5)  # a step: the kill lands somewhere else each time
    deadline = time.time() + 600
    checkpoints = []
    while time.time() < deadline and not any(int(c.parent.name.split("-")[1]) >= kill_after for c in checkpoints):
        checkpoints = list((tmp_path / "results" / "sft").glob("*/checkpoints/checkpoint-*/trainer_state.json"))
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    stage = checkpoints[0].parents[2]
    assert not (stage / MANIFEST).exists()  # killed: not done

    finished = subprocess.run(command, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    manifest = json.loads((stage / MANIFEST).read_text())
    resumed = manifest["metrics"]["resumed_from_step"]
    assert 10 <= resumed < MAX_STEPS
    history = json.loads((stage / "log_history.json").read_text())
    assert history[-1]["step"] == MAX_STEPS
    resumed_weights = AutoModelForCausalLM.from_pretrained(stage / "model").state_dict()
    # The killed pipeline's runs could not end themselves; the next run ended them as KILLED.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("posttrain").experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    killed = {r.data.tags.get("posttrain.stage", "pipeline") for r in runs if r.info.status == "KILLED"}
    assert killed == {"pipeline", "sft"}
    assert all("process was lost" in r.data.tags["posttrain.error"] for r in runs if r.info.status == "KILLED")
    # It says where it resumed, and the resumed stage's run holds the whole curve, steps before the checkpoint too.
    assert f"resumed from step {int(resumed)}" in finished.stdout + finished.stderr
    finished_sft = next(r for r in runs if r.data.tags.get("posttrain.stage") == "sft" and r.info.status == "FINISHED")
    steps = [m.step for m in client.get_metric_history(finished_sft.info.run_id, "loss")]
    assert sorted(steps) == list(range(10, MAX_STEPS + 1, 10))
    killed_sft = next(r for r in runs if r.data.tags.get("posttrain.stage") == "sft" and r.info.status == "KILLED")
    assert killed_sft.data.tags["posttrain.taken_up_by"] == finished_sft.info.run_id  # linked both ways
    assert finished_sft.data.tags["posttrain.takes_up"] == killed_sft.info.run_id

    # The same stage run again from scratch, never killed: the same weights (fixed seeds, CPU).
    straight = subprocess.run(command + ["--force", "sft"], capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert json.loads((stage / MANIFEST).read_text())["metrics"]["resumed_from_step"] == 0
    uninterrupted = AutoModelForCausalLM.from_pretrained(stage / "model").state_dict()
    for name, weight in uninterrupted.items():
        torch.testing.assert_close(resumed_weights[name], weight, msg=f"{name} differs after resuming from {resumed}")


def stopped_at_checkpoint_20(command: list[str], tmp_path: Path, trainings: int) -> str:
    """Run the command in a process group of its own until `trainings` SFT stages have saved
    checkpoint 20 or a later one, then SIGTERM the group; asserts it stops within 15 s, as
    stopped. Its output."""
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    deadline = time.time() + 600
    # The seal is written last, once the checkpoint is whole. Any step's: the Trainer removes
    # checkpoint 20 at 60, and on a loaded machine two trainings can be that far apart.
    seal = f"*/checkpoints/checkpoint-*/{CHECKPOINT_SEAL}"
    while time.time() < deadline and len({p.parents[2] for p in (tmp_path / "results" / "sft").glob(seal)}) < trainings:
        if process.poll() is not None:
            raise AssertionError(f"the run ended before it could be stopped:\n{process.stdout.read()[-3000:]}")
        time.sleep(0.1)
    stopped = time.monotonic()
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert time.monotonic() - stopped < 15, output[-2000:]
    assert process.returncode == 128 + signal.SIGTERM, output[-2000:]
    return output


def test_sigterm_to_the_run_stops_it_within_15_s_and_it_resumes_after(tmp_path):
    """What a scheduler or `kill` sends to the process group: the stage process, the temporary
    Prefect server and the run itself all get it."""
    config = {"name": "term", "results_dir": str(tmp_path / "results"), **TINY,
              "sft": {"trainer": {"max_steps": 400, "save_steps": 20, "per_device_train_batch_size": 8,
                                  "logging_steps": 10}}}
    path = tmp_path / "term.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "flows.cli", "run", str(path), "--stage", "sft"]
    output = stopped_at_checkpoint_20(command, tmp_path, trainings=1)
    assert "stopped by SIGTERM: every finished stage is kept" in output

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("posttrain").experiment_id])
    ended = {r.data.tags.get("posttrain.stage", "pipeline"): r.info.status for r in runs}
    assert ended == {"pipeline": "KILLED", "demo_data": "FINISHED", "pretrain": "FINISHED", "sft": "KILLED"}
    # it leaves a checkpoint the next run resumes from (one cut off by the signal, if any, is dropped)
    resumable = last_complete_checkpoint(next((tmp_path / "results" / "sft").glob("*/checkpoints")))
    assert resumable is not None and int(resumable.name.split("-")[1]) >= 20


def test_sigterm_stops_a_compares_pipelines_side_by_side(tmp_path):
    """Two pipelines training at once, in threads of the compare's process that get no signal:
    the stop reaches both, their stage processes end, and every run still open ends KILLED."""
    config = {"name": "both", "results_dir": str(tmp_path / "results"), **TINY, "launch": {"cpu_threads": 1},
              "sft": {"trainer": {"max_steps": 400, "save_steps": 20, "per_device_train_batch_size": 8,
                                  "logging_steps": 10}},
              "compare": {"arms": {"ce": {"name": "ce"}, "dft": {"name": "dft"}}, "seeds": [0, 1], "parallel": 2}}
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump(config))
    output = stopped_at_checkpoint_20([sys.executable, "-m", "flows.cli", "compare", str(path)], tmp_path, trainings=2)
    assert "stopped by SIGTERM" in output

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("posttrain").experiment_id])
    trained = [r for r in runs if r.data.tags.get("posttrain.stage") == "sft"]
    assert len(trained) == 2 and {r.info.status for r in trained} == {"KILLED"}  # both were training
    assert {r.info.status for r in runs if r.info.status not in ("FINISHED", "KILLED")} == set()  # none left RUNNING
    kinds = {r.data.tags.get("posttrain.kind") for r in runs if r.info.status == "KILLED"}
    assert "compare" in kinds
