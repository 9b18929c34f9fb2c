"""One-process stages fork from a server that imported the libraries once (pipeline.runtime.process):
the child gets the parent's environment and output, fails like a `python -m` stage, and the
server's imports never touch CUDA (a CUDA driver initialised before a fork is unusable in
the children)."""

import json
import multiprocessing
import os
from multiprocessing import forkserver
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.config.schema import PipelineConfig
from pipeline.results.manifest import Manifest
from flows.wiring import MODULES
from pipeline.runtime.process import ERROR, StageError, preloaded_modules, run_forked, run_in_process, start_fork_server
from stages import evaluate, pairs, sample, sft


def request(tmp_path):
    out = tmp_path / "probe"
    out.mkdir(parents=True)
    (out / "request.json").write_text(json.dumps({
        "config": PipelineConfig(name="probe").model_dump(mode="json"), "out": str(out), "record": {"inputs": {"x": "1"}},
        "paths": {}}))
    return out


def test_a_forked_stage_has_the_parents_environment_and_output(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("PROBE_UNSET", "in this process, not in the stage's environment")
    env = {k: v for k, v in os.environ.items() if k != "PROBE_UNSET"} | {"PROBE_VALUE": "42", "OMP_NUM_THREADS": "1"}
    forkserver._forkserver._stop()  # one an earlier test in this worker started; started afresh with the preload:
    start_fork_server([module.STAGE for module in MODULES])
    seen = []
    for _ in range(2):
        out = request(tmp_path / str(len(seen)))
        assert run_forked("tests.e2e.stage_probe", out / "request.json", env) == 0
        seen.append(json.loads((out / "seen.json").read_text()))
        assert Manifest.read(out).inputs == {"x": "1"}  # written by run_request, as for `python -m`
    captured = capfd.readouterr()
    assert captured.out.count("probe says hello on stdout") == 2
    assert captured.err.count("probe says hello on stderr") == 2
    assert all(s["env"] == {"PROBE_VALUE": "42", "PROBE_UNSET": None} for s in seen)
    assert all(s["preloaded"] for s in seen)  # TRL was imported before the stage's own module ran
    assert seen[0]["pid"] != seen[1]["pid"] != os.getpid()  # a process per stage
    assert all(s["threads"] == 1 for s in seen)  # OMP_NUM_THREADS set for the stage is honoured
    # As `python -m tests.e2e.stage_probe request.json` would have them:
    assert [s["argv"] for s in seen] == [["tests.e2e.stage_probe", str(tmp_path / d / "probe" / "request.json")]
                                         for d in ("0", "1")]
    assert {s["start_method"] for s in seen} == {multiprocessing.get_start_method()}  # not the server's forkserver
    assert seen[0]["numpy_draw"] != seen[1]["numpy_draw"]  # numpy seeded afresh, not the server's state


def test_a_forked_stage_that_fails_exits_nonzero_with_its_error_recorded(tmp_path):
    out = request(tmp_path)
    assert run_forked("tests.e2e.stage_probe", out / "request.json", os.environ | {"PROBE_FAIL": "1"}) == 1
    assert (out / ERROR).read_text() == "ValueError: the probe was told to fail\n"
    assert "raise ValueError" in (out / "traceback.txt").read_text()
    assert Manifest.find(out) is None


@pytest.mark.parametrize("preload", [True, False])
def test_a_stage_past_its_time_limit_is_stopped_and_fails_naming_the_limit(tmp_path, preload):
    """A hung engine or collective would hold the run for ever: `launch.stage_timeout_s` ends it,
    forked from the preloaded server or started as `python -m`."""
    import psutil

    from tests.e2e import stage_probe

    cfg = PipelineConfig(name="probe", launch={"stage_timeout_s": 3, "preload": preload})
    with pytest.raises(StageError, match=r"^stage 'probe' ran past launch\.stage_timeout_s \(3 s\) and was stopped "
                                         r"\(a hung engine or collective.*run again") as error:
        run_in_process(stage_probe.STAGE, cfg, tmp_path / "probe", {}, {"PROBE_HANG": str(tmp_path / "pid")})
    assert error.value.timed_out and not error.value.transient  # not retried: the next try would hang as well
    for pid in map(int, (tmp_path / "pid").read_text().split()):  # it did start, and hang; and the process it started
        try:
            assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # ended; its parent has yet to reap it
        except psutil.NoSuchProcess:
            pass
    assert Manifest.find(tmp_path / "probe") is None


def test_the_fork_servers_imports_never_ask_cuda_anything():
    """Every query that would initialise the CUDA driver raises while the server's modules import."""
    modules = preloaded_modules([module.STAGE for module in MODULES], "sqlite:////tmp/mlflow.db")
    assert "stages.sft" in modules and "pipeline.training.train" in modules and "pipeline.sampling.sampler" in modules
    # MLflow's system-metrics monitor, which a stage running a model starts, and the SQL store it
    # opens where MLflow keeps its runs in a database: 1-2 s to import in each stage otherwise.
    monitor, store = "mlflow.system_metrics.system_metrics_monitor", "mlflow.store.tracking.sqlalchemy_store"
    assert monitor in modules and monitor not in preloaded_modules([pairs.STAGE])
    assert store in modules and store in preloaded_modules([sft.STAGE], "postgresql+psycopg2://mlflow@db/mlflow")
    assert store not in preloaded_modules([sft.STAGE]) + preloaded_modules([sft.STAGE], "http://127.0.0.1:5000")
    probe = textwrap.dedent(f"""
        import torch, torch.cuda
        def refuse(*args, **kwargs):
            raise AssertionError("CUDA was asked at import time")
        for name in ("is_available", "device_count", "init", "_lazy_init", "current_device", "get_device_properties"):
            setattr(torch.cuda, name, refuse)
        for module in {modules!r}:
            __import__(module)
        print("imported", len({modules!r}))
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"imported {len(modules)}" in result.stdout


@pytest.mark.parametrize("stage", [evaluate.STAGE, sample.STAGE], ids=["evaluate", "sample"])
def test_a_sampling_stages_preloads_leave_its_model_and_tokenizer_classes_nothing_to_import(stage):
    """transformers imports its Auto classes lazily, and with them generation and scikit-learn
    (490 modules, 0.4 s): in the fork server, not in every stage."""
    probe = textwrap.dedent(f"""
        import sys
        for module in {preloaded_modules([stage])!r}:
            __import__(module)
        before = set(sys.modules)
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationMixin
        print(sorted(set(sys.modules) - before))
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_a_stage_process_killed_before_it_said_why_is_reported_as_killed(tmp_path, monkeypatch):
    from pipeline.runtime import process as stage
    from pipeline.runtime.process import StageError, run_in_process

    monkeypatch.setattr(stage, "run_forked", lambda *args: -9)  # what the OOM killer leaves: no error, no traceback
    with pytest.raises(StageError, match=r"exit code -9\): no error recorded\n  the process was killed by SIGKILL "
                                         r"before it recorded an error") as error:
        run_in_process(sft.STAGE, PipelineConfig(name="x"), tmp_path / "sft", {})
    assert "traceback.txt" not in str(error.value)


def test_the_stage_declarations_import_no_torch():
    """`posttrain status` reads every stage's declaration: torch, transformers and TRL come only
    with a stage's `run`, in its own process."""
    probe = (f"import sys\nfor m in {[m.STAGE.name for m in MODULES]!r}: __import__('stages.' + m)\n"
             "print(sorted(m for m in ('torch', 'transformers', 'trl', 'vllm', 'datasets') if m in sys.modules))")
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=repo)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("command, heavy", [
    ("validate", ("torch", "transformers", "trl", "vllm", "prefect", "mlflow")),
    ("status", ("torch", "transformers", "trl", "vllm", "datasets", "prefect", "mlflow")),
])
def test_validate_and_status_import_no_ml_framework_prefect_or_mlflow(tmp_path, command, heavy):
    """The commands that run nothing answer at once: once TRL's options are cached (the first
    check of a config reads them), neither imports torch, TRL, Prefect or MLflow."""
    config = tmp_path / "c.yaml"
    config.write_text(f"name: x\nresults_dir: {tmp_path / 'results'}\n")
    env = os.environ | {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    repo = Path(__file__).resolve().parents[2]
    probe = (f"import sys\nfrom typer.testing import CliRunner\nfrom flows.cli import app\n"
             f"result = CliRunner().invoke(app, [{command!r}, {str(config)!r}])\nassert result.exit_code == 0, result.output\n"
             f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(config)], env=env, check=True, cwd=repo,
                   capture_output=True)  # fills the cache
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=repo, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
