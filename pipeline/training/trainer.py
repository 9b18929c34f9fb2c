"""TRL's SFTTrainer with a forgetting-aware token loss, and TRL's DPOTrainer; both stop at
the first non-finite loss.

The SFT trainer overrides `compute_loss`, the way TRL 1.16 supports custom losses (its
`compute_loss_func` is deprecated and costs an extra forward per step). A frozen reference
model is held only when the loss needs one (EKSFT) and its top-K log-probs were not cached.
By default the loss comes from the decoder's hidden states, projected to the vocabulary a
chunk of tokens at a time (`TokenLoss.chunked`), never from the full logits, unless a batch's
full logits fit in one chunk.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import PreTrainedModel, ProgressCallback, Trainer
from transformers.integrations import MLflowCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import DPOTrainer, SFTTrainer

from pipeline.losses.chunked import tokens_per_chunk
from pipeline.losses.token_loss import TokenLoss
from pipeline.results.manifest import atomic_write_text, digest
from pipeline.runtime.progress import stage_bar
from pipeline.training.reference import ReferenceTopK


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or inf: training stops before the weights are saved."""


def check_finite(loss: torch.Tensor, trainer: Trainer) -> None:
    # Checked every step: the Trainer's `logging_nan_inf_filter` (on by default) hides a NaN
    # loss from the logs, and the next checkpoint would save the broken weights.
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteLoss(
            f"the loss is {loss.detach().float().item()} at step {trainer.state.global_step + 1}: training stopped, "
            f"the checkpoints saved so far in {trainer.args.output_dir} are kept. Lower the learning rate, "
            "check the data, or train in float32"
        )


class StageMLflowCallback(MLflowCallback):
    """transformers' MLflow logging into the stage's run (MLFLOW_RUN_ID), except that a tracking
    store that stops answering does not stop training: the first failure is reported and logging
    stops for the rest of the stage. The curves stay in log_history.json, and the pipeline logs
    the stage's result once the store answers again."""

    lost: Exception | None = None

    def _guarded(self, event: str, *args, **kwargs) -> None:
        if self.lost is not None:
            return
        try:
            getattr(super(), event)(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any failure of the store, which must not stop training
            self.lost = error
            warnings.warn(f"MLflow stopped answering ({type(error).__name__}: {error}); training goes on without "
                          "logging to it, and its curves are kept in log_history.json", stacklevel=2)

    def on_train_begin(self, args, state, control, **kwargs):
        self._guarded("on_train_begin", args, state, control, **kwargs)
        # Resumed: the steps before the checkpoint were logged to the run that was cut off. Logged
        # again here, at their own steps, so that this stage's run holds the whole curve.
        for logs in state.log_history if state.global_step else []:
            logged = dataclasses.replace(state, global_step=logs["step"])
            self._guarded("on_log", args, logged, control, logs={k: v for k, v in logs.items() if k != "step"})

    def on_log(self, *args, **kwargs):
        self._guarded("on_log", *args, **kwargs)

    def on_train_end(self, *args, **kwargs):
        self._guarded("on_train_end", *args, **kwargs)


class StageProgress(ProgressCallback):
    """The Trainer's progress bar (steps, rate, time left), named after the stage and showing
    the latest loss, in place of a printed dict per logging step: every logged value is in
    MLflow and log_history.json already."""

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run starts at its checkpoint's step, so the rate and time left count only new steps.
        if state.is_world_process_zero:
            self.training_bar = stage_bar(total=state.max_steps, initial=state.global_step, unit="step")
        self.current_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and "loss" in (logs or {}):
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4g}")


def show_stage_progress(trainer: Trainer) -> None:
    """Swap the Trainer's progress bar for StageProgress (none if the config set disable_tqdm)."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(StageProgress())


CHECKPOINT_SEAL = "posttrain-seal.json"  # a checkpoint's file digests, written after its files
CHECKPOINT_STAGING = ".saving"  # where a checkpoint is written before it takes its name


def seal_checkpoint(folder: Path) -> None:
    """Write the digests of a checkpoint's files into it, so that resume can tell a checkpoint
    damaged since it was saved."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKPOINT_SEAL)
    atomic_write_text(folder / CHECKPOINT_SEAL, json.dumps({str(p.relative_to(folder)): digest(p) for p in files},
                                                           indent=1))


class AtomicCheckpoints(Trainer):
    """Checkpoints that appear whole or not at all. transformers writes `checkpoint-N` in place, so
    a crash mid-save would leave a half-written folder under the name resume looks for; here the
    Trainer writes it under `<output_dir>/.saving/`, it is sealed there, and one rename names it.
    Mixed in before TRL's trainer class."""

    _staging = False

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return str(Path(run_dir) / CHECKPOINT_STAGING) if self._staging else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = run_dir / CHECKPOINT_STAGING / name, run_dir / name
        if self.args.should_save:
            shutil.rmtree(staged.parent, ignore_errors=True)  # what a cut-off save left
        PartialState().wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        PartialState().wait_for_everyone()  # every process has written its part (RNG state, shards)
        renamed = self.state.best_model_checkpoint == str(staged)  # the Trainer named the best one where it was written
        if renamed:  # on every process: each loads the best one at the end
            self.state.best_model_checkpoint = str(final)
        if not self.args.should_save:
            return
        if renamed:
            self.state.save_to_json(str(staged / TRAINER_STATE_NAME))
        seal_checkpoint(staged)
        if final.exists():  # the same step saved by a run that was cut off later
            shutil.rmtree(final)
        staged.rename(final)
        staged.parent.rmdir()
        # The Trainer rotated the staging folder; the named checkpoints are rotated here, as it would.
        rotate_checkpoints(str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)


