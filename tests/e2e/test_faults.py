"""Faults injected for real: a loss that turns NaN mid-training stops the stage with a clear
error and leaves the last good checkpoint intact; a stage process killed while it writes its
outputs or manifest is not done; a disk that fills up during a checkpoint save."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback
from trl import SFTConfig

from pipeline.config.schema import DemoConfig, LossConfig, parse_config
from pipeline.data.sources import read_jsonl, write_jsonl
from pipeline.demo.world import build_model, build_tokenizer
from pipeline.losses.token_loss import build_loss
from pipeline.results.manifest import Manifest, digest
from pipeline.training.train import CHECKPOINT_SEAL, fit, trainer_defaults
from pipeline.training.trainer import NonFiniteLoss, TokenLossSFTTrainer

TINY = DemoConfig(hidden_size=64, num_heads=1, num_layers=1, intermediate_size=64)


class PoisonWeightsBefore(TrainerCallback):
    """Turns the output weights to NaN just before step `step` (after the step before was saved)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step - 1:
            with torch.no_grad():
                model.lm_head.weight.fill_(float("nan"))


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    tokenizer = build_tokenizer()
    rows = [{"prompt": f"{a}*3=", "completion": str(3 * a)[::-1]} for a in range(10, 42)]
    args = SFTConfig(output_dir=str(tmp_path / "checkpoints"), **(trainer_defaults(0) | {
        "max_steps": 6, "save_steps": 2, "per_device_train_batch_size": 8, "logging_steps": 1, "report_to": "none"}))
    trainer = TokenLossSFTTrainer(model=build_model(TINY, tokenizer, seed=0), args=args,
                                  train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                  token_loss=build_loss("ce"), callbacks=[PoisonWeightsBefore(step=5)])
    with pytest.raises(NonFiniteLoss, match=r"the loss is nan at step 5: training stopped.*Lower the learning rate"):
        fit(trainer, tokenizer, tmp_path, merge=False)
    assert not (tmp_path / "model").exists()  # nothing saved as a result
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    good = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "checkpoint-4")
    assert all(torch.isfinite(p).all() for p in good.parameters())
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_sft_rows_whose_prompt_fills_max_length_are_an_error_not_silently_dropped(tmp_path):
    from pipeline.data.sources import DataError
    from pipeline.training.train import train_sft

    tokenizer = build_tokenizer()
    rows = [{"prompt": "12*3=", "completion": "63"}] * 7 + [{"prompt": "1" * 40 + "*3=", "completion": "3"}]
    args = {"max_steps": 1, "max_length": 32, "per_device_train_batch_size": 8, "report_to": "none"}
    with pytest.raises(DataError, match=r"1 of 8 SFT rows have a prompt that fills max_length = 32 tokens"):
        train_sft(build_model(TINY, tokenizer, seed=0), tokenizer, Dataset.from_list(rows), args,
                  LossConfig(name="ce"), tmp_path, 0)
    assert not list(tmp_path.glob("checkpoints/checkpoint-*"))  # refused before any step


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_training_with_a_tokenizer_bigger_than_the_models_vocabulary_is_refused(tmp_path, stage):
    from pipeline.training.train import train_dpo, train_sft

    tokenizer = build_tokenizer()
    model = build_model(TINY, tokenizer, seed=0)
    tokenizer.add_tokens(["<extra>"])  # an id the model's embedding does not have
    rows = [{"prompt": "12*3=", "chosen": "63", "rejected": "36"}] * 8
    args = {"max_steps": 1, "per_device_train_batch_size": 8, "report_to": "none"}
    with pytest.raises(ValueError, match=rf"has {len(tokenizer)} tokens, the model's vocabulary only {len(tokenizer) - 1}"):
        if stage == "sft":
            sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
            train_sft(model, tokenizer, Dataset.from_list(sft_rows), args, LossConfig(name="ce"), tmp_path, 0)
        else:
            train_dpo(model, tokenizer, Dataset.from_list(rows), args, tmp_path, 0, build_model(TINY, tokenizer, seed=0))


def test_dpo_stops_at_a_nan_loss_too(tmp_path):
    from pipeline.training.train import train_dpo

    tokenizer = build_tokenizer()
    policy = build_model(TINY, tokenizer, seed=0)
    with torch.no_grad():
        policy.lm_head.weight[5].fill_(float("inf"))
    pairs = Dataset.from_list([{"prompt": "12*3=", "chosen": "63", "rejected": "36"}] * 8)
    args = {"max_steps": 2, "per_device_train_batch_size": 8, "gradient_checkpointing": False, "report_to": "none"}
    with pytest.raises(NonFiniteLoss, match="at step 1"):
        train_dpo(policy, tokenizer, pairs, args, tmp_path, 0, build_model(TINY, tokenizer, seed=0))
    assert not (tmp_path / "model").exists()


