"""Both sampling backends on a tiny untrained model: the format, seeds, and the sample stage;
the warm vLLM engine that the stages of a run share; vLLM's data parallelism: the prompts' shards
and seeds, each rank's devices, its errors.

A real run with data_parallel_size 2 (two CPU engines) is `python bench/sampling_dp.py`: its
dp 2 run alone took 95 s to 250 s on 2 shared cores, too long and too variable for the suite
(docs/pipeline.md, "Sampling on many GPUs")."""

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from pydantic import ValidationError
from transformers import AutoConfig, AutoTokenizer

from pipeline.config.schema import ConfigError, DemoConfig, PipelineConfig, SamplingConfig, load_config
from pipeline.data.sources import read_jsonl, write_jsonl
from pipeline.demo.world import build_model, build_tokenizer
from pipeline.results.manifest import Manifest
from pipeline.sampling.engines import CPU_BIND_ENV, DP_ENV, DeviceSlice, cpu_slices, device_slices, gpu_slices, run_ranks
from pipeline.sampling import warm
from pipeline.sampling.sampler import (
    ENGINE_CALLS,
    BadRequest,
    complete_prompts,
    SAMPLER_CLIENT_ENV,
    SAMPLER_ENV,
    generate_hf,
    generate_vllm,
    load_hf,
    merge_shards,
    prompt_seeds,
    sample,
    sample_hf,
    warm_session,
    shard_prompts,
    shared_prefill,
    vllm_engine,
    vllm_engine_args,
)
from pipeline.runtime.process import TransientError, run_in_process
from stages import sample as sample_stage

PROMPTS = ["12+3=", [{"role": "user", "content": "2*4="}]]  # a text and a chat
# Temperature 1 on an untrained model: completions differ from seed to seed.
SETTINGS = SamplingConfig(n=3, temperature=1.0, max_tokens=12, seed=7)

Sampler = Callable[[SamplingConfig], list[list[str]]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


# The test models' context: more than one of vLLM's KV-cache blocks on a CPU (128 tokens), so that
# a prompt can fill a block that its prefix cache keeps (the demo world's models hold 128).
CONTEXT = 320


def save_tiny(folder: Path, seed: int, hidden_size: int = 64) -> Path:
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = CONTEXT
    # head_dim 64, the smallest that vLLM's CPU attention takes.
    model = build_model(DemoConfig(hidden_size=hidden_size, num_heads=hidden_size // 64, num_layers=1,
                                   intermediate_size=128), tokenizer, seed)
    model.config.max_position_embeddings = CONTEXT  # rotary positions: the same values at every position
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vllm_llm(model_dir) -> Iterator:
    pytest.importorskip("vllm")
    # One engine for the module: starting one takes half a minute on a small CPU.
    # Eager: torch.compile would add about 40 s to the start.
    with vllm_engine(model_dir, SETTINGS.model_copy(update={"backend": "vllm", "enforce_eager": True})) as llm:
        yield llm


@pytest.fixture
def vllm_sampler(vllm_llm) -> Sampler:
    return lambda settings: generate_vllm(vllm_llm, PROMPTS, settings)


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


def test_hf_computes_each_prompt_once_and_samples_as_generate_alone_does(model_dir, monkeypatch):
    """The prompts go through the model once each, not once per sample, and the completions are
    generate's own with num_return_sequences (each prompt copied n times), for the same seed;
    prompts of different lengths (left padding) and a one-token prompt included. (With the ended
    rows kept to the batch's end: taken out, the rows draw in other turns of the random stream;
    the test below checks, greedy, that they go on as in one call.)"""
    import torch

    from pipeline.sampling import sampler

    monkeypatch.setattr(sampler, "ENDED_SHARE", 2.0)  # never
    model, tokenizer = load_hf(model_dir)
    prompts, settings = ["1+1=", "12345+678=", "9"], SETTINGS.model_copy(update={"n": 5})
    rows = []  # the shape of each batch the model computes
    hook = model.get_input_embeddings().register_forward_hook(lambda module, args, out: rows.append(tuple(args[0].shape)))
    try:
        ours = generate_hf(model, tokenizer, prompts, settings)
        longest = len(tokenizer(prompts[1], add_special_tokens=False).input_ids)
        assert rows[0] == (3, longest - 1)  # the prompts but their last token, once each
        assert set(rows[1:]) == {(3 * 5, 1)}  # then one token at a time for each sample
        rows.clear()
        one_token = generate_hf(model, tokenizer, prompts[2:], settings)
        assert rows[0] == (5, 1)
    finally:
        hook.remove()

    def generate_alone(texts: list[str]) -> list[list[str]]:
        torch.manual_seed(settings.seed)
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                             top_k=0, repetition_penalty=1.0, max_new_tokens=settings.max_tokens,
                             num_return_sequences=settings.n, pad_token_id=tokenizer.pad_token_id)
        decoded = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return [decoded[i:i + settings.n] for i in range(0, len(decoded), settings.n)]

    # generate_hf samples the prompts longest first: "12345+678=", "1+1=", "9".
    alone = generate_alone([prompts[1], prompts[0], prompts[2]])
    assert ours == [alone[1], alone[0], alone[2]]
    assert one_token == generate_alone(prompts[2:])  # one token: generate's own path
    assert len({c for texts in ours for c in texts}) > 3  # samples, not one answer copied
    # The next-token logits at every step, not only the samples drawn from them.
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    options = {"do_sample": True, "top_k": 0, "max_new_tokens": 6, "return_dict_in_generate": True,
               "output_logits": True, "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    shared = model.generate(**shared_prefill(model, batch, 5), **options).logits
    torch.manual_seed(0)
    alone = model.generate(**batch, num_return_sequences=5, **options).logits
    assert len(shared) == len(alone) == 6
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(shared, alone))


