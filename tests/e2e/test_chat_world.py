"""The chat world end to end: a Qwen3 built from its config, a byte-level BPE tokenizer trained
on the world's text, ChatML conversations with a system prompt, answers of several tokens ended
GSM8K-style and checked by the math verifier: the path a user's real chat model takes."""

from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from flows.pipeline_flow import run_pipeline
from pipeline.config.schema import load_config
from pipeline.data.sources import read_jsonl
from pipeline.demo.world import SYSTEM_PROMPT

REPO = Path(__file__).resolve().parents[2]
# configs/demo-chat.yaml at a size that takes seconds, set as command-line overrides are
TINY = ["demo.hidden_size=64", "demo.num_heads=1", "demo.num_layers=1", "demo.intermediate_size=64",
        "demo.train_examples=64", "demo.domain_train_examples=32", "demo.test_examples=2", "demo.val_examples=1",
        "pretrain.trainer.max_steps=3", "pretrain.trainer.per_device_train_batch_size=8", "sft.trainer.max_steps=2",
        "sft.trainer.per_device_train_batch_size=8", "dpo.trainer.max_steps=2",
        "dpo.trainer.per_device_train_batch_size=8", "pairs.max_prompts=8", "pairs.n=2", "sampling.backend=hf",
        "sampling.n=2", "evaluate.ks=[1, 2]"]


def test_the_chat_world_runs_every_stage_on_a_qwen3_with_a_bpe_tokenizer(tmp_path):
    cfg = load_config(REPO / "configs" / "demo-chat.yaml", [*TINY, f"results_dir={tmp_path / 'results'}"])
    results = {r.name: r.manifest for r in run_pipeline(cfg)}
    assert list(results) == ["demo_data", "pretrain", "evaluate_base", "sft", "evaluate_sft", "sample", "pairs", "dpo",
                             "evaluate_dpo"]

    model = results["pretrain"].path("model")
    assert AutoConfig.from_pretrained(model).architectures == ["Qwen3ForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(model)
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    row = read_jsonl(results["demo_data"].path("sft_train"))[0]
    assert row["prompt"][0] == {"role": "system", "content": SYSTEM_PROMPT} and row["prompt"][1]["role"] == "user"
    worked = row["completion"][0]["content"]
    assert "\n#### " in worked and len(tokenizer(worked).input_ids) < len(worked) / 2  # BPE: tokens span characters
    answers = [r["answer"] for r in read_jsonl(results["demo_data"].path("domain_test"))]
    assert all(len(tokenizer(" " + a).input_ids) > 1 for a in answers)  # several tokens each

    scored = read_jsonl(results["evaluate_dpo"].path("samples_target"))
    assert scored[0]["prompt"][0]["role"] == "system" and len(scored[0]["completions"]) == 2
    assert "target/pass_at_1" in results["evaluate_dpo"].metrics
    pairs = read_jsonl(results["pairs"].path("pairs"))
    assert pairs and pairs[0]["chosen"][0]["role"] == "assistant"  # conversational pairs, as TRL's DPO takes them
    assert results["dpo"].metrics["train_loss"] > 0