REPO = Path(__file__).resolve().parents[2]

# Runs a stage module as the pipeline does (`python -m stages.<name> request.json`), but the
# process SIGKILLs itself when it is about to rename `target` into place: the file's whole
# content sits in its temporary name, the latest moment a crash can cut the write short.
KILL_BEFORE_RENAME = """
import os, runpy, signal, sys
from pathlib import Path
target, module = sys.argv[1], sys.argv[2]
replace = os.replace
def replace_or_die(src, dst):
    if Path(dst).name == target:
        os.kill(os.getpid(), signal.SIGKILL)
    replace(src, dst)
os.replace = replace_or_die
sys.argv = [module, sys.argv[3]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    """A tiny untrained model, training prompts, and samples scored against them."""
    tmp = tmp_path_factory.mktemp("inputs")
    tokenizer = build_tokenizer()
    build_model(TINY, tokenizer, seed=0).save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    prompts = [{"prompt": f"{a}*3=", "completion": str(3 * a)[::-1]} for a in range(10, 22)]
    write_jsonl(tmp / "sft.jsonl", prompts)
    samples = [{"prompt": r["prompt"], "answer": r["completion"], "completions": [r["completion"], "0", "1"]}
               for r in prompts]
    write_jsonl(tmp / "samples" / "samples.jsonl", samples)
    cfg = parse_config({"name": "faults", "results_dir": str(tmp / "results"), "data": {"sft": {"path": str(tmp / "sft.jsonl")}},
                        "pairs": {"n": 2}, "sampling": {"max_tokens": 3}})
    return tmp, cfg


@pytest.mark.parametrize("stage, target, output", [
    ("sample", "samples.jsonl", "samples"), ("pairs", "pairs.jsonl", "pairs"), ("pairs", "manifest.json", "pairs")])
def test_a_stage_killed_while_writing_is_not_done_and_runs_again(stage_inputs, stage, target, output):
    tmp, cfg = stage_inputs
    out = tmp / f"{stage}-{target}"
    paths = {"sample": {"model": str(tmp / "model")}, "pairs": {"samples": str(tmp / "samples" / "samples.jsonl")}}[stage]
    out.mkdir()
    (out / "request.json").write_text(json.dumps(
        {"config": cfg.model_dump(mode="json"), "out": str(out), "record": {}, "paths": paths}))
    killed = subprocess.run([sys.executable, "-c", KILL_BEFORE_RENAME, target, f"stages.{stage}", str(out / "request.json")],
                            cwd=REPO)
    assert killed.returncode == -9
    assert Manifest.find(out) is None  # what the pipeline reads to call a stage done
    if target != "manifest.json":
        assert not (out / target).exists()  # never a partial file under the real name
    again = subprocess.run([sys.executable, "-m", f"stages.{stage}", str(out / "request.json")], cwd=REPO)
    assert again.returncode == 0
    manifest = Manifest.find(out)
    assert manifest.digests[output] == digest(manifest.path(output))
    assert len(read_jsonl(manifest.path(output))) == 12


# Trains the tiny model with a checkpoint every 2 steps in a results folder on a tmpfs too small
# for more than a few checkpoints, frees space (a bigger tmpfs), and trains again to the end.
DISK_FULL = """
import json, shutil, sys
from pathlib import Path
from datasets import Dataset
from trl import SFTConfig
from pipeline.config.schema import DemoConfig
from pipeline.demo.world import build_model, build_tokenizer
from pipeline.losses.token_loss import build_loss
from pipeline.training.train import CHECKPOINT_SEAL, fit, trainer_defaults
from pipeline.training.trainer import TokenLossSFTTrainer

out = Path(sys.argv[1])
tokenizer = build_tokenizer()
rows = [{"prompt": f"{a}*3=", "completion": str(3 * a)[::-1]} for a in range(10, 42)]
args = SFTConfig(output_dir=str(out / "checkpoints"), **(trainer_defaults(0) | {
    "max_steps": 8, "save_steps": 2, "save_total_limit": 10, "per_device_train_batch_size": 8, "report_to": "none"}))
model = build_model(DemoConfig(hidden_size=64, num_heads=1, num_layers=1, intermediate_size=64), tokenizer, seed=0)
trainer = TokenLossSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer, token_loss=build_loss("ce"))
try:
    metrics = fit(trainer, tokenizer, out, merge=False)
    print(f"RESULT finished, resumed from step {int(metrics['resumed_from_step'])}", flush=True)
except Exception as error:
    print(f"RESULT {type(error).__name__}: {error}", flush=True)