def test_hf_takes_the_ended_rows_out_and_the_others_go_on_as_in_one_call():
    """Once half of a batch's rows have ended, generate goes on with the others alone, from their
    rows of the KV cache: greedy, the completions are those of one generate call over the batch,
    for prompts of several lengths (left padding) that end at different steps."""
    import torch

    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    model = build_model(DemoConfig(hidden_size=64, num_heads=1, num_layers=2, intermediate_size=128), tokenizer, 0)
    with torch.no_grad():  # untrained weights, made peaky: greedy then goes somewhere, not one token forever
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.mul_(8)
    model.eval()
    prompts = ["12345+678=", "100/7=", "2+2+2=", "77*3=", "9-4=", "x=y+", "1+1=", "abc"]  # longest first
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    one_call = model.generate(**batch, do_sample=False, max_new_tokens=12, eos_token_id=None,
                              pad_token_id=tokenizer.pad_token_id)[:, batch["input_ids"].shape[1]:].tolist()

    # End tokens: the second token of the first row, the third of the second, ..., so that five
    # rows or more end, at several steps, and the others run on.
    ends = sorted({row[1 + i] for i, row in enumerate(one_call[:5])} - {tokenizer.pad_token_id})
    model.generation_config.eos_token_id = ends
    stops = [min([row.index(t) for t in ends if t in row], default=12) for row in one_call]
    assert len(set(stops)) > 2 and max(stops) > sorted(stops)[len(stops) // 2]
    expected = [tokenizer.decode(row[:stop + 1], skip_special_tokens=True) for row, stop in zip(one_call, stops)]
    rows, generate = [], model.generate

    def counting(**inputs):
        rows.append(len(inputs["input_ids"]))
        return generate(**inputs)
    model.generate = counting
    greedy = SamplingConfig(n=2, temperature=0.0, max_tokens=12, batch_size=len(prompts))
    assert generate_hf(model, tokenizer, prompts, greedy) == [[text, text] for text in expected]
    assert len(rows) > 1 and rows[0] == 2 * len(prompts) and all(b < a for a, b in zip(rows, rows[1:]))
    # A setting counted from a call's start (min_new_tokens, ..., here a time limit that never
    # comes) would count again in each new call: such a model samples a batch in one call.
    rows.clear()
    model.generation_config.max_time = 600.0
    assert generate_hf(model, tokenizer, prompts, greedy) == [[text, text] for text in expected]
    assert rows == [2 * len(prompts)]


def test_hf_batches_prompts_of_similar_length_and_returns_them_in_prompt_order(model_dir):
    """Batches of prompts of one length, longest first (generate runs a batch until its longest
    completion ends), and each prompt's completions where the prompt is: the prompts mixed, or
    already in that order, sample the same batches, so the same completions, each at its prompt."""
    model, tokenizer = load_hf(model_dir)
    long, short = ["12345+678=", "98765+432=", "55555+111="], ["11=", "22=", "33="]
    mixed = [long[0], short[0], long[1], short[1], long[2], short[2]]
    three = SETTINGS.model_copy(update={"batch_size": 3})
    widths = []  # the prompt length of each batch that generate prefills
    hook = model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: widths.append(args[0].shape[1]) if args[0].shape[1] > 1 else None)
    try:
        completions = generate_hf(model, tokenizer, mixed, three)
    finally:
        hook.remove()
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) - 1 for p in (short[0], long[0])]
    assert widths == lengths[::-1]  # the three long prompts in one batch, then the three short
    by_length = generate_hf(model, tokenizer, long + short, three)
    assert completions == [by_length[0], by_length[3], by_length[1], by_length[4], by_length[2], by_length[5]]
    assert len({c for texts in completions for c in texts}) > 6  # samples, not one answer everywhere


