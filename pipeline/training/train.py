"""One SFT or DPO run: the trainer settings from the YAML, checkpoints, resume, and the saved model."""

from __future__ import annotations

import errno
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from accelerate import PartialState
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import DPOConfig, SFTConfig, SFTTrainer

from pipeline.config.schema import LoraConfig, LossConfig
from pipeline.data.sources import DataError
from pipeline.losses.token_loss import build_loss
from pipeline.reporting.plots import loss_curve
from pipeline.results.manifest import atomic_write_text, digest
from pipeline.sampling.sampler import check_vocabulary
from pipeline.training.reference import ReferenceTopK, write_reference_topk
from pipeline.training.trainer import (CHECKPOINT_SEAL, CHECKPOINT_STAGING, FiniteLossDPOTrainer, StageMLflowCallback,
                                       TokenLossSFTTrainer, chunked_lm_head_applies, last_hidden_states,
                                       show_stage_progress)


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
        # The stage logs into its MLflow run through `stage_callbacks`, not the Trainer's own callback.
        "report_to": "none",
        # Pinned memory only helps copies to a GPU; without one torch warns at every epoch.
        "dataloader_pin_memory": torch.cuda.is_available(),
        # TrainingArguments refuses bf16 on a machine without a GPU.
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        # Processes that `accelerate launch` started on a machine without GPUs train together
        # (over gloo) only when the Trainer is told it runs on the CPU; else each trains alone.
        "use_cpu": not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", 1)) > 1,
    }


def stage_callbacks(trainer_args: dict[str, Any]) -> list[TrainerCallback]:
    """Logging into the stage's MLflow run when the pipeline gave it one (and the config does not
    ask for the Trainer's own MLflow callback with `report_to: mlflow`)."""
    asked = trainer_args.get("report_to") or []
    if os.environ.get("MLFLOW_RUN_ID") and "mlflow" not in ([asked] if isinstance(asked, str) else asked):
        return [StageMLflowCallback()]
    return []


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-"))


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why training cannot resume from a checkpoint, or None. A checkpoint takes its name only
    once whole and sealed (`AtomicCheckpoints`), so with a seal each file must still be what was
    saved. One written in place (by an earlier version, or by a plain Trainer) has the Trainer's
    `trainer_state.json`, written after everything else, and must at least hold whole files."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "it was cut off while it was saved"
    try:
        seal = json.loads((checkpoint / CHECKPOINT_SEAL).read_text())
    except FileNotFoundError:
        return next(filter(None, (file_problem(f) for f in sorted(checkpoint.rglob("*")) if f.is_file())), None)
    except (OSError, ValueError):
        return f"its {CHECKPOINT_SEAL} is damaged"
    for name, saved in seal.items():
        if not (checkpoint / name).is_file() or digest(checkpoint / name) != saved:
            return f"its {name} is not the file that was saved"
    return None


def file_problem(path: Path) -> str | None:
    """Whether a checkpoint's file is whole, from its own structure (no digest to compare with):
    a safetensors file as long as its header says, a torch.save archive (a zip) with its
    directory at the end, JSON that parses. Cut-off files fail; altered bytes need the seal."""
    try:
        if path.suffix == ".safetensors":
            with path.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if size > path.stat().st_size - 8:  # a length that cannot be (cut off, or not a length)
                    raise ValueError(f"header of {size} bytes")
                header = json.loads(f.read(size))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            whole = path.stat().st_size == 8 + size + end
        elif path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path) as archive:  # reads the directory at the file's end
                whole = all(i.header_offset + i.compress_size <= path.stat().st_size for i in archive.infolist())
        elif path.suffix == ".json":
            json.loads(path.read_text())
            whole = True
        else:
            return None
    except Exception:  # noqa: BLE001 - whatever a damaged file makes the parsers raise, it is damaged
        whole = False
    return None if whole else f"its {path.name} is cut off or damaged"


