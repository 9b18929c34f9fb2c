"""How unsure a model is of the reference answers: its predictive entropy (nats, over the whole
vocabulary) at each answer token, the answer teacher-forced after the prompt; whether it is
confidently wrong there (its most likely token is another, at probability >= CONFIDENT: the
"confident conflicts" a forgetting-aware loss acts on); and the histogram of those entropies
that the evaluate stage writes (`entropy.json`).

The prompt is formatted and tokenized as for sampling (`format_prompt`, no added special
tokens), so the context is the one the model answers in. The bins are fixed, from 0 to
log(vocabulary size), so that the histograms of two models with one vocabulary (the base
model and its fine-tunes) compare bin by bin.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl.data_utils import common_prefix_length

from pipeline.losses.chunked import CHUNK_LOGITS
from pipeline.losses.stats import IGNORE_INDEX, entropy, select_tokens
from pipeline.sampling.sampler import Prompt, format_prompt, load_hf

BINS = 40
# Padded tokens per forward pass: their logits at vocabulary 151,936 are 2.5 GB in bf16. Short rows
# go many to a pass (the demo's 500 answers in two), which a fixed number of rows would not.
BATCH_TOKENS = 8192
CONFIDENT = 0.5  # at or above it, the model's top token is its answer: a wrong one is a confident conflict


def answer_ids(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, answer: str) -> tuple[list[int], int]:
    """The token ids of the formatted prompt followed by the answer, and where the answer starts:
    as in TRL's SFT, where the ids of the prompt and of prompt + answer first differ (a token can
    merge across the boundary)."""
    text = format_prompt(prompt, tokenizer)
    prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
    ids = tokenizer(text + answer, add_special_tokens=False).input_ids
    return ids, common_prefix_length(prompt_ids, ids)


def collate(encoded: list[tuple[list[int], int]]) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded input ids, their attention mask, and labels that are the answer tokens and
    IGNORE_INDEX elsewhere. (Padding after the tokens, so the positions are those of each row
    alone; which id pads does not matter, the causal mask hides it.)"""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.zeros(len(encoded), width, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (ids, start) in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention[row, :len(ids)] = 1
        labels[row, start:len(ids)] = input_ids[row, start:len(ids)]
    return input_ids, attention, labels


def batches(lengths: list[int], budget: int) -> list[range]:
    """Consecutive rows, as many to a batch as fit `budget` tokens padded to the batch's longest
    (a row longer than that alone)."""
    spans, start, width = [], 0, 0
    for end, length in enumerate(lengths):
        width = max(width, length)
        if end > start and width * (end - start + 1) > budget:
            spans.append(range(start, end))
            start, width = end, length
    return [*spans, range(start, len(lengths))] if lengths else spans


def answer_token_stats(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                       rows: list[dict]) -> tuple[Tensor, Tensor]:
    """At each answer token of the prompt/answer `rows`, in order, on the CPU: the model's entropy
    (float32), and whether it is confidently wrong (bool)."""
    encoded = [answer_ids(tokenizer, row["prompt"], row["answer"]) for row in rows]
    chunk = max(1, CHUNK_LOGITS // model.config.get_text_config().vocab_size)
    entropies, wrong = [], []
    with torch.no_grad():
        for batch in batches([len(ids) for ids, _ in encoded], BATCH_TOKENS):
            input_ids, attention, labels = (t.to(model.device) for t in collate([encoded[i] for i in batch]))
            logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
            z, y, _ = select_tokens(logits, labels)
            for part, target in zip(z.split(chunk), y.split(chunk)):  # float32 like the training losses
                logp = F.log_softmax(part.float(), dim=-1)
                top = logp.max(-1)
                entropies.append(entropy(logp).cpu())
                wrong.append(((top.indices != target) & (top.values >= math.log(CONFIDENT))).cpu())
    return torch.cat(entropies), torch.cat(wrong)


def histogram(values: Tensor, wrong: Tensor, edges: np.ndarray) -> dict:
    """Counts per bin, the number of tokens, their mean entropy and the share of them the model is
    confidently wrong at (NaN without tokens)."""
    # Rounding can put a near-uniform distribution's entropy a hair above log(vocabulary size).
    counts, _ = np.histogram(values.numpy().clip(0, edges[-1]), edges)
    return {"counts": counts.tolist(), "tokens": len(values), "mean": values.mean().item(),
            "confident_wrong": wrong.float().mean().item()}


def answer_entropy_histograms(model_dir: Path, tokenizer_dir: str | None, suites: dict[str, list[dict]],
                              trust_remote_code: bool = False) -> dict:
    """`entropy.json`: the bin edges, and per suite (name -> prompt/answer rows) its histogram."""
    model, tokenizer = load_hf(model_dir, tokenizer_dir, trust_remote_code)
    edges = np.linspace(0, math.log(model.config.get_text_config().vocab_size), BINS + 1)
    return {"edges": edges.tolist(), "suites": {suite: histogram(*answer_token_stats(model, tokenizer, rows), edges)
                                                for suite, rows in suites.items()}}