def test_models_whose_cache_cannot_be_shared_sample_through_generates_own_copies():
    """A linear-attention layer's state is not keys and values, which batch_repeat_interleave copies
    (Qwen3-Next), and a generation config with its own cache_implementation makes generate refuse
    another: such models are left to generate's own num_return_sequences, the model unused."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, Qwen3NextConfig

    class Unused:
        config = Qwen3NextConfig(num_hidden_layers=4)
        generation_config = GenerationConfig()

        @staticmethod
        def _supports_default_dynamic_cache() -> bool:
            return True

        def __call__(self, *args, **kwargs):
            raise AssertionError("the prompts were computed for a cache that cannot be copied")

    ids = torch.ones(2, 5, dtype=torch.long)
    inputs = shared_prefill(Unused(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 4)
    assert inputs["num_return_sequences"] == 4 and inputs["input_ids"] is ids and "past_key_values" not in inputs
    # A generation config that names its own cache (Gemma's "hybrid"): generate would refuse another.
    Unused.config = LlamaConfig(num_hidden_layers=2)  # keys and values only: shared but for that
    Unused.generation_config = GenerationConfig(cache_implementation="hybrid")
    inputs = shared_prefill(Unused(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 4)
    assert inputs["num_return_sequences"] == 4 and "past_key_values" not in inputs


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
    manifest = run_in_process(sample_stage.STAGE, cfg, out, {}, model=model_dir)
    assert manifest.stage == "sample" and Manifest.find(out) == manifest
    rows = read_jsonl(manifest.path("samples"))
    assert [r["id"] for r in rows] == ["a", "1"]  # max_prompts: 2
    assert rows[0]["answer"] == "2" and rows[1]["prompt"] == "2*4=" and rows[1]["answer"] == "8"
    # The pairs' own n and temperature, the rest from `sampling`, with the backend that sampled (not
    # auto): the settings that decide the samples, as in the key (not the devices or a warm engine).
    assert SETTINGS.backend == "auto"
    expected = SETTINGS.model_copy(update={"temperature": 0.5}).key_settings()
    assert expected["backend"] != "auto" and "warm_engine" not in expected
    assert all(len(r["completions"]) == 3 and r["sampling"] == expected for r in rows)


def test_a_folder_that_is_not_a_model_is_refused_before_any_engine_starts(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=rf"{tmp_path} is not a model folder \(no readable config.json\)"):
        sample(tmp_path, ["1+1="], SETTINGS.model_copy(update={"backend": "vllm"}))


def test_a_prompt_longer_than_the_context_names_its_row(model_dir):
    # The model's context is CONTEXT tokens (one per character): CONTEXT - 8 + 12 do not fit.
    prompts = ["1+1=", "1" * (CONTEXT - 9) + "="]
    with pytest.raises(ValueError, match=rf"eval\.jsonl row 2: the prompt is {CONTEXT - 8} tokens, and with "
                                         rf"sampling\.max_tokens = 12 more than the model's context of {CONTEXT}"):
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


# The warm engine: one vLLM engine that the stages of a run share

VLLM_SETTINGS = SETTINGS.model_copy(update={"backend": "vllm", "enforce_eager": True})


def test_the_warm_engine_given_another_models_weights_samples_what_a_fresh_engine_does(
        model_dir, vllm_llm, tmp_path, monkeypatch):
    other = save_tiny(tmp_path / "other", seed=1)  # the same architecture and tokenizer, other weights
    # The last prompt fills one of vLLM's KV-cache blocks, which its prefix cache keeps: one computed
    # with the first model's weights must not be reused with the second's.
    prompts = ["12+3=", "2*4=", "1+" * 100 + "1="]
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "answer": "0"} for p in prompts])
    cfg = PipelineConfig(name="t", sampling=VLLM_SETTINGS, pairs={"prompts": {"path": str(tmp_path / "p.jsonl")},
                                                                 "n": VLLM_SETTINGS.n, "max_prompts": len(prompts)})
    devices = {"POSTTRAIN_TEST_DEVICES": "slot 1"}  # a pipeline's among others (its GPUs): the engine's too
    sampler = warm.Sampler(devices)
    monkeypatch.setitem(warm.SAMPLERS, json.dumps(devices), sampler)
    try:
        env = warm.sampler_env(cfg.sampling, devices)
        first = run_in_process(sample_stage.STAGE, cfg, tmp_path / "first", {}, env, model=other)
        engine = {p.pid for p in psutil.Process(sampler.process.pid).children(recursive=True)}
        lines: list[str] = []
        # A stage's process of its own, as the runner starts it: its output shows how it sampled.
        second = run_in_process(sample_stage.STAGE, cfg, tmp_path / "second", {}, env, lines.append, model=model_dir)
        assert engine == {p.pid for p in psutil.Process(sampler.process.pid).children(recursive=True)}
        assert any(f"sampling {model_dir} with the run's vLLM engine, its weights loaded in place" in line
                   and line.endswith("(POSTTRAIN_TEST_DEVICES=slot 1)") for line in lines)
    finally:
        sampler.stop()
    warm_completions = [row["completions"] for row in read_jsonl(second.path("samples"))]
    assert warm_completions == generate_vllm(vllm_llm, prompts, VLLM_SETTINGS)  # a fresh engine's
    assert [row["completions"] for row in read_jsonl(first.path("samples"))] != warm_completions
    assert not any(psutil.pid_exists(pid) for pid in engine)  # stopped with the sampler


def test_the_sampler_names_the_stage_it_answers_and_is_stopped_for_that_stage_alone(tmp_path, monkeypatch):
    """A stage past its time limit stops the warm engine only where its own request may hang in
    it, not where it waited in the queue behind another pipeline's (on a CPU they share one)."""
    import multiprocessing

    serving, seen = tmp_path / warm.SERVING, []

    class HungEngine:
        def ready_for(self, *args):
            seen.append(serving.read_text())
            raise RuntimeError("the engine failed")

        def close(self):
            pass

        def rest(self):
            pass

    monkeypatch.setattr(warm, "engine_identity", lambda *args: "id")
    sampler_end, stage_end = multiprocessing.Pipe()
    stage_end.send({"client": "/r/evaluate/k", "settings": VLLM_SETTINGS.model_dump(mode="json"), "model_dir": "m",
                    "tokenizer_dir": None, "trust_remote_code": False})
    warm.answer(sampler_end, HungEngine(), {}, serving)
    assert seen == ["/r/evaluate/k"] and not serving.exists()  # named while answered, then not
    assert stage_end.recv()[:3] == ("error", "RuntimeError", "the engine failed")

    stopped: list[bool] = []
    sampler = warm.Sampler({"CUDA_VISIBLE_DEVICES": "1"})
    sampler.folder = str(tmp_path)
    monkeypatch.setattr(sampler, "stop", lambda: stopped.append(True))
    monkeypatch.setitem(warm.SAMPLERS, json.dumps(sampler.devices), sampler)
    warm.stop_sampler(sampler.devices, "/r/evaluate/k")  # answering nothing
    serving.write_text("/r/evaluate/other-pipeline")
    warm.stop_sampler(sampler.devices, "/r/evaluate/k")
    assert not stopped
    serving.write_text("/r/evaluate/k")
    warm.stop_sampler(sampler.devices, "/r/evaluate/k")
    assert stopped == [True]