def drop_damaged_checkpoints(folder: Path) -> Path | None:
    """Remove the newest checkpoints that are cut off or damaged, saying why, so that neither
    resume nor the Trainer's checkpoint rotation trusts them; the newest whole one."""
    if (staging := folder / CHECKPOINT_STAGING).exists():
        print(f"checkpoint {next(staging.iterdir(), staging)} removed: it was cut off while it was saved", flush=True)
        shutil.rmtree(staging)
    for checkpoint in sorted(folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*"), key=checkpoint_step, reverse=True):
        if (problem := checkpoint_problem(checkpoint)) is None:
            return checkpoint
        print(f"checkpoint {checkpoint} removed: {problem}", flush=True)
        shutil.rmtree(checkpoint)
    return None


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint training can resume from (None without any, or without the folder):
    a damaged newest one costs one checkpoint interval. The first process decides; the others
    wait for it and take what it left. Every process calls it, whatever it sees on disk: it waits
    for the others."""
    state = PartialState()
    if state.is_main_process:
        drop_damaged_checkpoints(folder)
    state.wait_for_everyone()
    return max(folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*"), key=checkpoint_step, default=None)


class DiskFull(OSError):
    """The disk filled up while training wrote a checkpoint or the model."""


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def weights_size(model: PreTrainedModel) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# How torch.save reports a full disk: RuntimeErrors without an errno.
TORCH_WRITE_FAILURES = ("PytorchStreamWriter", "inline_container", "unexpected pos", "file write failed")


def is_disk_full(error: BaseException, folder: Path, needed: int) -> bool:
    """ENOSPC anywhere in the chain (as an errno or in the message), or torch's writer failing
    with less room left than a checkpoint takes (`needed`)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if os.strerror(errno.ENOSPC) in str(error):  # safetensors says it in words only
            return True
        if isinstance(error, RuntimeError) and any(s in str(error) for s in TORCH_WRITE_FAILURES):
            return shutil.disk_usage(folder).free < needed
        error = error.__cause__ or error.__context__
    return False


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
    reference_topk: ReferenceTopK | None = None,
    chunked: bool = True,
) -> dict[str, float]:
    """SFT with a token loss, its reference (EKSFT) the model `ref_model` or its cached top K;
    `chunked`: the loss from the hidden states where the model allows. See `fit` for what it
    writes to `out`."""
    check_vocabulary(model.config, tokenizer)
    trainer = TokenLossSFTTrainer(
        model=model,
        args=trainer_config(SFTConfig, out, trainer_args, seed),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config(lora),
        token_loss=build_loss(loss.name, **loss.params),
        ref_model=ref_model,
        reference_topk=reference_topk,
        chunked=chunked,
        callbacks=stage_callbacks(trainer_args),
    )
    dropped = len(dataset) - len(trainer.train_dataset)
    if dropped > 0 and not trainer.args.packing:
        raise DataError(
            f"{dropped} of {len(dataset)} SFT rows have a prompt that fills max_length = {trainer.args.max_length} "
            "tokens, leaving no completion token to learn from (TRL would drop them silently): raise "
            "sft.trainer.max_length, or shorten those prompts"
        )
    return fit(trainer, tokenizer, out, merge=lora is not None)


def trainer_config(config_cls: type[SFTConfig | DPOConfig], out: Path, trainer_args: dict[str, Any], seed: int):
    """TRL's SFTConfig or DPOConfig: the pipeline's defaults, overridden by the YAML's `trainer:`."""
    return config_cls(output_dir=str(out / "checkpoints"), **{**trainer_defaults(seed), **trainer_args})


def cache_reference_topk(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    trainer_args: dict[str, Any],
    seed: int,
    k: int,
    folder: Path,
) -> dict[str, float]:
    """`model`'s top-K log-probs at every loss token of `dataset`, tokenized and collated by
    TRL exactly as `train_sft` will, written to `folder` (see pipeline.training.reference)."""
    check_vocabulary(model.config, tokenizer)
    if not chunked_lm_head_applies(model):
        raise ValueError(f"sft.reference: cached needs a model whose LM head is a plain nn.Linear applied to the last "
                         f"hidden states without logit scaling or soft-capping; {type(model).__name__} is not: use "
                         "sft.reference: model")
    if k >= model.config.get_text_config().vocab_size:
        raise ValueError(f"sft.reference_topk = {k} must be below the vocabulary size "
                         f"{model.config.get_text_config().vocab_size}")
    trainer = SFTTrainer(model=model, args=trainer_config(SFTConfig, folder.parent, trainer_args, seed),
                         train_dataset=dataset, processing_class=tokenizer)
    model = trainer.model.eval()
    # In order, without the dataset columns the model does not take, on the model's device.
    batches = trainer.get_eval_dataloader(trainer.train_dataset)
    return write_reference_topk(
        lambda batch: last_hidden_states(model, {name: v for name, v in batch.items() if name != "labels"} | {"use_cache": False}),
        model.get_output_embeddings(), batches, folder, k)