class FiniteLossDPOTrainer(AtomicCheckpoints, DPOTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        check_finite(result[0] if return_outputs else result, self)
        return result


def unwrap(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside DDP / DataParallel and PEFT wrappers (LoRA layers stay in place)."""
    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# Config attributes of models that scale or soft-cap their logits after the LM head; the
# chunked loss projects with the bare head, so those models take the full-logits path.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")


def chunked_lm_head_applies(model: PreTrainedModel) -> bool:
    """The loss can come from the decoder's hidden states and the LM head chunk by chunk: the head
    is a plain nn.Linear, nothing transforms its logits, and the forward takes `logits_to_keep`."""
    base = unwrap(model)
    config = base.config.get_text_config()
    return (
        type(base.get_output_embeddings()) is nn.Linear
        and all(getattr(config, name, None) in (None, 1.0) for name in LOGIT_TRANSFORMS)
        and "logits_to_keep" in inspect.signature(base.forward).parameters
    )


def last_hidden_states(model: PreTrainedModel, inputs: dict[str, Any]) -> torch.Tensor:
    """The decoder's last hidden states [B, T, H]. The model is called as a whole (so DDP and
    PEFT see their forward) but applies its LM head to no position (`logits_to_keep` is an empty
    index), so no logits are made; a hook on the decoder catches its output."""
    captured = []
    hook = unwrap(model).get_decoder().register_forward_hook(lambda module, args, out: captured.append(out[0]))
    try:
        model(**inputs, logits_to_keep=torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device))
    finally:
        hook.remove()
    return captured[-1]


def logits_exceed_a_chunk(model: nn.Module, labels: torch.Tensor) -> bool:
    """Whether this batch's full logits are more than one chunk of the chunked path. If not, the
    chunked path holds as much memory and is slower: on the demo model (vocabulary 87) on a CPU,
    1.07x to 1.28x the full logits' step in two runs of `bench/sft_step.py` at its shape."""
    return labels.numel() > tokens_per_chunk(unwrap(model).get_output_embeddings().weight.shape[0], labels.device)


class TokenLossSFTTrainer(AtomicCheckpoints, SFTTrainer):
    def __init__(self, *args, token_loss: TokenLoss, ref_model: PreTrainedModel | None = None,
                 reference_topk: ReferenceTopK | None = None, chunked: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if token_loss.needs_reference and ref_model is None and reference_topk is None:
            raise ValueError(f"loss '{token_loss.name}' needs a reference model or its cached top-K log-probs")
        self.token_loss = token_loss
        self.reference_topk = reference_topk if token_loss.needs_reference else None
        self.ref_model = None
        if ref_model is not None and self.reference_topk is None:
            ref_model.eval().requires_grad_(False)
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        # The chunked path reads the LM head's weight outside the model's forward: FSDP and ZeRO-3
        # shard it there, and DataParallel replicas would share the hidden-states hook.
        sharded = self.is_fsdp_enabled or (self.is_deepspeed_enabled and
                                           self.accelerator.state.deepspeed_plugin.zero_stage == 3)
        self.chunked = (chunked and not sharded and self.args.n_gpu <= 1 and chunked_lm_head_applies(self.model)
                        and (self.ref_model is None or chunked_lm_head_applies(self.ref_model)))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        labels = inputs["labels"]
        forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        forward_inputs["use_cache"] = False
        ref_topk = self.reference_topk.lookup(inputs) if self.reference_topk is not None else None
        outputs = None
        # Evaluation asks for the logits: it takes the full path.
        if self.chunked and not return_outputs and logits_exceed_a_chunk(model, labels):
            ref_hidden = ref_head = None
            if self.ref_model is not None:
                with torch.no_grad():
                    ref_hidden = last_hidden_states(self.ref_model, forward_inputs)
                ref_head = unwrap(self.ref_model).get_output_embeddings()
            hidden = last_hidden_states(model, forward_inputs)
            loss = self.token_loss.chunked(hidden, unwrap(model).get_output_embeddings(), labels, num_items_in_batch,
                                           ref_hidden, ref_head, ref_topk)
        else:
            outputs = model(**forward_inputs)
            ref_logits = None
            if self.ref_model is not None:
                with torch.no_grad():
                    ref_logits = self.ref_model(**forward_inputs).logits
            loss = self.token_loss(outputs.logits, labels, num_items_in_batch, ref_logits, ref_topk)
        check_finite(loss, self)
        # Like TRL's own compute_loss: `num_items_in_batch` counts every rank's tokens and DDP
        # averages gradients across ranks, so scale back up by the number of processes.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        for name, value in self.token_loss.diagnostics.items():
            value = torch.as_tensor(value, device=self.accelerator.device, dtype=torch.float32)
            self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value).mean().item())
        return (loss, outputs) if return_outputs else loss
