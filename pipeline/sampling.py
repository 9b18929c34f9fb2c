"""Drawing n completions per prompt, with vLLM or transformers `generate`; both backends
return the same thing: one list of n completion strings per prompt."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from pipeline.config import SamplingConfig


def format_prompt(prompt: str | list[dict], tokenizer: PreTrainedTokenizerBase) -> str:
    """A chat (list of messages) goes through the tokenizer's chat template; a string is used as is."""
    if isinstance(prompt, str):
        return prompt
    if tokenizer.chat_template is None:
        raise ValueError(f"the prompt is a chat but the tokenizer {tokenizer.name_or_path} has no chat template")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def sample_hf(model_dir: Path, prompts: list[str | list[dict]], settings: SamplingConfig,
              tokenizer_dir: Path | None = None, batch_size: int = 64) -> list[list[str]]:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    sampling = settings.temperature > 0
    torch.manual_seed(settings.seed)
    results = []
    for start in range(0, len(prompts), batch_size):
        texts = [format_prompt(p, tokenizer) for p in prompts[start:start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            generated = model.generate(
                **batch,
                do_sample=sampling,
                temperature=settings.temperature if sampling else None,
                top_p=settings.top_p if sampling else None,
                max_new_tokens=settings.max_tokens,
                num_return_sequences=settings.n,
                pad_token_id=tokenizer.pad_token_id,
            )
        decoded = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        results += [decoded[i:i + settings.n] for i in range(0, len(decoded), settings.n)]
    return results
