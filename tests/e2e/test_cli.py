import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from flows.pipeline_flow import run_pipeline
from pipeline.config.schema import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_help_explains_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "status", "runs", "ui", "validate", "compare"):
        assert command in result.output


def test_validate_accepts_the_demo_config():
    result = runner.invoke(app, ["validate", str(REPO / "configs" / "demo.yaml")])
    assert result.exit_code == 0 and "valid (demo world, sft loss ce)" in result.output


def test_bad_config_is_one_line_of_advice_without_traceback(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("name: x\nsamplng:\n  n: 2\n")
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "typo.yaml:2: samplng: unknown key" in result.output and "did you mean 'sampling'" in result.output
    assert "Traceback" not in result.output


def test_overrides_on_the_command_line_reach_the_stage_keys_and_name_themselves_in_errors(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(f"name: x\nresults_dir: {tmp_path / 'results'}\ndemo:\n  train_examples: 100\n")

    def demo_data_key(*overrides):
        result = runner.invoke(app, ["status", str(path), *overrides], terminal_width=200)
        assert result.exit_code == 0, result.output
        return next(line.split("│")[3].strip() for line in result.output.splitlines() if "demo_data" in line)

    assert demo_data_key("demo.train_examples=200") != demo_data_key() == demo_data_key("demo.train_examples=100")
    result = runner.invoke(app, ["run", str(path), "sampling.n=many", "--stage", "sft"])
    assert result.exit_code == 2 and "override sampling.n=many: sampling.n: " in result.output
    result = runner.invoke(app, ["validate", str(path), "demo.train_examples=0"])
    assert result.exit_code == 2 and "override demo.train_examples=0: demo.train_examples:" in result.output


def test_unknown_stage_names_the_stages(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(f"name: x\nresults_dir: {tmp_path / 'results'}\n")
    result = runner.invoke(app, ["run", str(path), "--stage", "reward"])
    assert result.exit_code == 2
    assert "unknown stage 'reward'" in result.output
    assert "demo_data, pretrain, evaluate_base, sft, evaluate_sft, sample, pairs, dpo, evaluate_dpo" in result.output


def test_a_second_run_on_the_same_results_folder_is_refused(tmp_path):
    # Another process (as another `posttrain run` would) holds the results folder.
    results = tmp_path / "results"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from pipeline.results.manifest import results_lock\n"
         f"with results_lock(Path({str(results)!r})):\n    print('held', flush=True); time.sleep(120)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        path = tmp_path / "ok.yaml"
        path.write_text(f"name: x\nresults_dir: {results}\n")
        result = runner.invoke(app, ["run", str(path)])
        assert result.exit_code == 2
        assert f"{results} is in use by another `posttrain run` (pid {holder.pid} on" in result.output
        assert not (results / "mlflow.db").exists()  # refused before touching anything
    finally:
        holder.kill()
        holder.wait()


def test_a_hub_model_that_cannot_be_read_fails_validate_and_run_before_any_stage(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from pipeline.data import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and an empty cache
    monkeypatch.setattr(hub, "_REACHABLE", None)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "1+1=", "answer": "2", "completion": "2"}\n')
    path = tmp_path / "hub-model.yaml"
    path.write_text(f"name: x\nresults_dir: {tmp_path / 'results'}\nmodel: {{path: org/absent}}\ndata:\n"
                    f"  sft: {{path: {rows}}}\n  target_eval: {{path: {rows}}}\n  general_eval: {{path: {rows}}}\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "model.path: org/absent is neither in the local Hugging Face cache" in result.output
    with pytest.raises(ConfigError, match=r"model\.path: org/absent is neither in the local Hugging Face cache"):
        run_pipeline(load_config(path))  # `run`: the flow checks before its first stage
    assert not list((tmp_path / "results").glob("*/*"))  # no stage began


def test_the_gsm8k_example_validates_with_the_hub_replaced_by_local_folders_of_the_same_layout(tmp_path, monkeypatch):
    """configs/qwen3-gsm8k.yaml reads GSM8K from the hub as it is there (a subset, its own column
    names, worked solutions ending in `#### 72`): validate reads every row and names the key of a
    data set whose columns or answers do not fit."""
    from pipeline.data.sources import write_jsonl
    from tests.unit.test_data import gsm8k_layout
    from tests.unit.test_models import tiny_qwen3

    monkeypatch.chdir(tmp_path)
    model = tiny_qwen3(tmp_path / "Qwen3-4B-Base")  # the architecture, at a size that takes no time
    gsm8k = gsm8k_layout(tmp_path / "gsm8k")
    write_jsonl(tmp_path / "data" / "general_mix.jsonl", [{"prompt": "2+2=", "answer": "4"}])
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the accelerate config
    path = tmp_path / "gsm8k.yaml"
    path.write_text((REPO / "configs" / "qwen3-gsm8k.yaml").read_text().replace("Qwen/Qwen3-4B-Base", str(model))
                    .replace("openai/gsm8k", str(gsm8k)))
    hub_free = "evaluate.lm_eval=null"  # its lm-eval tasks (MMLU, IFEval) read the hub's data sets

    result = runner.invoke(app, ["validate", str(path), hub_free])
    assert result.exit_code == 0 and "valid" in result.output, result.output
    lora = tmp_path / "gsm8k-lora.yaml"  # the LoRA variant
    lora.write_text((REPO / "configs" / "qwen3-gsm8k-lora.yaml").read_text().replace("Qwen/Qwen3-4B-Base", str(model))
                    .replace("openai/gsm8k", str(gsm8k)))
    result = runner.invoke(app, ["validate", str(lora)])
    assert result.exit_code == 0 and "valid" in result.output, result.output
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # QLoRA, on a machine without a CUDA GPU
    result = runner.invoke(app, ["validate", str(lora), "sft.lora.load_in_4bit=true"])
    assert result.exit_code == 2 and "sft.lora.load_in_4bit: 4-bit QLoRA (bitsandbytes) needs a CUDA GPU" in \
        result.output, result.output
    result = runner.invoke(app, ["validate", str(path), hub_free, "data.target_eval.columns.prompt=problem"])
    assert result.exit_code == 2, result.output
    assert "data.target_eval: " in result.output and "gsm8k (main, test): no column problem (for prompt): its " \
        "columns are question, answer" in result.output
    result = runner.invoke(app, ["validate", str(path), hub_free, "data.sft.answer_pattern=answer: (\\d+)"])
    assert result.exit_code == 2 and "data.sft: " in result.output, result.output
    assert "gsm8k (main, train) row 1: the answer does not match answer_pattern" in result.output


def test_init_writes_a_starter_config_that_maps_the_columns_and_validates_once_filled_in(tmp_path, monkeypatch):
    from pipeline.data.sources import write_jsonl
    from tests.unit.test_data import gsm8k_layout
    from tests.unit.test_models import tiny_qwen3

    monkeypatch.chdir(tmp_path)
    gsm8k_layout(tmp_path / "gsm8k")
    model = tiny_qwen3(tmp_path / "my model: v1")  # a path YAML would misread unquoted
    result = runner.invoke(app, ["init", "--model", str(model), "--data", "gsm8k", "--subset", "main", "--out",
                                 "mine.yaml"])
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load((tmp_path / "mine.yaml").read_text())
    assert cfg["model"]["path"] == str(model)
    assert cfg["data"]["sft"] == {"hub": "gsm8k", "subset": "main", "split": "train", "answer_pattern": r"####\s*(.+)",
                                  "columns": {"prompt": "question", "completion": "answer"}, "verifier": "math"}
    assert cfg["data"]["target_eval"]["split"] == "test"
    assert cfg["data"]["target_eval"]["columns"] == {"prompt": "question"}  # answer is answer already
    assert "To fill in before it validates: data.general_eval" in result.output
    write_jsonl(tmp_path / "general_eval.jsonl", [{"prompt": "2+2=", "answer": "4"}])
    result = runner.invoke(app, ["validate", "mine.yaml"])
    assert result.exit_code == 0, result.output  # every GSM8K row read through the mapping
    result = runner.invoke(app, ["init", "--model", str(model), "--data", "gsm8k", "--out", "mine.yaml"])
    assert result.exit_code == 2 and "mine.yaml exists" in result.output
    write_jsonl(tmp_path / "odd.jsonl", [{"q": "2+2=", "a": "4"}])
    result = runner.invoke(app, ["init", "--model", str(model), "--data", "odd.jsonl", "--out", "odd.yaml"])
    assert result.exit_code == 2 and "its columns (q, a) hold no prompt/completion or messages" in result.output
    assert not (tmp_path / "odd.yaml").exists()


def test_hub_only_lm_eval_tasks_fail_validate_and_run_offline_before_any_stage(tmp_path, monkeypatch):
    from datasets import config
    from huggingface_hub import constants

    from pipeline.data import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and empty caches: the hub's data sets are nowhere
    monkeypatch.setattr(hub, "_REACHABLE", None)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    path = tmp_path / "hub.yaml"
    path.write_text(f"name: x\nresults_dir: {tmp_path / 'results'}\nevaluate:\n  lm_eval:\n    tasks:\n"
                    "      - posttrain_general_exact\n      - {task: gsm8k, num_fewshot: 5}\n")
    for command in ("validate", "run"):
        result = runner.invoke(app, [command, str(path)])
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert "evaluate.lm_eval.tasks[1] (gsm8k) needs the hub data set openai/gsm8k (main)" in result.output
        assert "posttrain_general_exact" not in result.output  # the project's own task reads local data
    assert not (tmp_path / "results" / "demo_data").exists()  # refused before any stage


def test_ui_serves_the_store_with_one_worker_and_opens_on_the_experiments_runs(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    results = tmp_path / "results"
    results.mkdir()
    experiment = MlflowClient(f"sqlite:///{results / 'mlflow.db'}").create_experiment("posttrain")
    path = tmp_path / "ok.yaml"
    path.write_text(f"name: x\nresults_dir: {results}\n")
    started = []
    monkeypatch.setattr(subprocess, "run", lambda command, env: started.append((command, env)))
    result = runner.invoke(app, ["ui", str(path), "--port", "5077"])
    assert result.exit_code == 0, result.output
    assert (f"MLflow UI for sqlite:///{results / 'mlflow.db'}: http://127.0.0.1:5077/#/experiments/{experiment}/runs"
            "?workflowType=machine_learning\n" in result.output)  # the port it was given, and the runs in the
    # "Model training" view rather than MLflow's GenAI landing page
    (command, env), = started
    assert command[1:4] == ["-m", "mlflow", "server"] and command[command.index("--port") + 1] == "5077"
    assert command[command.index("--workers") + 1] == "1" and env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_lineage_without_a_store_says_so_and_creates_none(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(f"name: x\nresults_dir: {tmp_path / 'results'}\n")
    result = runner.invoke(app, ["lineage", "m-0000", str(path)])
    assert result.exit_code == 2 and f"no MLflow store at sqlite:///{tmp_path / 'results' / 'mlflow.db'}" in result.output
    assert not (tmp_path / "results" / "mlflow.db").exists()


def test_run_keeps_one_local_prefect_server_for_the_next_commands(tmp_path):
    """With no Prefect API configured, the first `posttrain run` starts a local server in the
    background and later ones use it: both runs are in its API afterwards, and it answers
    until `prefect server stop`. An earlier server that was killed (its PID file left) does
    not stand in the way."""
    import requests

    from pipeline.runtime.process import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")} | {
        "POSTTRAIN_PREFECT_SERVER": "keep", "POSTTRAIN_PREFECT_PORT": str(port), "PREFECT_HOME": str(tmp_path / "prefect")}
    config = tmp_path / "c.yaml"
    config.write_text(f"name: kept\nresults_dir: {tmp_path / 'results'}\n")
    command = [sys.executable, "-m", "flows.cli", "run", str(config), "--stage", "demo_data"]
    api = f"http://127.0.0.1:{port}/api"
    other = subprocess.Popen(["sleep", "300"])  # after a reboot, the dead server's number is another program's
    (tmp_path / "prefect").mkdir()
    (tmp_path / "prefect" / "server.pid").write_text(str(other.pid))
    try:
        first = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
        assert first.returncode == 0, first.stderr[-2000:]
        assert f"a Prefect server now runs at http://127.0.0.1:{port}" in first.stderr
        second = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
        assert second.returncode == 0, second.stderr[-2000:]
        assert "a Prefect server now runs" not in second.stderr and "Starting temporary server" not in second.stderr
        runs = requests.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
        commands = [r for r in runs if r["name"].startswith("kept/") and r["parent_task_run_id"] is None]
        assert [r["state"]["type"] for r in commands] == ["COMPLETED", "COMPLETED"]  # each with its pipeline subflow
    finally:
        other.kill()
        subprocess.run([str(Path(sys.executable).parent / "prefect"), "server", "stop"], env=env, capture_output=True)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{api}/health", timeout=2)
