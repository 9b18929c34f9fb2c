"""What a user sees on the command line: through the real `posttrain` process, a progress bar
per training and sampling stage, one line per cached stage, the summary table with each
stage's MLflow run, `posttrain status`, `posttrain runs` and a failing stage as advice; in
process, the config mistakes that stop a run before it starts."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.settings import PREFECT_API_URL
from typer.testing import CliRunner

from flows.cli import app
from pipeline.config.schema import ConfigError
from pipeline.data.sources import read_jsonl
from tests.e2e.test_stages import TINY

REPO = Path(__file__).resolve().parents[2]
STAGES = ("demo_data", "pretrain", "evaluate_base")  # what `--stage evaluate_base` runs: training and sampling
MODULES = {"evaluate_base": "evaluate"}


def posttrain(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    # The test session's Prefect server, rather than a temporary one per command (20 s each).
    # Without MLFLOW_TRACKING_URI, the runs go to the store the test reads (results_dir's SQLite).
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def table_rows(output: str) -> dict[str, list[str]]:
    """A rich table's body rows, by their first cell."""
    rows = [[cell.strip() for cell in line.strip("│ \n").split("│")] for line in output.splitlines()
            if line.startswith("│")]
    return {row[0]: row for row in rows}


def manifest(results: Path, stage: str, key: str) -> dict:
    return json.loads((results / MODULES.get(stage, stage) / key / "manifest.json").read_text())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny pipeline run twice to its base model's evaluation: once from nothing, once cached."""
    tmp = tmp_path_factory.mktemp("experience")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny", "results_dir": str(tmp / "results"), **TINY}))
    first = posttrain("run", str(config), "--stage", "evaluate_base")
    assert first.returncode == 0, first.stderr[-3000:]
    second = posttrain("run", str(config), "--stage", "evaluate_base")
    assert second.returncode == 0, second.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp / 'results' / 'mlflow.db'}")
    return tmp, config, first, second, client


def test_training_and_sampling_stages_show_progress_bars(world):
    tmp, _, first, _, _ = world
    world = tmp / "results" / "demo_data"
    prompts = sum(len(read_jsonl(path)) for path in [*world.glob("*/*_test.jsonl"), *world.glob("*/*_val.jsonl")])
    steps = TINY["pretrain"]["trainer"]["max_steps"]  # steps done, rate and the latest loss, named after the stage
    assert re.search(rf"pretrain: 100%\|[^|]*\| {steps}/{steps} \[[^\]]*step/s, loss=\d", first.stderr)
    # every suite's prompts (test and validation) in one sampling call
    assert re.search(rf"evaluate_base: 100%\|[^|]*\| {prompts}/{prompts} \[[^\]]*prompt/s\]", first.stderr)
    assert "{'loss'" not in first.stdout + first.stderr  # the Trainer's printed log dicts are replaced by the bar


def test_summary_table_has_each_stage_its_key_time_metrics_and_mlflow_run(world):
    tmp, _, first, _, client = world
    rows = table_rows(first.stdout)
    pipeline_run = client.search_runs(["1"], "tags.`posttrain.kind` = 'pipeline'", order_by=["attributes.start_time ASC"])[0]
    stage_runs = {r.info.run_name: r for r in client.search_runs(
        ["1"], f"tags.`mlflow.parentRunId` = '{pipeline_run.info.run_id}'")}
    for stage in STAGES:
        name, status, key, seconds, headline, link = rows[stage]
        assert status == "ran"
        assert manifest(tmp / "results", stage, key)["key"] == key
        assert re.fullmatch(r"\d+\.\ds|\d+s|\d+m \d\ds", seconds)
        assert link == f"http://127.0.0.1:5000/#/experiments/1/runs/{stage_runs[stage].info.run_id}"
    metrics = manifest(tmp / "results", "evaluate_base", rows["evaluate_base"][2])["metrics"]
    assert f"target pass@1 {metrics['target/pass_at_1']:.3f}" in rows["evaluate_base"][4]
    assert f"loss {manifest(tmp / 'results', 'pretrain', rows['pretrain'][2])['metrics']['train_loss']:.3f}" in rows["pretrain"][4]


def test_a_cached_stage_is_one_line_and_shows_no_progress(world):
    _, _, first, second, _ = world
    for stage in STAGES:
        assert len(re.findall(rf"^\[{stage}\] cached: ", second.stdout, re.MULTILINE)) == 1
        assert table_rows(second.stdout)[stage][1:3] == ["cached", table_rows(first.stdout)[stage][2]]
    assert "running:" not in second.stdout and "step/s" not in second.stderr and "prompt/s" not in second.stderr