"""


def train_on_a_small_disk(tmp_path: Path, size: str, then: str = "") -> list[str]:
    """The RESULT lines of DISK_FULL training on a tmpfs of `size` (in a user and mount namespace),
    then of the shell commands `then` in the same namespace, so the tmpfs outlives the first run
    (`{disk}`, `{train}` and `{tmp}` in them are filled in)."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unprivileged user and mount namespaces (unshare -rm) for a size-limited tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "train.py"
    script.write_text(DISK_FULL)
    train = f"{sys.executable} {script} {disk}"
    shell = f"mount -t tmpfs -o size={size} tmpfs {disk} && {train}; " + then.format(disk=disk, train=train, tmp=tmp_path)
    run = subprocess.run(["unshare", "-rm", "sh", "-c", shell], cwd=REPO, capture_output=True, text=True)
    results = [line for line in run.stdout.splitlines() if line.startswith("RESULT")]
    assert results, run.stdout + run.stderr
    return results


def test_a_full_disk_during_a_checkpoint_save_is_a_clear_error_and_resume_works_after(tmp_path):
    results = train_on_a_small_disk(tmp_path, "1200k", then=(
        "ls {disk}/checkpoints > {tmp}/after-full.txt; mount -o remount,size=64m {disk} && {train}; "
        "ls {disk}/model > {tmp}/model.txt"))
    assert len(results) == 2, results
    full = results[0]
    assert full.startswith("RESULT DiskFull: no space left on device") and "free space" in full, full
    kept = [name for name in (tmp_path / "after-full.txt").read_text().split() if name.startswith("checkpoint-")]
    assert kept, "no checkpoint survived the full disk"
    last_kept = max(int(name.split("-")[1]) for name in kept)
    assert f"resumes from step {last_kept}" in full
    assert results[1] == f"RESULT finished, resumed from step {last_kept}"
    assert "model.safetensors" in (tmp_path / "model.txt").read_text()


def test_a_disk_that_fills_before_the_first_checkpoint_is_a_clear_error_too(tmp_path):
    results = train_on_a_small_disk(tmp_path, "100k")
    assert len(results) == 1 and results[0].startswith("RESULT DiskFull: no space left on device"), results
    assert "training starts over" in results[0]


def train_tiny(folder: Path, max_steps: int, **options) -> TokenLossSFTTrainer:
    tokenizer = build_tokenizer()
    rows = [{"prompt": f"{a}*3=", "completion": str(3 * a)[::-1]} for a in range(10, 42)]
    args = SFTConfig(output_dir=str(folder / "checkpoints"), **(trainer_defaults(0) | {
        "max_steps": max_steps, "save_steps": 2, "save_total_limit": 3, "per_device_train_batch_size": 8,
        "logging_steps": 1} | options))
    trainer = TokenLossSFTTrainer(model=build_model(TINY, tokenizer, seed=0), args=args,
                                  train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                  eval_dataset=Dataset.from_list(rows[:8]) if options else None,
                                  token_loss=build_loss("ce"))
    fit(trainer, tokenizer, folder, merge=False)
    return trainer


class CutOff(BaseException):
    """The process lost mid-save, as SIGKILL leaves it: nothing of the stage's own clean-up runs."""


