"""Building blocks of the demo worlds, built locally: a character tokenizer and a small Llama
(`characters`), or a byte-level BPE tokenizer trained on the world's text and a small Qwen3
with ChatML conversations (`chat`).

They are saved in the ordinary HF layout (`save_pretrained`), so TRL, vLLM and
`from_pretrained` load them like any downloaded model.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast, Qwen3Config,
                          Qwen3ForCausalLM)

from pipeline.config.schema import CHAT_TEMPLATES, DemoConfig

PAD, EOS, UNK, USER, ASSISTANT = "<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, EOS, UNK, USER, ASSISTANT]
CHARACTERS = string.digits + string.ascii_lowercase + string.ascii_uppercase + " +-*/=().,:;?!#$%'\"\n"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}" + EOS + ""
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)
MAX_LENGTH = 128
# The chat world: ChatML's special tokens, and the system prompt every conversation starts with.
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SYSTEM_PROMPT = "Work the task out, then give the answer after ####."
BPE_VOCABULARY = 512


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; unknown characters map to <unk>."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
    core.decoder = decoders.Fuse()  # join characters without the spaces WordLevel would add
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT],
        model_max_length=MAX_LENGTH,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_bpe_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (as GPT-2's, Llama 3's and Qwen's are) trained on `texts`, with
    ChatML's special tokens and chat template."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=BPE_VOCABULARY, special_tokens=[END_OF_TEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=IM_END, pad_token=END_OF_TEXT,
                                        model_max_length=MAX_LENGTH)
    tokenizer.chat_template = (CHAT_TEMPLATES / "chatml.jinja").read_text()
    return tokenizer


def chat_prompt(example: dict[str, str]) -> list[dict]:
    """A task as the chat world poses it: the system prompt, then the task."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": example["prompt"]}]


def worked_answer(example: dict[str, str]) -> str:
    """The chat world's reference completion: the answer worked out, ended GSM8K-style."""
    return f"{example['prompt'].rstrip('=')} gives {example['completion']}.\n#### {example['completion']}"


def build_model(cfg: DemoConfig, tokenizer: PreTrainedTokenizerFast, seed: int) -> PreTrainedModel:
    import torch

    torch.manual_seed(seed)
    if cfg.world == "chat":
        return Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
            head_dim=cfg.hidden_size // cfg.num_heads, max_position_embeddings=MAX_LENGTH,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
            tie_word_embeddings=True))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def save_tokenizer(path: Path) -> None:
    build_tokenizer().save_pretrained(path)