def test_a_session_answers_its_calls_in_turn_and_rests_the_engine_before_its_last_reply(tmp_path, monkeypatch):
    """A stage's session with the sampler: the model loaded, then each call answered until the
    stage ends it. A call that fails ends it and closes the engine it failed in; a bad request
    does not close it; an engine that did not start stays a transient error."""
    import threading
    from multiprocessing.connection import Listener

    events: list[str] = []

    class Engine:
        llm = "the engine"
        starts = True

        def ready_for(self, *args):
            if not self.starts:
                raise TransientError("the vLLM engine did not start: no memory")
            events.append("loaded")
            return "a test engine"

        def close(self):
            events.append("closed")

        def rest(self):
            events.append("rests")

    def bad_request(llm, settings):
        raise BadRequest("vLLM takes no such generation settings: num_beams")

    monkeypatch.setattr(warm, "engine_identity", lambda *args: "id")
    monkeypatch.setitem(warm.ENGINE_CALLS, "double", lambda llm, settings, x: (llm, 2 * x))
    monkeypatch.setitem(warm.ENGINE_CALLS, "fail", lambda llm, settings: 1 / 0)
    monkeypatch.setitem(warm.ENGINE_CALLS, "bad", bad_request)
    engine, address = Engine(), str(tmp_path / "socket")
    with Listener(address, family="AF_UNIX") as listener:
        def serve(sessions: int) -> None:
            for _ in range(sessions):
                with listener.accept() as connection:
                    warm.answer(connection, engine, {}, tmp_path / warm.SERVING)

        server = threading.Thread(target=serve, args=(4,), daemon=True)
        server.start()
        with warm_session(address, Path("m"), VLLM_SETTINGS) as call:
            assert call("double", 21) == ("the engine", 42) and call("double", 1) == ("the engine", 2)
            events.append("replied")
        assert events == ["loaded", "replied", "rests"]  # at rest when the end's reply came
        with pytest.raises(RuntimeError, match=r"sampler .*: ZeroDivisionError: division by zero"):
            with warm_session(address, Path("m"), VLLM_SETTINGS) as call:
                call("fail")
        assert events[3:] == ["loaded", "closed", "rests"]
        with pytest.raises(RuntimeError, match="BadRequest: vLLM takes no such generation settings"):
            with warm_session(address, Path("m"), VLLM_SETTINGS) as call:
                call("bad")
        assert events[6:] == ["loaded", "rests"]  # kept
        engine.starts = False
        with pytest.raises(TransientError, match="did not start: no memory"):  # the flow retries the stage
            with warm_session(address, Path("m"), VLLM_SETTINGS):
                pass
        server.join(timeout=30)
    assert not server.is_alive()