def test_a_checkpoint_cut_off_mid_save_never_has_its_name_and_resume_takes_the_one_before(tmp_path, monkeypatch,
                                                                                         capsys):
    save_rng_state = Trainer._save_rng_state

    def cut_off_at_step_6(self, output_dir):  # after the weights and the optimizer, before the RNG and the state
        if self.state.global_step == 6:
            raise CutOff
        save_rng_state(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", cut_off_at_step_6)
    with pytest.raises(CutOff):
        train_tiny(tmp_path, max_steps=8)
    checkpoints, staged = tmp_path / "checkpoints", tmp_path / "checkpoints" / ".saving" / "checkpoint-6"

    def folders():  # TRL's model card aside
        return sorted(p.name for p in checkpoints.iterdir() if p.is_dir())

    assert folders() == [".saving", "checkpoint-2", "checkpoint-4"]
    assert (staged / "optimizer.pt").is_file()  # the half-written one exists, but not under its name
    monkeypatch.undo()
    trainer = train_tiny(tmp_path, max_steps=8)
    out = capsys.readouterr().out
    assert f"checkpoint {staged} removed: it was cut off while it was saved" in out
    assert "resumed from step 4" in out and trainer.state.global_step == 8
    # named once sealed, and rotated as the Trainer would (save_total_limit 3)
    assert folders() == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    assert all((checkpoints / f"checkpoint-{step}" / CHECKPOINT_SEAL).is_file() for step in (6, 8))


def test_the_best_checkpoint_is_named_where_it_ends_up(tmp_path):
    """The Trainer records the best checkpoint where it wrote it; it must be the renamed folder,
    in the trainer state, in the checkpoint's own copy of it and for load_best_model_at_end, and
    the rotation must keep it beside the last. (The highest eval loss is "best" here, so that the
    best is an early checkpoint, which rotation would otherwise remove.)"""
    trainer = train_tiny(tmp_path, max_steps=8, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                         metric_for_best_model="eval_loss", greater_is_better=True, save_total_limit=2)
    best = Path(trainer.state.best_model_checkpoint)
    assert best.parent == tmp_path / "checkpoints" and best.is_dir() and best.name != "checkpoint-8"
    assert json.loads((best / "trainer_state.json").read_text())["best_model_checkpoint"] == str(best)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert kept == sorted([best.name, "checkpoint-8"])  # the early best is kept as well as the last


@pytest.mark.parametrize("damage", ["truncated weights", "truncated optimizer", "altered weights",
                                    "truncated weights, no seal", "truncated optimizer, no seal"])
def test_a_damaged_newest_checkpoint_is_skipped_and_training_resumes_from_the_one_before(tmp_path, damage, capsys):
    """Sealed checkpoints are checked against their digests; unsealed ones (made before seals
    existed, or cut off before the seal) by their files' own structure, and a whole one is used."""
    train_tiny(tmp_path, max_steps=6)
    newest = tmp_path / "checkpoints" / "checkpoint-6"
    target = newest / ("optimizer.pt" if "optimizer" in damage else "model.safetensors")
    data = target.read_bytes()
    if damage.startswith("truncated"):
        target.write_bytes(data[: len(data) // 2])
    else:  # the same size, one weight's sign flipped
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 0x80]))
    if "no seal" in damage:
        for seal in (tmp_path / "checkpoints").glob(f"*/{CHECKPOINT_SEAL}"):
            seal.unlink()
    trainer = train_tiny(tmp_path, max_steps=8)
    out = capsys.readouterr().out
    problem = "is cut off or damaged" if "no seal" in damage else "is not the file that was saved"
    assert f"checkpoint {newest} removed: its {target.name} {problem}" in out
    assert "resumed from step 4" in out and trainer.state.global_step == 8  # the unsealed, whole step 4
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == list(range(1, 9))


def test_a_checkpoint_cut_off_before_its_state_was_written_is_removed(tmp_path, capsys):
    from pipeline.training.train import last_complete_checkpoint

    train_tiny(tmp_path, max_steps=4)
    (tmp_path / "checkpoints" / "checkpoint-4" / "trainer_state.json").unlink()
    assert last_complete_checkpoint(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "checkpoint-2"
    assert "checkpoint-4 removed: it was cut off while it was saved" in capsys.readouterr().out
    assert not (tmp_path / "checkpoints" / "checkpoint-4").exists()


def test_every_training_process_waits_for_the_checkpoint_decision_with_or_without_the_folder(tmp_path,
                                                                                            monkeypatch):
    """Under `accelerate launch` the first process's Trainer makes the checkpoints folder: a
    process that looked before it did, and skipped the wait, left the first waiting for ever."""
    from accelerate import PartialState

    from pipeline.training import train
    from pipeline.training.train import last_complete_checkpoint

    waits = []  # the function that waited, each time
    monkeypatch.setattr(PartialState, "wait_for_everyone", lambda self: waits.append(sys._getframe(1).f_code.co_name))
    assert last_complete_checkpoint(tmp_path / "not yet made") is None and waits == ["last_complete_checkpoint"]
    waits.clear()
    show_stage_progress = train.show_stage_progress

    def as_another_process_sees_it(trainer):  # at fit's start: the first process has not made the folder yet
        shutil.rmtree(tmp_path / "checkpoints", ignore_errors=True)
        show_stage_progress(trainer)
    monkeypatch.setattr(train, "show_stage_progress", as_another_process_sees_it)
    waited, train_from = [], Trainer.train  # by the time training starts (which has waits of its own)

    def training(self, *args, **kwargs):
        waited.append("last_complete_checkpoint" in waits)
        return train_from(self, *args, **kwargs)
    monkeypatch.setattr(Trainer, "train", training)
    train_tiny(tmp_path, max_steps=2)
    assert waited == [True]


def test_a_bad_row_anywhere_stops_the_run_before_any_stage(tmp_path):
    from flows.pipeline_flow import run_pipeline
    from pipeline.config.schema import parse_config
    from pipeline.data.sources import DataError, write_jsonl

    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n')
    cfg = parse_config({"name": "x", "results_dir": str(tmp_path / "results"),
                        "data": {"sft": {"path": str(tmp_path / "sft.jsonl")},
                                 "target_eval": {"path": str(tmp_path / "test.jsonl")}}})
    with pytest.raises(DataError, match=r"sft\.jsonl:2: malformed JSON"):
        run_pipeline(cfg)
    assert not (tmp_path / "results" / "demo_data").exists()  # nothing ran
