"""One SFT run: the trainer settings from the YAML, checkpoints, resume, and the saved model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl import SFTConfig

from pipeline.config import LoraConfig, LossConfig
from pipeline.losses import build_loss
from pipeline.manifest import atomic_write_text
from pipeline.plots import loss_curve
from pipeline.trainer import TokenLossSFTTrainer


# What `train_sft` writes in a stage's folder: name -> path, as a manifest lists its outputs.
TRAINING_OUTPUTS = {"model": "model", "log_history": "log_history.json", "loss_curve": "loss_curve.png"}


def trainer_defaults(seed: int) -> dict[str, Any]:
    """The pipeline's defaults; every key can be overridden from the YAML's `trainer:`."""
    return {
        "seed": seed,
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": 200,
        "save_total_limit": 2,
        # The trainer logs into the stage's MLflow run when the pipeline gave it one.
        "report_to": "mlflow" if os.environ.get("MLFLOW_RUN_ID") else "none",
        # TrainingArguments refuses bf16 on a machine without a GPU.
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    }


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint the Trainer finished writing. It writes `trainer_state.json` after
    the weights, optimizer, scheduler and RNG state, so a checkpoint without a readable one was
    cut off mid-save: it is removed, so neither resume nor checkpoint rotation trusts it."""
    complete = None
    for checkpoint in sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
            complete = checkpoint
        except (OSError, ValueError):
            shutil.rmtree(checkpoint)
    return complete


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
    final model and tokenizer to `out/model`, the logged curves and diagnostics to
    `out/log_history.json` and their plot to `out/loss_curve.png`. Returns the final metrics."""
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
    last = last_complete_checkpoint(checkpoints) if checkpoints.is_dir() else None
    # Resuming restores the optimizer, scheduler and RNG state along with the weights.
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    final = trainer.model
    if lora is not None:
        # Merged, so every later stage (sampling, DPO and its reference) loads plain weights.
        final = final.merge_and_unload()
    final.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    atomic_write_text(out / "log_history.json", json.dumps(trainer.state.log_history, indent=1))
    loss_curve(out / "log_history.json", out / "loss_curve.png")
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, int | float)}
    return metrics | {"resumed_from_step": float(last.name.split("-")[-1]) if last else 0.0}
