"""Both sampling backends on a tiny untrained model: the format, seeds, and the sample stage."""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.config import DemoConfig, PipelineConfig, SamplingConfig
from pipeline.data import read_jsonl, write_jsonl
from pipeline.demo import build_model, build_tokenizer
from pipeline.manifest import Manifest
from pipeline.sampling import generate_vllm, sample, sample_hf, vllm_engine
from pipeline.stage import run_in_process

PROMPTS = ["12+3=", [{"role": "user", "content": "2*4="}]]  # a text and a chat
# Temperature 1 on an untrained model: completions differ from seed to seed.
SETTINGS = SamplingConfig(n=3, temperature=1.0, max_tokens=12, seed=7)

Sampler = Callable[[SamplingConfig], list[list[str]]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer()
    # head_dim 64, the smallest that vLLM's CPU attention takes.
    build_model(DemoConfig(hidden_size=64, num_heads=1, num_layers=1, intermediate_size=128), tokenizer, 0) \
        .save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vllm_sampler(model_dir) -> Iterator[Sampler]:
    pytest.importorskip("vllm")
    # One engine for the module: starting one takes half a minute on a small CPU.
    # Eager: torch.compile would add about 40 s to the start.
    with vllm_engine(model_dir, SETTINGS.model_copy(update={"enforce_eager": True})) as llm:
        yield lambda settings: generate_vllm(llm, PROMPTS, settings)


@pytest.fixture
def hf_sampler(model_dir) -> Sampler:
    return lambda settings: sample_hf(model_dir, PROMPTS, settings)


@pytest.fixture(params=["hf", "vllm"])
def sampler(request) -> Sampler:
    return request.getfixturevalue(f"{request.param}_sampler")


def test_n_completions_per_prompt(sampler):
    completions = sampler(SETTINGS)
    assert len(completions) == len(PROMPTS)
    assert all(len(texts) == SETTINGS.n and all(isinstance(t, str) for t in texts) for texts in completions)
    assert any(t for texts in completions for t in texts)
    # Special tokens are skipped: the chat markers never show in a completion.
    assert not any("<|" in t or "<eos>" in t for texts in completions for t in texts)


def test_same_seed_same_completions_other_seed_others(sampler):
    first = sampler(SETTINGS)
    assert sampler(SETTINGS) == first
    assert sampler(SETTINGS.model_copy(update={"seed": 8})) != first


def test_greedy_with_several_samples_is_refused(model_dir):
    with pytest.raises(ValueError, match=r"sampling\.temperature.*sampling\.n"):
        sample(model_dir, PROMPTS, SamplingConfig(temperature=0, n=4))


def test_sample_stage_writes_rows_with_completions_and_settings(model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"id": "a", "prompt": "1+1=", "answer": "2"}, {"prompt": "2*4=", "answer": "8"},
                          {"prompt": "3+3=", "answer": "6"}])
    cfg = PipelineConfig(name="t", sampling=SETTINGS, pairs={"prompts": {"path": str(prompts)}, "n": 3,
                                                            "temperature": 0.5, "max_prompts": 2})
    out = tmp_path / "sample"
    manifest = run_in_process("sample", cfg, out, {}, model=model_dir)
    assert manifest.stage == "sample" and Manifest.find(out) == manifest
    rows = read_jsonl(manifest.path("samples"))
    assert [r["id"] for r in rows] == ["a", "1"]  # max_prompts: 2
    assert rows[0]["answer"] == "2" and rows[1]["prompt"] == "2*4=" and rows[1]["answer"] == "8"
    # The pairs' own n and temperature, the rest from `sampling`.
    expected = SETTINGS.model_copy(update={"temperature": 0.5}).model_dump()
    assert all(len(r["completions"]) == 3 and r["sampling"] == expected for r in rows)


def test_a_folder_that_is_not_a_model_is_refused_before_any_engine_starts(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=rf"{tmp_path} is not a model folder \(no readable config.json\)"):
        sample(tmp_path, ["1+1="], SETTINGS.model_copy(update={"backend": "vllm"}))


def test_a_prompt_longer_than_the_context_names_its_row(model_dir):
    # The demo model's context is 128 tokens (one per character): 120 + 12 do not fit.
    prompts = ["1+1=", "1" * 120 + "="]
    with pytest.raises(ValueError, match=r"eval\.jsonl row 2: the prompt is 121 tokens, and with sampling\.max_tokens "
                                         r"= 12 more than the model's context of 128"):
        sample(model_dir, prompts, SETTINGS.model_copy(update={"backend": "vllm"}), names=["eval.jsonl row 1",
                                                                                          "eval.jsonl row 2"])


def test_a_chat_prompt_without_a_chat_template_is_refused(model_dir, tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"prompt 2: the prompt is a chat, but the tokenizer .* has no chat template"):
        sample(model_dir, PROMPTS, SETTINGS.model_copy(update={"backend": "vllm"}), tmp_path)
    assert len(sample(model_dir, ["1+1="], SETTINGS, tmp_path)) == 1  # strings need no template


def test_a_tokenizer_bigger_than_the_models_vocabulary_is_refused(model_dir, tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<extra>"])  # an id the model's embedding does not have
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"has {len(tokenizer)} tokens, the model's vocabulary only {len(tokenizer) - 1}"):
        sample(model_dir, ["1+1="], SETTINGS.model_copy(update={"backend": "vllm"}), tmp_path)
