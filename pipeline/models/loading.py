"""Loading the model and tokenizer as the config says (`model:`): trust_remote_code, the dtype
and attention kernel of the training stages, and the chat template chat data is rendered with,
in training (TRL renders it) and in sampling (rendered here, before any backend sees it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config.schema import ConfigError, LoraConfig, ModelConfig, PipelineConfig

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from pipeline.sampling.sampler import Prompt


def load_tokenizer(model_dir: str | Path, model: ModelConfig, **kwargs) -> PreTrainedTokenizerBase:
    """`model.tokenizer`, else the model folder's own, with the configured chat template. A
    training stage saves it with the model, so later stages find the template there too."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.tokenizer or model_dir, trust_remote_code=model.trust_remote_code,
                                              **kwargs)
    if (template := model.template()) is not None:
        tokenizer.chat_template = template
    return tokenizer


def load_causal_lm(model_dir: str | Path, model: ModelConfig, lora: LoraConfig | None = None) -> PreTrainedModel:
    """The model as `model:` says; with QLoRA (`lora.load_in_4bit`), its weights in 4 bits."""
    from transformers import AutoModelForCausalLM

    options = {"dtype": model.dtype, "trust_remote_code": model.trust_remote_code}
    if model.attn_implementation:
        options["attn_implementation"] = model.attn_implementation
    if lora is not None and lora.load_in_4bit:
        import torch
        from transformers import BitsAndBytesConfig

        from accelerate import PartialState

        compute = torch.bfloat16 if model.dtype == "auto" else getattr(torch, model.dtype)
        # each process's 4-bit weights on its own GPU (bitsandbytes would put them all on the current one)
        options |= {"device_map": {"": PartialState().local_process_index}, "dtype": compute,
                    "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=lora.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=lora.use_bnb_nested_quant, bnb_4bit_compute_dtype=compute)}
    return AutoModelForCausalLM.from_pretrained(model_dir, **options)


def check_quantization(cfg: PipelineConfig) -> None:
    """QLoRA needs bitsandbytes and a CUDA GPU: said before any stage, naming the key."""
    for stage in ("sft", "dpo"):
        lora = getattr(cfg, stage).lora
        if lora is None or not lora.load_in_4bit:
            continue
        import importlib.util

        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{stage}.lora.load_in_4bit: 4-bit QLoRA (bitsandbytes) needs a CUDA GPU, and this "
                              "machine has none: use LoRA without load_in_4bit here")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"{stage}.lora.load_in_4bit: QLoRA needs bitsandbytes: pip install bitsandbytes")


def with_chat_template_kwargs(dataset: Dataset, model: ModelConfig) -> Dataset:
    """The rows with TRL's `chat_template_kwargs` column, which its trainers pass to the template."""
    if not model.chat_template_kwargs:
        return dataset
    return dataset.map(lambda _: {"chat_template_kwargs": model.chat_template_kwargs})


def rendered_prompts(prompts: list[Prompt], model_dir: str | Path, model: ModelConfig) -> list[Prompt]:
    """Chat prompts rendered with the configured template and its variables, as TRL renders them
    in training; strings, and chats under the tokenizer's own template without variables, are
    left to the sampling backend."""
    chats = any(not isinstance(p, str) for p in prompts)
    if not chats or (model.chat_template is None and not model.chat_template_kwargs):
        return prompts
    from pipeline.sampling.sampler import format_prompt

    tokenizer = load_tokenizer(model_dir, model)
    return [format_prompt(p, tokenizer, model.chat_template_kwargs) for p in prompts]
