"""Training stages on several processes through `accelerate launch`: two CPU processes (gloo)
train the same model as one process with the same global batch, for SFT with a custom token
loss and for DPO; only the first process writes the result and logs to MLflow."""

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from flows.pipeline_flow import run_pipeline
from flows.wiring import pipeline_status
from pipeline.config.schema import DemoConfig, parse_config
from pipeline.data.sources import write_jsonl
from pipeline.demo.world import build_model, build_tokenizer
from pipeline.runtime.process import StageError, stage_command
from stages import evaluate, pretrain, sft

GLOBAL_BATCH = 8
STEPS = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return build_world(tmp_path_factory.mktemp("world"))


def build_world(folder: Path) -> Path:
    """A tiny model, SFT rows, preference pairs, and evaluation rows (which these stages never read)."""
    tokenizer = build_tokenizer()
    build_model(DemoConfig(hidden_size=64, num_heads=1, num_layers=1, intermediate_size=64), tokenizer,
                seed=0).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    problems = [(a, b) for a in range(11, 27) for b in (3, 7)]
    write_jsonl(folder / "sft.jsonl", [{"prompt": f"{a}*{b}=", "completion": str(a * b)} for a, b in problems])
    write_jsonl(folder / "pairs.jsonl", [{"prompt": f"{a}*{b}=", "chosen": str(a * b), "rejected": str(a * b + 1)}
                                         for a, b in problems])
    write_jsonl(folder / "eval.jsonl", [{"prompt": "2*3=", "answer": "6"}])
    return folder


def config(world: Path, results: Path, processes: int, **sft_trainer):
    per_device = {"per_device_train_batch_size": GLOBAL_BATCH // processes, "max_steps": STEPS,
                  "logging_steps": 1, "learning_rate": 5e-3, "save_steps": 2}
    return parse_config({
        "name": f"launch-{processes}",
        "results_dir": str(results),
        "model": {"path": str(world / "model")},
        "data": {name: {"path": str(world / file)} for name, file in
                 (("sft", "sft.jsonl"), ("preference", "pairs.jsonl"), ("target_eval", "eval.jsonl"),
                  ("general_eval", "eval.jsonl"))},
        "sft": {"loss": {"name": "eaft"}, "trainer": per_device | sft_trainer},
        "dpo": {"trainer": per_device | {"gradient_checkpointing": False}},
        "launch": {"num_processes": processes},
    })


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """SFT then DPO, with one process and with two."""
    return {processes: run_pipeline(config(world, tmp_path_factory.mktemp(f"p{processes}"), processes), stage="dpo")
            for processes in (1, 2)}


def weights(model: Path) -> dict[str, torch.Tensor]:
    return load_file(model / "model.safetensors")


def test_two_processes_train_the_model_one_process_trains(world, runs):
    start = world / "model"
    for one, two in zip(runs[1], runs[2], strict=True):
        assert one.name == two.name and not one.cached and not two.cached
        trained, launched, before = (weights(m) for m in (one.manifest.path("model"), two.manifest.path("model"), start))
        assert trained.keys() == launched.keys()
        moved = max((trained[name] - before[name]).abs().max().item() for name in trained)
        assert moved > 1e-3, f"{one.name} did not train"
        # Float noise of the all-reduce, grown by Adam over a few steps, stays below 1e-4; a wrong
        # batch or loss scale moves weights by 1e-3 and more.
        for name in trained:
            torch.testing.assert_close(launched[name], trained[name], rtol=1e-3, atol=1e-4, msg=f"{one.name}: {name}")
        losses = [[h["loss"] for h in json.loads(r.manifest.path("log_history").read_text()) if "loss" in h]
                  for r in (one, two)]
        assert len(losses[0]) == STEPS and losses[1] == pytest.approx(losses[0], rel=1e-4)
        start = one.manifest.path("model")  # DPO starts from the SFT model


def test_two_processes_ran_and_only_the_first_wrote_and_logged(runs):
    for result in runs[2]:
        # The Trainer saves each process's RNG state in a checkpoint: proof that two trained.
        checkpoint = result.manifest.folder / "checkpoints" / "checkpoint-2"
        assert sorted(p.name for p in checkpoint.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
        assert not list(result.manifest.folder.glob("traceback*"))
    client = MlflowClient(f"sqlite:///{runs[2][0].manifest.folder.parents[1] / 'mlflow.db'}")
    for result in runs[2]:
        # The stage's run id reached every process, and only the first logged: one value per step.
        history = client.get_metric_history(result.run_id, "loss")
        assert [m.step for m in history] == list(range(1, STEPS + 1)), result.name


def test_a_launched_stage_error_names_the_rank_and_is_not_retried(world, tmp_path):
    cfg = config(world, tmp_path / "results", 2, max_length=3)  # every prompt fills max_length
    command = stage_command(sft.STAGE, cfg, tmp_path / "request.json")
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and command[command.index("--num_processes") + 1] == "2"
    with pytest.raises(StageError, match=r"rank [01] DataError: .*max_length") as error:
        run_pipeline(cfg, stage="sft")
    assert not error.value.transient
    assert not list((tmp_path / "results" / "sft").glob("*/manifest.json"))


def test_only_training_stages_are_launched(world, tmp_path):
    cfg = config(world, tmp_path, 4)
    assert stage_command(evaluate.STAGE, cfg, tmp_path / "r.json") is None  # forked from the preloaded server
    assert "accelerate.commands.launch" in stage_command(pretrain.STAGE, cfg, tmp_path / "r.json")
    cfg.launch.preload = False
    assert stage_command(evaluate.STAGE, cfg, tmp_path / "r.json")[1:] == ["-m", "stages.evaluate", str(tmp_path / "r.json")]
    assert "accelerate.commands.launch" in stage_command(pretrain.STAGE, cfg, tmp_path / "r.json")


def test_the_number_of_processes_is_in_the_training_keys_only(world, tmp_path):
    """The same per-device settings on two processes train on twice the global batch: another
    result. Evaluation does not depend on it."""
    one, two = ({s.name: s.key for s in pipeline_status(cfg)} for cfg in
                (config(world, tmp_path, 1, per_device_train_batch_size=GLOBAL_BATCH // 2), config(world, tmp_path, 2)))
    assert one["sft"] != two["sft"]
    assert one["evaluate_base"] == two["evaluate_base"]