def train_dpo(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    trainer_args: dict[str, Any],
    out: Path,
    seed: int,
    ref_model: PreTrainedModel | None = None,
    lora: LoraConfig | None = None,
) -> dict[str, float]:
    """DPO from `model` on prompt/chosen/rejected rows. The reference is `ref_model`; without
    one, TRL uses `model` itself as it was before training (the policy with its LoRA adapter
    disabled, or the untrained policy for `precompute_ref_log_probs`), so pass the weights to
    start from, never a PeftModel whose disabled adapter would leave some other base."""
    check_vocabulary(model.config, tokenizer)
    trainer = FiniteLossDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=trainer_config(DPOConfig, out, trainer_args, seed),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config(lora),
        callbacks=stage_callbacks(trainer_args),
    )
    return fit(trainer, tokenizer, out, merge=lora is not None)


def peft_config(lora: LoraConfig | None):
    if lora is None:
        return None
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(task_type="CAUSAL_LM", **lora.peft_options())


def merged(model: PreTrainedModel) -> PreTrainedModel:
    """A LoRA model merged into whole weights. A 4-bit (QLoRA) base is loaded again, unquantized
    in its compute dtype, for the merge: merged into 4-bit weights the update would be rounded
    away, and later stages would load a 4-bit model."""
    if not getattr(model, "is_loaded_in_4bit", False):
        return model.merge_and_unload()
    import tempfile

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_path = model.peft_config["default"].base_model_name_or_path
    compute = model.config.quantization_config.bnb_4bit_compute_dtype
    with tempfile.TemporaryDirectory() as adapter:
        model.save_pretrained(adapter)
        # with its own code where the trained model had it (which took model.trust_remote_code)
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=compute,
                                                    trust_remote_code=bool(getattr(model.config, "auto_map", None)))
        return PeftModel.from_pretrained(base, adapter).merge_and_unload()


def fit(trainer: Trainer, tokenizer: PreTrainedTokenizerBase, out: Path, merge: bool) -> dict[str, float]:
    """Train, resuming from the last complete checkpoint under `out/checkpoints` if one exists;
    save the final model and tokenizer to `out/model`, the logged curves to
    `out/log_history.json` and their plot to `out/loss_curve.png`. Returns the final metrics:
    the trainer's summary and the last logged value of each curve. Under `accelerate launch`
    every process trains and only the first writes."""
    show_stage_progress(trainer)
    checkpoints = out / "checkpoints"
    # Each process, folder or not: a process that skipped the wait because the folder was not
    # there yet (the first one's Trainer makes it) left the others waiting for ever.
    last = last_complete_checkpoint(checkpoints)
    if last is not None and trainer.is_world_process_zero():
        print(f"resumed from step {checkpoint_step(last)} ({last})", flush=True)
    try:
        # Resuming restores the optimizer, scheduler and RNG state along with the weights.
        result = trainer.train(resume_from_checkpoint=str(last) if last else None)
        if not merge:
            # The Trainer's save gathers FSDP / ZeRO-3 shards, and writes from the main process only.
            trainer.save_model(str(out / "model"))
            # Its pickled TrainingArguments hold this folder's absolute path: the model's digest, which
            # later stages' keys digest, would depend on where the results live. The log keeps them.
            (out / "model" / "training_args.bin").unlink(missing_ok=True)
        elif trainer.is_world_process_zero():
            # Merged, so every later stage (sampling, DPO and its reference) loads plain weights.
            merged(trainer.model).save_pretrained(out / "model")
            tokenizer.save_pretrained(out / "model")
    except Exception as error:
        if not trainer.is_world_process_zero():  # the first process judges the checkpoints and the disk
            raise
        newest = drop_damaged_checkpoints(checkpoints) if checkpoints.is_dir() else None  # drops a cut-off one
        # Before the first checkpoint, the weights alone tell how much room one needs.
        if not is_disk_full(error, out, folder_size(newest) if newest else weights_size(trainer.model)):
            raise
        resume = f"resumes from step {checkpoint_step(newest)} ({newest})" if newest else "starts over"
        raise DiskFull(f"no space left on device in {out} at step {trainer.state.global_step} "
                       f"({shutil.disk_usage(out).free} bytes free): free space and run again; training {resume}") from error
    history = trainer.state.log_history
    if trainer.is_world_process_zero():
        atomic_write_text(out / "log_history.json", json.dumps(history, indent=1))
        loss_curve(out / "log_history.json", out / "loss_curve.png")
    curves = {f"final/{k}": float(v) for h in history if "loss" in h for k, v in h.items()
              if isinstance(v, int | float) and k not in ("step", "epoch")}
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, int | float)}
    return metrics | curves | {"resumed_from_step": float(checkpoint_step(last)) if last else 0.0}