def test_a_model_of_other_architecture_tokenizer_or_engine_settings_gets_a_new_engine(model_dir, tmp_path):
    pytest.importorskip("vllm")
    identity = warm.engine_identity(model_dir, VLLM_SETTINGS)
    assert warm.engine_identity(save_tiny(tmp_path / "weights", seed=3), VLLM_SETTINGS) == identity
    assert warm.engine_identity(model_dir, VLLM_SETTINGS.model_copy(update={"seed": 9, "n": 1})) == identity
    trained = save_tiny(tmp_path / "trained", seed=4)  # as training saves it: no KV cache, another name
    config = AutoConfig.from_pretrained(trained)
    config.use_cache, config._name_or_path = False, "somewhere/else"
    config.save_pretrained(trained)
    assert warm.engine_identity(trained, VLLM_SETTINGS) == identity
    wider = save_tiny(tmp_path / "wider", seed=0, hidden_size=128)
    assert warm.engine_identity(wider, VLLM_SETTINGS) != identity
    assert warm.engine_identity(model_dir, VLLM_SETTINGS.model_copy(update={"max_model_len": 64})) != identity
    assert warm.engine_identity(model_dir, VLLM_SETTINGS, trust_remote_code=True) != \
        warm.engine_identity(trained, VLLM_SETTINGS, trust_remote_code=True)  # its own code: its own folder
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert warm.engine_identity(model_dir, VLLM_SETTINGS, tmp_path / "tokenizer") != identity
    tokenizer = build_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # renders prompts otherwise
    tokenizer.save_pretrained(tmp_path / "template")
    assert warm.engine_identity(model_dir, VLLM_SETTINGS, tmp_path / "template") != identity


def test_a_sampler_that_died_is_a_transient_error_and_the_next_stage_gets_a_new_one(model_dir):
    sampler = warm.Sampler({})
    try:
        address = sampler.address()
        sampler.process.kill()
        sampler.process.join()
        with pytest.raises(TransientError, match=r"the run's vLLM sampler .* does not answer"):
            with warm_session(address, model_dir, VLLM_SETTINGS) as call:
                call("sample", PROMPTS, prompt_seeds(0, 2))
        assert sampler.address() != address and sampler.process.is_alive()
    finally:
        sampler.stop()
    assert sampler.process is None


def test_only_stages_sampling_with_one_vllm_engine_get_the_warm_engine(monkeypatch):
    monkeypatch.setattr(warm, "SAMPLERS", {})
    monkeypatch.setattr(warm.Sampler, "address", lambda self: f"/run/{self.devices.get('CUDA_VISIBLE_DEVICES', 'all')}")
    assert warm.sampler_env(SamplingConfig(backend="vllm"), client="/r/evaluate/k") == {
        SAMPLER_ENV: "/run/all", SAMPLER_CLIENT_ENV: "/r/evaluate/k"}
    # Pipelines side by side: one engine on each one's GPUs.
    assert warm.sampler_env(SamplingConfig(backend="vllm"), {"CUDA_VISIBLE_DEVICES": "2,3"})[SAMPLER_ENV] == "/run/2,3"
    assert warm.sampler_for({"CUDA_VISIBLE_DEVICES": "2,3"}) is warm.sampler_for({"CUDA_VISIBLE_DEVICES": "2,3"})
    assert len(warm.SAMPLERS) == 2
    for settings in (SamplingConfig(backend="hf"), SamplingConfig(backend="vllm", warm_engine=False),
                     SamplingConfig(backend="vllm", data_parallel_size=2)):
        assert warm.sampler_env(settings) == {}
    # Warm or not, the same completions: not part of the stages' keys.
    assert SamplingConfig(backend="vllm", warm_engine=False).key_settings() == SamplingConfig(backend="vllm").key_settings()


# lm-eval's requests on the sampling's engine

