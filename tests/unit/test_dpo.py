"""DPO from an SFT model: the reference is the SFT model in every mode, and a few steps move
the chosen/rejected margin the right way (in process, on a tiny model)."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config.schema import DemoConfig, LoraConfig
from pipeline.demo.world import build_model, build_tokenizer
from pipeline.training.train import train_dpo

TINY = DemoConfig(hidden_size=64, num_heads=1, num_layers=1, intermediate_size=64)
ARGS = {"max_steps": 6, "per_device_train_batch_size": 8, "learning_rate": 5e-3, "logging_steps": 1,
        "gradient_checkpointing": False, "save_steps": 3, "report_to": "none"}


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft") / "model"
    tokenizer = build_tokenizer()
    build_model(TINY, tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pairs() -> Dataset:
    rows = [{"prompt": f"{a}*{b}=", "chosen": str(a * b)[::-1], "rejected": str(a * b)} for a in range(11, 19)
            for b in (3, 7)]
    return Dataset.from_list(rows)


def completion_logp(model, tokenizer, prompt: str, completion: str) -> float:
    """log p(completion | prompt), summed over the completion's tokens (the EOS included, as TRL does)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = prompt_ids + tokenizer(completion)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    targets = torch.tensor(ids[1:])
    return logp[torch.arange(len(targets)), targets][len(prompt_ids) - 1:].sum().item()


def mean_margin(policy, reference, tokenizer, data: Dataset) -> float:
    """DPO's implicit reward margin: (log π − log π_ref)(chosen) − (log π − log π_ref)(rejected)."""
    total = 0.0
    for row in data:
        for side, sign in (("chosen", 1), ("rejected", -1)):
            total += sign * (completion_logp(policy, tokenizer, row["prompt"], row[side])
                             - completion_logp(reference, tokenizer, row["prompt"], row[side]))
    return total / len(data)


def run_dpo(sft_model, out, ref_model=None, lora=None, **args):
    policy = AutoModelForCausalLM.from_pretrained(sft_model)
    tokenizer = AutoTokenizer.from_pretrained(sft_model)
    metrics = train_dpo(policy, tokenizer, pairs(), ARGS | args, out, seed=0, ref_model=ref_model, lora=lora)
    history = json.loads((out / "log_history.json").read_text())
    return metrics, [h for h in history if "rewards/chosen" in h]


@pytest.mark.parametrize("mode", ["explicit", "lora", "precomputed"])
def test_reference_is_the_sft_model_and_the_margin_grows(sft_model, tmp_path, mode):
    explicit = AutoModelForCausalLM.from_pretrained(sft_model) if mode == "explicit" else None
    lora = LoraConfig(r=4, lora_alpha=8) if mode == "lora" else None
    extra = {"precompute_ref_log_probs": True} if mode == "precomputed" else {}
    metrics, logged = run_dpo(sft_model, tmp_path, explicit, lora, **extra)
    # At the first step the policy is still the SFT model, so with the SFT model as reference
    # the implicit rewards are exactly zero (any other reference makes them nonzero).
    assert abs(logged[0]["rewards/chosen"]) < 1e-5 and abs(logged[0]["rewards/rejected"]) < 1e-5
    assert logged[-1]["rewards/margins"] > logged[0]["rewards/margins"]
    # Measured independently on the saved model: chosen gained on rejected against the SFT model.
    tokenizer = AutoTokenizer.from_pretrained(sft_model)
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert not any("lora" in name for name, _ in tuned.named_parameters())
    assert mean_margin(tuned, AutoModelForCausalLM.from_pretrained(sft_model), tokenizer, pairs()) > 0.05
    assert metrics["final/rewards/margins"] == logged[-1]["rewards/margins"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]


def test_a_reference_other_than_the_start_model_shows_in_the_rewards(sft_model, tmp_path):
    # The check above can fail: a reference that is not the policy's start gives nonzero rewards at step 1.
    other = build_model(TINY, build_tokenizer(), seed=1)
    _, logged = run_dpo(sft_model, tmp_path, other, max_steps=1)
    assert abs(logged[0]["rewards/chosen"]) > 1e-3


def test_chat_pairs_with_trls_implicit_prompt_train(sft_model, tmp_path):
    """Preference chats without a prompt column (their shared first turns are it): TRL extracts
    it, and DPO raises the chosen side's margin as with explicit prompts."""
    from pipeline.config.schema import DataSource
    from pipeline.data.sources import PREFERENCE_FIELDS, load_rows, write_jsonl

    def chat(prompt, answer):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]

    write_jsonl(tmp_path / "hh.jsonl", [{"chosen": chat(r["prompt"], r["chosen"]), "rejected": chat(r["prompt"], r["rejected"])}
                                        for r in pairs()])
    data = load_rows(DataSource(path=str(tmp_path / "hh.jsonl")), PREFERENCE_FIELDS)
    policy = AutoModelForCausalLM.from_pretrained(sft_model)
    tokenizer = AutoTokenizer.from_pretrained(sft_model)
    train_dpo(policy, tokenizer, data, ARGS, tmp_path / "out", seed=0)
    history = [h for h in json.loads((tmp_path / "out" / "log_history.json").read_text()) if "rewards/margins" in h]
    assert history[-1]["rewards/margins"] > 0 and history[-1]["rewards/accuracies"] > 0.5
