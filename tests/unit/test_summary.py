"""The pieces of what `posttrain` prints, without running a pipeline: links into the MLflow UI,
tables that show any text as it is, progress bars as vLLM and a resumed Trainer ask for them."""

import io
import os
from types import SimpleNamespace

from rich.console import Console

from pipeline.reporting.summary import run_summary
from pipeline.results.manifest import Manifest
from pipeline.runtime.progress import STAGE_ENV, stage_bar
from pipeline.tracking.tracker import run_link


def test_links_point_to_the_server_without_credentials_or_to_posttrain_ui():
    assert run_link("https://user:secret@mlflow.example.com:8443/root/", "3", "abc", 5000) == \
        "https://mlflow.example.com:8443/root/#/experiments/3/runs/abc"
    assert run_link("sqlite:////r/mlflow.db", "1", "abc", 5077) == "http://127.0.0.1:5077/#/experiments/1/runs/abc"
    assert run_link("/r/mlruns", "1", "abc", 5000) == "http://127.0.0.1:5000/#/experiments/1/runs/abc"
    assert run_link("databricks", "1", "abc", 5000) == "abc"  # no UI address to give: the run id


def test_the_summary_shows_text_with_brackets_as_it_is():
    manifest = Manifest("sft", "k1", {}, metrics={"train_loss": 0.5})
    result = SimpleNamespace(name="sft", manifest=manifest, cached=False, seconds=75.0,
                             link="http://h/#/experiments/[1]/runs/[/x]")  # would be rich markup, or crash it
    out = io.StringIO()
    Console(file=out, width=300).print(run_summary([result]))
    assert "http://h/#/experiments/[1]/runs/[/x]" in out.getvalue()
    assert "1m 15s" in out.getvalue() and "loss 0.500" in out.getvalue()


def test_stage_bars_take_tqdm_arguments_as_vllm_and_a_resumed_trainer_pass_them(monkeypatch):
    monkeypatch.setitem(os.environ, STAGE_ENV, "evaluate_sft")
    out = io.StringIO()
    # vLLM: a bar with a total and its own description, and one wrapped around an iterable.
    bar = stage_bar(total=4, desc="Processed prompts", dynamic_ncols=True, postfix="speed", file=out)
    bar.update(4)
    bar.close()
    assert list(stage_bar(range(3), desc="Adding requests", file=out)) == [0, 1, 2]
    # A training stage resumed at step 6 of 10 counts on from there.
    resumed = stage_bar(total=10, initial=6, unit="step", file=out)
    resumed.close()
    text = out.getvalue()
    assert "evaluate_sft: Processed prompts: 100%" in text and "4/4" in text
    assert "evaluate_sft: Adding requests: 100%" in text and "3/3" in text
    assert "6/10" in text