def test_lm_evals_requests_on_the_engine_score_and_generate_as_its_hf_backend_does(model_dir, vllm_llm):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from pipeline.evaluation.lm_eval_engine import EngineLM

    calls: list[str] = []

    def call(name, *args):
        calls.append(name)
        return ENGINE_CALLS[name](vllm_llm, VLLM_SETTINGS, *args)

    engine = EngineLM(call, AutoTokenizer.from_pretrained(model_dir), seed=3)
    hf = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=4)
    assert engine.max_length == hf.max_length == CONTEXT

    def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
        return [Instance(kind, {}, a, i) for i, a in enumerate(arguments)]

    greedy = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}
    generations = requests("generate_until", [("12+3=", greedy), ("2*4=", {**greedy, "until": ["4", "\n"]}),
                                              ("7", {"max_gen_toks": 5})])
    generated = engine.generate_until(generations)
    assert generated == hf.generate_until(generations) and any(generated)
    # The log-likelihood of the model's own greedy answer (each token the most likely), of others,
    # and of a continuation with no context (scored after the prefix token).
    pairs = requests("loglikelihood", [("12+3=", generated[0]), ("12+3=", "15"), ("2*4=", " 8"), ("", "12+3=15")])
    scores, expected = engine.loglikelihood(pairs), hf.loglikelihood(pairs)
    assert [greedy for _, greedy in scores] == [greedy for _, greedy in expected] and scores[0][1]
    assert [logprob for logprob, _ in scores] == pytest.approx([logprob for logprob, _ in expected], abs=1e-3)
    texts = requests("loglikelihood_rolling", [("12+3=15\n2*4=8",), ("1+1=2",)])
    assert engine.loglikelihood_rolling(texts) == pytest.approx(hf.loglikelihood_rolling(texts), abs=1e-3)
    # A sampled generation has its own seed: the same text whatever the engine sampled before.
    sampled = requests("generate_until", [("12+3=", {"do_sample": True, "temperature": 1.0, "max_gen_toks": 8})] * 3
                       + [("12+3=", {"do_sample": True, "max_gen_toks": 8})] * 2)  # at vLLM's temperature, 1
    first = engine.generate_until(sampled)
    generate_vllm(vllm_llm, PROMPTS, SETTINGS)
    assert engine.generate_until(sampled) == first and len(set(first)) > 1
    assert calls == ["context_length", "complete", "score", "score", "complete", "complete"]


@pytest.mark.parametrize("params", [{"num_beams": 2}, {"temperature": -1.0}, {"max_tokens": 0}])
def test_generation_settings_vllm_refuses_are_the_callers_error_not_the_engines(params):
    pytest.importorskip("vllm")
    with pytest.raises(BadRequest, match="vLLM takes no such generation settings"):
        complete_prompts(None, VLLM_SETTINGS, [[1, 2]], [params])


def test_a_continuation_longer_than_the_context_is_refused_by_name(model_dir):
    from pipeline.evaluation.lm_eval_engine import EngineLM

    engine = EngineLM(lambda name, *args: 16, AutoTokenizer.from_pretrained(model_dir), seed=0)
    with pytest.raises(ValueError, match="continuation of 15 tokens leaves no room for its context in the model's 16"):
        engine._loglikelihood_tokens([(("1+", "2" * 15), [5, 6], [7] * 15)])


def test_an_evaluation_sends_lm_evals_requests_to_the_runs_warm_engine(model_dir, tmp_path, monkeypatch):
    """The sampling and lm-eval's tasks on one engine, the run's: lm-eval's requests answered as
    its HF backend answers them."""
    import gzip

    from pipeline.config.schema import parse_config
    from pipeline.evaluation.lm_eval_suite import run_lm_eval
    from stages import evaluate

    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "task": "add"} for a, b in ((1, 2), (3, 4), (12, 5))]
    rows += [{"prompt": f"{a}*{b}=", "answer": str(a * b), "task": "mul"} for a, b in ((2, 4), (3, 3))]
    write_jsonl(tmp_path / "suite.jsonl", rows)
    suite = {"path": str(tmp_path / "suite.jsonl")}
    cfg = parse_config({"name": "t", "model": {"path": str(model_dir)},
                        "data": {"sft": suite, "target_eval": suite, "general_eval": suite},
                        "sampling": VLLM_SETTINGS.model_dump(),
                        "evaluate": {"lm_eval": {"tasks": ["posttrain_general_exact", "posttrain_general_choice"]}}})
    sampler = warm.Sampler({})
    monkeypatch.setitem(warm.SAMPLERS, json.dumps({}), sampler)
    lines: list[str] = []
    try:
        manifest = run_in_process(evaluate.STAGE, cfg, tmp_path / "eval", {}, warm.sampler_env(cfg.sampling),
                                  lines.append, model=model_dir)
    finally:
        sampler.stop()
    used = [line for line in lines if line.startswith(f"sampling {model_dir} with ")]
    assert len(used) == 2 and "a new vLLM engine" in used[0] and "the run's vLLM engine" in used[1]
    assert json.loads(manifest.path("lm_eval").read_text())["backend"] == "vllm"
    hf = tmp_path / "hf"
    hf.mkdir()
    with_hf = cfg.model_copy(update={"sampling": SETTINGS})
    metrics, _ = run_lm_eval(model_dir, AutoTokenizer.from_pretrained(model_dir), with_hf, hf)
    assert {k: v for k, v in manifest.metrics.items() if "lm_eval" in k} == pytest.approx(metrics, abs=1e-6)

    def responses(folder: Path) -> list:
        with gzip.open(folder / "lm_eval_samples.jsonl.gz", "rt") as f:
            return [(row["task"], row["doc_id"], row["filtered_resps"]) for row in map(json.loads, f)]

    for (task, doc, ours), (_, _, theirs) in zip(responses(tmp_path / "eval"), responses(hf), strict=True):
        if task == "posttrain_general_exact":
            assert ours == theirs
        else:  # each choice's log-likelihood and whether it is the greedy continuation
            assert [greedy for _, greedy in ours] == [greedy for _, greedy in theirs]
            assert [float(lp) for lp, _ in ours] == pytest.approx([float(lp) for lp, _ in theirs], abs=1e-3)


