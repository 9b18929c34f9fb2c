"""TRL's SFTTrainer with a forgetting-aware token loss, and TRL's DPOTrainer; both stop at
the first non-finite loss.

The SFT trainer overrides `compute_loss`, the way TRL 1.16 supports custom losses (its
`compute_loss_func` is deprecated and costs an extra forward per step). A frozen reference
model is held only when the loss needs one (EKSFT).
"""

from __future__ import annotations

import warnings

import torch
from transformers import PreTrainedModel, Trainer
from transformers.integrations import MLflowCallback
from trl import DPOTrainer, SFTTrainer

from pipeline.losses import TokenLoss


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

    def on_train_begin(self, *args, **kwargs):
        self._guarded("on_train_begin", *args, **kwargs)

    def on_log(self, *args, **kwargs):
        self._guarded("on_log", *args, **kwargs)

    def on_train_end(self, *args, **kwargs):
        self._guarded("on_train_end", *args, **kwargs)


class FiniteLossDPOTrainer(DPOTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        check_finite(result[0] if return_outputs else result, self)
        return result


class TokenLossSFTTrainer(SFTTrainer):
    def __init__(self, *args, token_loss: TokenLoss, ref_model: PreTrainedModel | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if token_loss.needs_reference and ref_model is None:
            raise ValueError(f"loss '{token_loss.name}' needs a reference model")
        self.token_loss = token_loss
        self.ref_model = None
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        forward_inputs["use_cache"] = False
        outputs = model(**forward_inputs)
        ref_logits = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref_logits = self.ref_model(**forward_inputs).logits
        loss = self.token_loss(outputs.logits, inputs["labels"], num_items_in_batch, ref_logits)
        check_finite(loss, self)
        # Like TRL's own compute_loss: `num_items_in_batch` counts every rank's tokens and DDP
        # averages gradients across ranks, so scale back up by the number of processes.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        for name, value in self.token_loss.diagnostics.items():
            value = torch.as_tensor(value, device=self.accelerator.device, dtype=torch.float32)
            self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value).mean().item())
        return (loss, outputs) if return_outputs else loss
