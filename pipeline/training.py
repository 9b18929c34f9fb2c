"""One SFT run: the trainer settings from the YAML, checkpoints, resume, and the saved model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig

from pipeline.config import LoraConfig, LossConfig
from pipeline.losses import build_loss
from pipeline.manifest import atomic_write_text
from pipeline.trainer import TokenLossSFTTrainer


def trainer_defaults(seed: int) -> dict[str, Any]:
    """The pipeline's defaults; every key can be overridden from the YAML's `trainer:`."""
    return {
        "seed": seed,
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": 200,
        "save_total_limit": 2,
        "report_to": "none",
        # TrainingArguments refuses bf16 on a machine without a GPU.
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    }


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    trainer_args: dict[str, Any],
    loss: LossConfig,
    out: Path,
    seed: int,
    ref_model: PreTrainedModel | None = None,
    lora: LoraConfig | None = None,
) -> dict[str, float]:
    """Train, resuming from the last checkpoint under `out/checkpoints` if one exists; save the
    final model and tokenizer to `out/model` and the logged curves and diagnostics to
    `out/log_history.json`. Returns the final training metrics."""
    checkpoints = out / "checkpoints"
    args = SFTConfig(output_dir=str(checkpoints), **{**trainer_defaults(seed), **trainer_args})
    peft_config = None
    if lora is not None:
        from peft import LoraConfig as PeftLoraConfig

        peft_config = PeftLoraConfig(task_type="CAUSAL_LM", **lora.model_dump())
    trainer = TokenLossSFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        token_loss=build_loss(loss.name, **loss.params),
        ref_model=ref_model,
    )
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    result = trainer.train(resume_from_checkpoint=last)
    final = trainer.model
    if lora is not None:
        # Merged, so every later stage (sampling, DPO and its reference) loads plain weights.
        final = final.merge_and_unload()
    final.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    atomic_write_text(out / "log_history.json", json.dumps(trainer.state.log_history, indent=1))
    return {k: float(v) for k, v in result.metrics.items() if isinstance(v, int | float)}