# vLLM's tensor and data parallelism

def test_the_engine_gets_the_configs_tensor_parallel_size_and_is_one_data_parallel_rank(vllm_llm):
    parallel = vllm_llm.llm_engine.vllm_config.parallel_config
    assert (parallel.tensor_parallel_size, parallel.data_parallel_size) == (1, 1)
    args = vllm_engine_args(SamplingConfig(backend="vllm", tensor_parallel_size=4, data_parallel_size=2))
    # data_parallel_size is that many engines of data-parallel size 1: vLLM's LLM refuses more.
    assert args["tensor_parallel_size"] == 4 and "data_parallel_size" not in args
    assert args["gpu_memory_utilization"] == pytest.approx(0.1)  # CPU: the engines share the RAM's 0.2
    explicit = SamplingConfig(backend="vllm", data_parallel_size=2, gpu_memory_utilization=0.3)
    assert vllm_engine_args(explicit)["gpu_memory_utilization"] == 0.3  # set: per engine


def test_shards_sampled_with_their_handed_out_seeds_equal_one_engines_completions(vllm_llm):
    # What each data-parallel rank does, on this module's engine: its share of the prompts with
    # its share of the seeds. The shards' completions, merged, are the whole run's.
    prompts = PROMPTS + ["7+7=", "9*9=", "1+2+3="]
    whole = generate_vllm(vllm_llm, prompts, SETTINGS)
    shards = shard_prompts(prompts, SETTINGS.seed, 3)
    parts = [generate_vllm(vllm_llm, part, SETTINGS, seeds) for _, part, seeds in shards]
    assert merge_shards([positions for positions, _, _ in shards], parts) == whole
    assert len({tuple(texts) for texts in whole}) > 1  # the prompts' streams differ


@pytest.mark.parametrize("count", [0, 1, 2, 7, 16])
@pytest.mark.parametrize("dp", [1, 2, 3, 8])
def test_shards_cover_each_prompt_once_with_the_single_engines_seed_and_merge_in_order(count, dp):
    prompts = [f"{i}+{i}=" for i in range(count)]
    seeds = prompt_seeds(5, count)
    assert len(set(seeds)) == count  # one stream per prompt
    shards = shard_prompts(prompts, 5, dp)
    assert len(shards) == dp
    assert shard_prompts(prompts, 5, 1) == [(list(range(count)), prompts, seeds)]  # what one engine samples
    assert sorted(i for positions, _, _ in shards for i in positions) == list(range(count))
    for positions, part, part_seeds in shards:
        assert part == [prompts[i] for i in positions] and part_seeds == [seeds[i] for i in positions]
    # Each "engine" answers with its prompt and seed: merged, they are in prompt order.
    answers = [[(p, s) for p, s in zip(part, part_seeds)] for _, part, part_seeds in shards]
    assert merge_shards([positions for positions, _, _ in shards], answers) == list(zip(prompts, seeds))
    if count:
        with pytest.raises(RuntimeError, match="returned 0 results for"):
            merge_shards([positions for positions, _, _ in shards], [[] for _ in shards])


def test_gpu_ranks_get_disjoint_devices_of_the_visible_ones():
    slices = gpu_slices(2, 2, "CUDA_VISIBLE_DEVICES", ["4", "5", "6", "7"])  # the parent's CUDA_VISIBLE_DEVICES
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slices] == ["4,5", "6,7"]
    assert all(s.env[name] is None for s in slices for name in DP_ENV)  # independent engines: VLLM_DP_* unset
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in gpu_slices(1, 8, "CUDA_VISIBLE_DEVICES", list("01234567"))] == \
        list("01234567")
    with pytest.raises(ValueError, match=r"sampling\.tensor_parallel_size x sampling\.data_parallel_size = 4 x 2 "
                                         r"= 8 devices, but 4 are visible \(CUDA_VISIBLE_DEVICES=4,5,6,7\)"):
        gpu_slices(4, 2, "CUDA_VISIBLE_DEVICES", ["4", "5", "6", "7"])