def test_status_shows_done_missing_and_waiting_stages_with_their_metrics(world):
    tmp, config, first, _, _ = world
    status = posttrain("status", str(config))
    assert status.returncode == 0, status.stderr
    rows, ran = table_rows(status.stdout), table_rows(first.stdout)
    for stage in STAGES:
        assert rows[stage][1:3] == ["done", ran[stage][2]]
        assert rows[stage][5] == manifest(tmp / "results", stage, ran[stage][2])["run_id"]
    assert rows["evaluate_base"][4] == ran["evaluate_base"][4]
    assert rows["sft"][1] == "missing"  # its key is known: its inputs are built
    for stage in ("evaluate_sft", "sample", "pairs", "dpo", "evaluate_dpo"):  # their keys follow SFT's weights
        assert rows[stage][1:3] == ["waiting", "(not yet known)"] and rows[stage][4] == "on sft"


def test_runs_lists_recent_pipeline_runs_from_mlflow_newest_first(world, tmp_path):
    _, config, _, _, client = world
    runs = posttrain("runs", str(config))
    assert runs.returncode == 0, runs.stderr
    pipelines = client.search_runs(["1"], "tags.`posttrain.kind` = 'pipeline'", order_by=["attributes.start_time DESC"])
    links = [line.split("│")[-2].strip() for line in runs.stdout.splitlines() if line.startswith("│")]
    assert links == [f"http://127.0.0.1:5000/#/experiments/1/runs/{p.info.run_id}" for p in pipelines]
    assert len(links) == 2
    # The newest run reused every stage: its row shows the metrics of the runs that made them.
    newest = client.get_run(pipelines[0].data.tags["posttrain.reused.evaluate_base"]).data.metrics
    expected = f"{newest['target/pass_at_1']:.3f} / - / -"
    assert expected in runs.stdout.splitlines()[3]
    nothing = posttrain("runs", cwd=tmp_path)  # no config: MLflow's default store here, which has no runs
    assert nothing.returncode == 0 and "no runs yet" in nothing.stdout
    assert not (tmp_path / "results").exists()  # asking created no store


def test_a_failing_stage_is_advice_without_traceback(world):
    tmp, config, _, _, _ = world
    bad = tmp / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2=", "answer": "4"}\n')
    broken = tmp / "broken.yaml"
    broken.write_text(config.read_text() + f"data:\n  sft:\n    path: {bad}\n")
    run = posttrain("run", str(broken), "--stage", "sft")  # a bad row: found before any stage runs
    assert run.returncode == 2
    assert f"error: data.sft: {bad}:2: missing fields" in run.stderr and "give every row one of these field sets" in run.stderr
    assert "[demo_data]" not in run.stdout + run.stderr and "Traceback" not in run.stdout + run.stderr  # no stage ran
    long = tmp / "long.jsonl"  # well-formed rows that only the trainer finds wrong: the stage fails
    long.write_text('{"prompt": "12345678*2=", "completion": "2"}\n' * 4)
    settings = yaml.safe_load(config.read_text())
    settings["data"] = {"sft": {"path": str(long)}}
    settings["sft"]["trainer"]["max_length"] = 8
    broken.write_text(yaml.safe_dump(settings))
    run = posttrain("run", str(broken), "--stage", "sft")
    assert run.returncode == 2
    assert "error: stage 'sft' failed (exit code 1): DataError: 4 of 4 SFT rows have a prompt that fills" in run.stderr
    assert "full traceback: " in run.stderr and "Traceback" not in run.stdout + run.stderr


@pytest.mark.parametrize("text, advice", [
    ("name: x\nsamplng: {n: 2}\n", "bad.yaml:2: samplng: unknown key"),
    ("name: x\nsft: {loss: {name: eksft, ratio: 2}}\n", "bad.yaml:2: sft.loss: loss 'eksft': ratio=2 is invalid"),
    ("name: x\nmodel: {path: /models/nowhere}\n", "bad.yaml:2: model.path: no model folder at /models/nowhere: give a local"),
])
def test_config_mistakes_are_one_line_of_advice(tmp_path, monkeypatch, text, advice):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    monkeypatch.chdir(tmp_path)  # where the default results_dir would be made
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and advice in result.output
    assert "Traceback" not in result.output and not (tmp_path / "results").exists()


def test_debug_raises_the_error_itself_for_its_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nsamplng: {n: 2}\n")
    result = CliRunner().invoke(app, ["run", str(path), "--debug"])
    assert isinstance(result.exception, ConfigError) and "samplng: unknown key" in str(result.exception)
