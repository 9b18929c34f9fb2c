"""Faults injected for real: a loss that turns NaN mid-training stops the stage with a clear
error and leaves the last good checkpoint intact."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import SFTConfig

from pipeline.config import DemoConfig
from pipeline.demo import build_model, build_tokenizer
from pipeline.losses import build_loss
from pipeline.trainer import NonFiniteLoss, TokenLossSFTTrainer
from pipeline.training import fit, trainer_defaults

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


def test_dpo_stops_at_a_nan_loss_too(tmp_path):
    from pipeline.training import train_dpo

    tokenizer = build_tokenizer()
    policy = build_model(TINY, tokenizer, seed=0)
    with torch.no_grad():
        policy.lm_head.weight[5].fill_(float("inf"))
    pairs = Dataset.from_list([{"prompt": "12*3=", "chosen": "63", "rejected": "36"}] * 8)
    args = {"max_steps": 2, "per_device_train_batch_size": 8, "gradient_checkpointing": False, "report_to": "none"}
    with pytest.raises(NonFiniteLoss, match="at step 1"):
        train_dpo(policy, tokenizer, pairs, args, tmp_path, 0, build_model(TINY, tokenizer, seed=0))
    assert not (tmp_path / "model").exists()
