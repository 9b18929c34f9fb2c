"""End to end through the stage processes, on a very small demo world (seconds per stage)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flows.pipeline import run_pipeline
from pipeline.config import parse_config
from pipeline.manifest import MANIFEST, Manifest
from pipeline.stage import StageError

TINY = {
    "demo": {"hidden_size": 64, "num_heads": 1, "num_layers": 1, "intermediate_size": 64,
             "train_examples": 64, "domain_train_examples": 32, "test_examples": 2},
    "pretrain": {"trainer": {"max_steps": 3, "per_device_train_batch_size": 8, "logging_steps": 1}},
    "sft": {"trainer": {"max_steps": 2, "per_device_train_batch_size": 8, "logging_steps": 1}},
    "sampling": {"max_tokens": 4},
}


def tiny_config(tmp_path: Path, **overrides):
    data = {"name": "tiny", "results_dir": str(tmp_path / "results"), **TINY}
    for section, value in overrides.items():
        data[section] = {**data.get(section, {}), **value}
    return parse_config(data)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("demo")
    return tmp_path, run_pipeline(tiny_config(tmp_path))


def test_pipeline_runs_every_stage_and_writes_manifests(demo_run):
    _, results = demo_run
    assert [r.name for r in results] == ["demo_data", "pretrain", "evaluate_base", "sft", "evaluate_sft"]
    assert not any(r.cached for r in results)
    for r in results:
        manifest = Manifest.read(r.manifest.folder)
        assert manifest.key == r.manifest.folder.name
        assert all(manifest.path(name).exists() for name in manifest.outputs)
    sft = results[3].manifest
    assert sft.inputs["model"] == results[1].manifest.key  # lineage: SFT starts from the pretrained model
    evaluation = results[4].manifest.metrics
    assert 0.0 <= evaluation["target/pass@1"] <= 1.0 and "general/retention" in evaluation


def test_pretrained_model_saves_and_loads_with_from_pretrained(demo_run):
    _, results = demo_run
    folder = results[1].manifest.path("model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 64
    ids = tokenizer("12+34=", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    history = json.loads(results[1].manifest.path("log_history").read_text())
    assert history[-1]["step"] == 3 and any("loss" in h for h in history)


def test_second_run_is_cached_and_a_changed_stage_reruns_downstream(demo_run):
    tmp_path, first = demo_run
    again = run_pipeline(tiny_config(tmp_path))
    assert all(r.cached for r in again)
    assert [r.manifest.key for r in again] == [r.manifest.key for r in first]
    changed = run_pipeline(tiny_config(tmp_path, sft={"loss": {"name": "dft"}}))
    assert [(r.name, r.cached) for r in changed] == [
        ("demo_data", True), ("pretrain", True), ("evaluate_base", True), ("sft", False), ("evaluate_sft", False)]
    only = run_pipeline(tiny_config(tmp_path, sft={"loss": {"name": "dft"}}), stage="sft")
    assert [(r.name, r.cached) for r in only] == [("demo_data", True), ("pretrain", True), ("sft", True)]


@pytest.mark.parametrize("loss, diagnostics", [
    ({"name": "ce"}, ["entropy", "confident_conflict_frac"]),
    ({"name": "dft"}, ["entropy"]),
    ({"name": "eaft", "topk": 5}, ["weight"]),
    ({"name": "masked"}, ["masked_frac"]),
    ({"name": "eksft", "ratio": 0.3}, ["kl", "masked_entropy_frac", "masked_kl_frac", "masked_both_frac"]),
    ({"name": "gem", "beta": 0.5}, ["entropy"]),
])
def test_sft_trains_with_each_loss_and_logs_its_diagnostics(demo_run, loss, diagnostics):
    tmp_path, _ = demo_run
    results = run_pipeline(tiny_config(tmp_path, sft={"loss": loss}), stage="sft")
    sft = results[-1].manifest
    history = json.loads(sft.path("log_history").read_text())
    logged = {key for entry in history for key in entry}
    assert set(diagnostics) <= logged
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history if "loss" in h)
    base = AutoModelForCausalLM.from_pretrained(results[1].manifest.path("model"))
    tuned = AutoModelForCausalLM.from_pretrained(sft.path("model"))
    assert not torch.equal(base.lm_head.weight, tuned.lm_head.weight)  # it trained


def test_sft_with_lora_saves_a_merged_model(demo_run):
    tmp_path, _ = demo_run
    results = run_pipeline(tiny_config(tmp_path, sft={"lora": {"r": 4, "lora_alpha": 8}}), stage="sft")
    sft = results[-1].manifest
    model = AutoModelForCausalLM.from_pretrained(sft.path("model"))
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_failing_stage_reports_why_and_leaves_no_manifest(demo_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1*2=", "completion": "2"}\n{"prompt": "oops"}\n')
    demo_tmp, _ = demo_run
    cfg = tiny_config(demo_tmp, data={"sft": {"path": str(bad)}})
    with pytest.raises(StageError, match=r"stage 'sft' failed.*bad\.jsonl:2: missing fields"):
        run_pipeline(cfg, stage="sft")
    failed = [p.parent for p in (demo_tmp / "results" / "sft").glob("*/error.txt")]
    assert failed and not any((f / MANIFEST).exists() for f in failed)