def test_cpu_ranks_get_disjoint_cores_through_vllms_bind_variable():
    # This machine's kind: 2 cores, one engine each.
    two = cpu_slices(1, 2, [(0, 0, 0), (1, 1, 0)], "auto")
    assert [(s.env[CPU_BIND_ENV], s.cores) for s in two] == [("0", (0,)), ("1", (1,))]
    # 16 logical CPUs, SMT siblings i and i + 8, NUMA nodes 0 (cores 0-3) and 1 (cores 4-7): one
    # logical CPU per core, a slice per rank, and (as vLLM's auto binding) a core per worker left
    # to the engine's scheduler process.
    smt = [(cpu, cpu % 8, cpu % 8 // 4) for cpu in range(16)]
    assert [(s.env[CPU_BIND_ENV], s.cores) for s in cpu_slices(1, 2, smt, "auto")] == \
        [("8,9,10", (8, 9, 10, 11)), ("12,13,14", (12, 13, 14, 15))]
    assert [s.env[CPU_BIND_ENV] for s in cpu_slices(2, 2, [(c, c, 0) for c in range(16)], "auto")] == \
        ["0,1,2|4,5,6", "8,9,10|12,13,14"]
    # The parent's own list, in vLLM's multi-rank form: tp x dp entries, rank-major.
    given = cpu_slices(2, 2, [], "0-3|4-7|8-11|12-15")
    assert [(s.env[CPU_BIND_ENV], s.cores) for s in given] == [("0-3|4-7", tuple(range(8))),
                                                              ("8-11|12-15", tuple(range(8, 16)))]
    assert all(CPU_BIND_ENV not in s.env for s in cpu_slices(1, 2, [(0, 0, 0), (1, 1, 0)], "nobind"))
    with pytest.raises(ValueError, match=rf"= 4 CPU workers, but {CPU_BIND_ENV}='0-3\|4-7' lists 2"):
        cpu_slices(2, 2, [], "0-3|4-7")
    with pytest.raises(ValueError, match=r"1 x 3 = 3 CPU workers, but this process may use 2 cores"):
        cpu_slices(1, 3, [(0, 0, 0), (1, 1, 0)], "auto")


# Jobs for the ranks' processes: builtins, which a spawned child unpickles without importing
# this module (and its torch).
WHAT_A_RANK_SEES = ("(lambda os: (os.environ.get('VLLM_CPU_OMP_THREADS_BIND'), os.environ.get('VLLM_DP_SIZE'), "
                    "sorted(os.sched_getaffinity(0)), os.environ.get('POSTTRAIN_STAGE')))(__import__('os'))")


def _own_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_each_rank_runs_in_its_own_process_on_its_slice(monkeypatch):
    pytest.importorskip("vllm")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 cores")
    monkeypatch.setenv("VLLM_DP_SIZE", "8")  # a parent's VLLM_DP_* would make the engines one DP group
    monkeypatch.setenv("POSTTRAIN_STAGE", "evaluate_sft")
    slices = device_slices(1, 2)
    before = dict(os.environ)
    job = (eval, (WHAT_A_RANK_SEES, {}))
    results = run_ranks({0: job, 1: job}, slices)
    assert results == {rank: (s.env[CPU_BIND_ENV], None, list(s.cores), f"evaluate_sft dp{rank}")
                       for rank, s in enumerate(slices)}
    assert set(slices[0].cores).isdisjoint(slices[1].cores)
    assert dict(os.environ) == before  # the ranks' settings did not leak into this process


RANK_1 = r"^vLLM data-parallel rank 1 of 2 \(cores 1\)"


@pytest.mark.parametrize("job, error, message", [
    # An engine that did not start stays transient (the flow retries the stage).
    ((exec, ("from pipeline.runtime.process import TransientError\n"
             "raise TransientError('the vLLM engine did not start: no memory')", {})),
     TransientError, RANK_1 + r": the vLLM engine did not start: no memory\n"),
    ((int, ("twelve",)), RuntimeError, RANK_1 + r": ValueError: invalid literal for int\(\) .*'twelve'\n"),
    ((os._exit, (3,)), RuntimeError, RANK_1 + r" ended without a result \(exit code 3\)"),  # died: no error sent
])
def test_a_failing_rank_fails_the_run_by_name_and_the_others_are_stopped(job, error, message):
    slices = [DeviceSlice({}, None, f"cores {rank}") for rank in range(2)]
    before = _own_children()
    start = time.perf_counter()
    with pytest.raises(error, match=message) as raised:
        run_ranks({0: (time.sleep, (300,)), 1: job}, slices)  # rank 0 would sleep on for 5 minutes
    assert time.perf_counter() - start < 120
    assert _own_children() <= before  # rank 0 was stopped, and no process of either is left
    if job[0] is not os._exit:  # the rank's own traceback comes along
        assert "traceback of vLLM data-parallel rank 1" in "".join(raised.value.__notes__)


def test_parallel_sizes_are_vllm_settings(tmp_path):
    assert SamplingConfig(backend="vllm", tensor_parallel_size=2, data_parallel_size=4).data_parallel_size == 4
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        SamplingConfig(backend="vllm", data_parallel_size=0)
    for key in ("tensor_parallel_size", "data_parallel_size"):
        config = tmp_path / f"{key}.yaml"
        config.write_text(f"name: x\nsampling:\n  backend: hf\n  {key}: 2\n")
        with pytest.raises(ConfigError, match=rf":4: sampling\.{key}: {key} = 2 is a vLLM setting: with "
                                              r"sampling\.backend hf .* set it to 1, or use backend vllm"):
            load_config(config)

