import re
from pathlib import Path

import pytest
import yaml

from pipeline.config.schema import ConfigError, load_config, parse_config
from pipeline.sandbox import isolation

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_are_valid():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.is_demo and cfg.sft.loss.name == "ce" and cfg.demo.world == "characters"
    assert cfg.pretrain.trainer["per_device_train_batch_size"] > 0
    chat = load_config(REPO / "configs" / "demo-chat.yaml")
    assert chat.is_demo and chat.demo.world == "chat" and chat.demo.verifier == "math"


@pytest.mark.parametrize("example", ["qwen3-gsm8k.yaml", "qwen3-humaneval.yaml"])
def test_real_model_examples_need_their_files(example):
    # The GPU examples name files that exist only on a GPU box: the error must say which key.
    with pytest.raises(ConfigError, match=r"data\.(sft|general_eval).*file not found"):
        load_config(REPO / "configs" / example)


@pytest.mark.parametrize("example", ["qwen3-gsm8k.yaml", "qwen3-humaneval.yaml"])
def test_real_model_examples_are_valid_where_their_files_are(example, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = (REPO / "configs" / example).read_text().replace("/models/Qwen3-4B-Base", "Qwen/Qwen3-4B-Base")
    for line in text.splitlines():
        if line.strip().startswith("path: data/"):
            (tmp_path / line.split()[1]).parent.mkdir(exist_ok=True)
            (tmp_path / line.split()[1]).write_text("")
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the accelerate config
    cfg = load_config(write(tmp_path, text))
    assert not cfg.is_demo and cfg.sampling.n == 32


def test_misspelt_key_names_path_line_and_suggestion(tmp_path):
    path = write(tmp_path, "name: x\nsft:\n  loss:\n    name: ce\n  trainr: {}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert f"{path}:5" in message and "sft.trainr" in message
    assert "allowed here: trainer, loss, lora" in message and "did you mean 'trainer'" in message


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r":3: sampling\.n: .*integer.*'many'"):
        load_config(write(tmp_path, "name: x\nsampling:\n  n: many\n"))


def test_unknown_loss_lists_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"sft\.loss.*eksft"):
        load_config(write(tmp_path, "name: x\nsft:\n  loss:\n    name: eksfd\n"))


def test_unknown_loss_parameter_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"sft\.loss.*ratio"):
        load_config(write(tmp_path, "name: x\nsft:\n  loss:\n    name: eksft\n    ratoi: 0.3\n"))


def test_trainer_options_are_checked_against_trl(tmp_path):
    path = write(tmp_path, "name: x\nsft:\n  trainer:\n    learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"pipeline.yaml:4: sft\.trainer\.learning_rat: .*SFTConfig.*learning_rate"):
        load_config(path)
    ok = load_config(write(tmp_path, "name: x\nsft:\n  trainer:\n    learning_rate: 0.1\n    max_length: 32\n"))
    assert ok.sft.trainer == {"learning_rate": 0.1, "max_length": 32}


def test_trainer_option_of_wrong_type_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"sft\.trainer\.max_steps: expected int"):
        load_config(write(tmp_path, "name: x\nsft:\n  trainer:\n    max_steps: lots\n"))


def test_pipeline_owned_trainer_key_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"sft\.trainer\.output_dir: set by the pipeline"):
        load_config(write(tmp_path, "name: x\nsft:\n  trainer:\n    output_dir: /tmp/x\n"))


def test_missing_data_file_names_key(tmp_path):
    text = "name: x\ndata:\n  sft:\n    path: nowhere.jsonl\n"
    with pytest.raises(ConfigError, match=r"pipeline.yaml:3: data\.sft: file not found: nowhere\.jsonl"):
        load_config(write(tmp_path, text))


def test_real_model_needs_its_data(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.sft, data\.target_eval, data\.general_eval"):
        load_config(write(tmp_path, "name: x\nmodel:\n  path: org/model\n"))


def test_a_local_model_folder_that_is_not_there_is_named_but_a_hub_id_is_accepted(tmp_path):
    data = "data: {sft: {hub: a/b}, target_eval: {hub: a/c}, general_eval: {hub: a/d}}\n"
    with pytest.raises(ConfigError, match=r"pipeline\.yaml:4: model\.path: no model folder at /models/nowhere"):
        load_config(write(tmp_path, "name: x\n" + data + "model:\n  path: /models/nowhere\n"))
    assert load_config(write(tmp_path, "name: x\n" + data + "model:\n  path: Qwen/Qwen3-4B-Base\n")).model.path == "Qwen/Qwen3-4B-Base"


def test_k_larger_than_n_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"evaluate\.ks.*sampling\.n \(= 4\).*K = 8"):
        load_config(write(tmp_path, "name: x\nsampling:\n  n: 4\nevaluate:\n  ks: [1, 8]\n"))


def test_demo_head_dim_must_be_64(tmp_path):
    with pytest.raises(ConfigError, match=r"demo: .*head_dim 64"):
        load_config(write(tmp_path, "name: x\ndemo:\n  hidden_size: 128\n  num_heads: 4\n"))


def test_missing_required_key_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"name: Field required"):
        load_config(write(tmp_path, "seed: 1\n"))
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ConfigError, match=r"config file not found"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("backend", ["auto", "hf", "vllm"])
def test_round_trip_through_json_keeps_everything(backend):
    """As a stage process reads its config back from the request: every default written out."""
    from pipeline.config.schema import PipelineConfig

    cfg = load_config(REPO / "configs" / "demo.yaml", [f"sampling.backend={backend}"])
    again = PipelineConfig.model_validate(cfg.model_dump(mode="json"))
    assert again == cfg
    assert yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["name"] == again.name


def test_code_verifier_needs_explicit_opt_in_and_a_sandbox(tmp_path, monkeypatch):
    (tmp_path / "code.jsonl").write_text('{"prompt": "def f():", "test": "def check(c): pass", "entry_point": "f"}\n')
    text = f"name: x\ndata:\n  target_eval:\n    path: {tmp_path / 'code.jsonl'}\n    verifier: code\n"
    with pytest.raises(ConfigError, match=r"data\.target_eval\.verifier is 'code'.*allow_untrusted_code: true"):
        load_config(write(tmp_path, text))
    cfg = load_config(write(tmp_path, text + "evaluate:\n  allow_untrusted_code: true\n"))
    assert cfg.evaluate.allow_untrusted_code and cfg.evaluate.code_isolation == "bubblewrap"
    monkeypatch.setattr(isolation, "sandbox_problem", lambda: "bubblewrap (bwrap) is not installed: install it")
    with pytest.raises(ConfigError, match=r"data\.target_eval\.verifier is 'code'.*bwrap\) is not installed"):
        load_config(write(tmp_path, text + "evaluate:\n  allow_untrusted_code: true\n"))
    unsafe = load_config(write(tmp_path, text + "evaluate:\n  allow_untrusted_code: true\n  code_isolation: none\n"))
    assert unsafe.evaluate.code_isolation == "none"


def test_humaneval_is_a_shipped_suite_of_code_problems(tmp_path):
    text = "name: x\ndata:\n  general_eval:\n    suite: humaneval\n"
    with pytest.raises(ConfigError, match=r"data\.general_eval.*suite humaneval holds code problems: set verifier: code"):
        load_config(write(tmp_path, text))
    cfg = load_config(write(tmp_path, text + "    verifier: code\nevaluate:\n  allow_untrusted_code: true\n"))
    assert cfg.data.general_eval.file.name == "HumanEval.jsonl.gz" and cfg.data.general_eval.file.is_file()
    with pytest.raises(ConfigError, match="exactly one of 'path'.*'hub'.*'suite'"):
        load_config(write(tmp_path, text.replace("suite: humaneval", "suite: humaneval\n    hub: openai_humaneval")))


def test_reference_chosen_pairs_need_a_reference_answer(tmp_path):
    (tmp_path / "code.jsonl").write_text('{"prompt": "def f():", "completion": " return 1", "test": "def check(c): '
                                         'pass", "entry_point": "f"}\n')
    text = (f"name: x\ndata:\n  sft:\n    path: {tmp_path / 'code.jsonl'}\n    verifier: code\n"
            "evaluate:\n  allow_untrusted_code: true\npairs:\n  reference_chosen: true\n")
    with pytest.raises(ConfigError, match="pairs.reference_chosen.*code problems.*set pairs.reference_chosen: false"):
        load_config(write(tmp_path, text))


def test_the_readme_tour_config_is_valid(tmp_path, monkeypatch):
    tour = (REPO / "README.md").read_text().split("## A tour", 1)[1]
    block = tour.split("```yaml\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)  # its data paths are relative
    for name in ("train.jsonl", "test.jsonl", "general.jsonl"):
        (tmp_path / name).write_text('{"prompt": "1+1=", "completion": "2", "answer": "2"}\n')
    cfg = load_config(write(tmp_path, block))
    assert cfg.sft.loss.name == "eaft" and cfg.sft.trainer["max_steps"] == 300 and cfg.dpo.trainer["beta"] == 0.1


def test_shipped_accelerate_configs_are_accelerate_configs(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    kinds = {"ddp": DistributedType.MULTI_GPU, "fsdp2": DistributedType.FSDP, "zero2": DistributedType.DEEPSPEED,
             "zero3": DistributedType.DEEPSPEED}
    for name, kind in kinds.items():
        path = REPO / "configs" / "accelerate" / f"{name}.yaml"
        assert load_config_from_file(str(path)).distributed_type == kind, name
        cfg = load_config(write(tmp_path, f"name: x\nlaunch:\n  num_processes: 8\n  accelerate_config: {path}\n"))
        assert cfg.launch.shards_parameters() == (name in ("fsdp2", "zero3")), name


def test_accelerate_config_must_exist_and_lora_needs_whole_weights(tmp_path):
    with pytest.raises(ConfigError, match=r":4: launch\.accelerate_config: no accelerate config file at nope\.yaml"):
        load_config(write(tmp_path, "name: x\nlaunch:\n  num_processes: 2\n  accelerate_config: nope.yaml\n"))
    fsdp = REPO / "configs" / "accelerate" / "fsdp2.yaml"
    with pytest.raises(ConfigError, match=r"sft\.lora .*merged.*use DDP or ZeRO-2"):
        load_config(write(tmp_path, f"name: x\nsft:\n  lora: {{r: 8}}\nlaunch:\n  num_processes: 2\n"
                                    f"  accelerate_config: {fsdp}\n"))


def test_engine_layout_is_not_part_of_the_sampling_key():
    from pipeline.config.schema import SamplingConfig

    one = SamplingConfig(backend="vllm")
    spread = SamplingConfig(backend="vllm", tensor_parallel_size=2, data_parallel_size=4)
    assert spread.key_settings() == one.key_settings()
    assert SamplingConfig(backend="vllm", n=2, temperature=1.0).key_settings() != one.key_settings()


def test_the_hf_samplers_batch_order_is_part_of_its_key():
    """generate's samples depend on the order its batches draw from one random stream: an
    evaluation sampled in prompt order (before batches went by prompt length), or n > 1 samples with
    the ended rows kept to the batch's end, is not reused."""
    from pipeline.config.schema import SamplingConfig

    hf = SamplingConfig(backend="hf")
    assert hf.key_settings()["batches"] == "by prompt length, longest first"  # n = 1: one row a prompt, one call
    assert hf.model_copy(update={"n": 8}).key_settings()["batches"] == "by prompt length, longest first; ended rows out at half"
    assert hf.model_copy(update={"batch_size": 16}).key_settings() != hf.key_settings()
    vllm = SamplingConfig(backend="vllm")  # seeded per prompt: its batches do not matter
    assert "batches" not in vllm.key_settings()
    assert vllm.model_copy(update={"batch_size": 16}).key_settings() == vllm.key_settings()


@pytest.mark.parametrize("trainer, error", [
    ("max_steps: -5", r"sft\.trainer\.max_steps: must be a finite number, 0 or more \(or -1: off\), got -5"),
    ("max_steps: 0", r"sft\.trainer\.max_steps: must be greater than 0"),
    ("learning_rate: -1.0e-4", r"sft\.trainer\.learning_rate: must be a finite number, 0 or more, got -0\.0001"),
    ("learning_rate: 0", r"sft\.trainer\.learning_rate: must be greater than 0, got 0"),
    ("per_device_train_batch_size: 0", r"sft\.trainer\.per_device_train_batch_size: must be greater than 0"),
    ("adam_beta2: 1.5", r"sft\.trainer\.adam_beta2: must be in \[0, 1\)"),
])
def test_trainer_numbers_out_of_range_are_refused_naming_the_key(tmp_path, trainer, error):
    with pytest.raises(ConfigError, match=error):
        load_config(write(tmp_path, f"name: x\nsft:\n  trainer:\n    {trainer}\n"))


def numeric_trainer_fields():
    """Every number a user may set in TRL's SFTConfig and DPOConfig, with its type and default,
    read from TRL's dataclasses here (not from the pipeline's cache of them)."""
    import dataclasses
    import types
    import typing

    from trl import DPOConfig, SFTConfig

    from pipeline.config.schema import PIPELINE_OWNED_TRAINER_KEYS

    for stage, cls in (("sft", SFTConfig), ("dpo", DPOConfig)):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints.get(f.name)
            args = set(typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,))
            if f.init and f.name not in PIPELINE_OWNED_TRAINER_KEYS[stage] and args & {int, float} and \
                    args <= {int, float, type(None)}:
                yield stage, f.name, float in args, f.default


def test_every_trainer_number_is_range_checked_naming_the_key():
    """Not a list of keys someone thought of: every numeric field of TRL's configs refuses a
    negative value (but its own negative default, -1 for 'off') and, where it is a float, NaN and
    infinity; its default passes."""
    from pipeline.config.schema import SIGNED_TRAINER_KEYS

    fields = list(numeric_trainer_fields())
    assert len(fields) > 40 and ("dpo", "beta", True, 0.1) in fields
    for stage, key, is_float, default in fields:
        bad = [float("nan"), float("inf")] if is_float else []
        if key in SIGNED_TRAINER_KEYS:  # the few whose negative values mean something
            parse_config({"name": "x", stage: {"trainer": {key: -0.5}}})
        else:
            bad.append(-3.5 if is_float else -3)
        if isinstance(default, int | float) and default < 0:
            bad.append(default - 1)
            parse_config({"name": "x", stage: {"trainer": {key: default}}})  # "off" is fine
        for value in bad:
            with pytest.raises(ConfigError, match=rf"{stage}\.trainer\.{key}: must be .*, got {value}"):
                parse_config({"name": "x", stage: {"trainer": {key: value}}})


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    text = "name: x\nsft:\n  trainer: {max_steps: 5}\npairs:\n  n: 4\nsft:\n  loss: {name: dft}\n"
    with pytest.raises(ConfigError, match=r"key 'sft' is given twice \(lines 2 and 6\): keep one"):
        load_config(write(tmp_path, text))
    merged = "name: x\ntrainer: &t {max_steps: 5}\nsft:\n  trainer:\n    <<: *t\n    learning_rate: 1.0e-4\n"
    with pytest.raises(ConfigError, match=r"trainer: unknown key"):  # the anchor's holder, not the merge
        load_config(write(tmp_path, merged))


def test_a_config_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(byte 9\): save it as UTF-8"):
        load_config(path)


def test_a_data_path_that_is_a_folder_or_too_large_is_named_so(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(ConfigError, match=r"data\.sft.*data is a folder: give the data file in it"):
        load_config(write(tmp_path, f"name: x\ndata:\n  sft:\n    path: {tmp_path / 'data'}\n"))
    (tmp_path / "data" / "sft.jsonl").write_text('{"prompt": "a", "completion": "b"}\n' * 100)
    text = f"name: x\ndata:\n  sft:\n    path: {tmp_path / 'data' / 'sft.jsonl'}\n    max_file_bytes: 1000\n"
    with pytest.raises(ConfigError, match=r"data\.sft.*sft\.jsonl is 3500 bytes, more than max_file_bytes \(1000\)"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("files, error", [
    ({}, "has no readable config.json: not a Hugging Face model"),
    ({"config.json": "[]"}, "has no readable config.json"),
    ({"config.json": '{"model_type": "bert", "architectures": ["BertModel"]}', "model.safetensors": ""},
     r"holds a BertModel, not a causal language model"),
    ({"config.json": '{"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}', "model.safetensors": ""},
     r"holds a T5ForConditionalGeneration, not a causal language model"),
    ({"config.json": '{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}', "training_args.bin": ""},
     r"has no weights"),
    ({"config.json": '{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}',
      "model-00001-of-00002.safetensors": ""}, None),
    ({"adapter_config.json": "{}", "adapter_model.safetensors": ""}, None),
])
def test_a_model_folder_must_hold_a_causal_lm(tmp_path, files, error):
    model = tmp_path / "model"
    model.mkdir()
    for name, text in files.items():
        (model / name).write_text(text)
    text = f"name: x\nmodel:\n  path: {model}\ndata: {{sft: {{hub: a/b}}, target_eval: {{hub: a/c}}, general_eval: {{hub: a/d}}}}\n"
    if error is None:  # sharded weights, a PEFT adapter
        assert load_config(write(tmp_path, text)).model.path == str(model)
        return
    with pytest.raises(ConfigError, match=rf"model\.path: .*{error}"):
        load_config(write(tmp_path, text))


def test_command_line_overrides_set_dotted_keys_typed_by_the_schema(tmp_path):
    path = write(tmp_path, "name: x\nsft:\n  trainer:\n    learning_rate: 1.0e-4\n    max_steps: 10\n")
    cfg = load_config(path, ["sft.trainer.learning_rate=1e-5", "name=0123", "evaluate.ks=[1, 4]", "seed=3",
                             "dpo.trainer.beta=0.3", "sft.loss.name=eksft", "sampling.n=4"])
    assert cfg.sft.trainer == {"learning_rate": 1e-5, "max_steps": 10}  # YAML 1.1 leaves 1e-5 text; a number here
    assert cfg.name == "0123" and cfg.seed == 3 and cfg.evaluate.ks == [1, 4]  # text where the schema wants text
    assert cfg.dpo.trainer["beta"] == 0.3 and cfg.sft.loss.name == "eksft"
    assert load_config(path, ["sft.lora.r=8"]).sft.lora.r == 8  # a section the YAML lacks is made
    assert load_config(path, ["sft.lora.r=8", "sft.lora=null"]).sft.lora is None  # null takes one away


@pytest.mark.parametrize("override, error", [
    ("seed", r"^override 'seed': expected key=value"),
    ("seed.x=1", r"^override seed.x=1: seed: Input should be a valid integer"),
    ("sft.loss.name.x=1", r"^override 'sft.loss.name.x=1': sft.loss.name is 'ce', not a section with keys"),
    ("sft.trainr.x=1", r"override sft.trainr.x=1: sft.trainr: unknown key; allowed here: trainer.*did you mean"),
    ("sampling.n=many", r"override sampling.n=many: sampling.n: .*integer.*'many'"),
    ("sft.trainer.learning_rate=-1", r"^override sft.trainer.learning_rate=-1: sft.trainer.learning_rate: must be"),
    ("sft.trainer.max_steps=[1", r"^override 'sft.trainer.max_steps=\[1': the value is not valid YAML"),
])
def test_a_bad_override_is_an_error_naming_the_override_not_a_yaml_line(tmp_path, override, error):
    path = write(tmp_path, "name: x\nsft:\n  loss: {name: ce}\n  trainer:\n    learning_rate: 1.0e-4\n"
                           "sampling:\n  n: 2\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, [override])
    message = str(raised.value).removeprefix("invalid config:\n  ")
    assert re.search(error, message), message
    assert f"{path}:" not in message  # the YAML's line of the key it replaced is not the place at fault


@pytest.mark.parametrize("report_to, error", [
    ("wandb", r"sft\.trainer\.report_to: wandb is not installed here \(pip install wandb\), or leave it out"),
    (["mlflow", "tensorbord"], r"sft\.trainer\.report_to: 'tensorbord' is not an integration of transformers: one of "
                               r"none, all, azure_ml"),
])
def test_report_to_must_name_an_installed_integration(monkeypatch, report_to, error):
    """A logger that is not installed fails only when TRL starts; caught at validate instead."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "wandb" else find_spec(name, *args))
    with pytest.raises(ConfigError, match=error):
        parse_config({"name": "x", "sft": {"trainer": {"report_to": report_to}}})


def test_report_to_accepts_installed_integrations_none_and_all():
    for value in ("none", "all", ["mlflow"], "mlflow"):
        assert parse_config({"name": "x", "dpo": {"trainer": {"report_to": value}}}).dpo.trainer["report_to"] == value


def test_qlora_settings_are_not_peft_options():
    """TRL's ModelConfig names for QLoRA, read by the model loader; peft's LoraConfig gets the rest."""
    from pipeline.config.schema import LoraConfig
    from pipeline.training.train import peft_config

    lora = LoraConfig(r=8, lora_dropout=0.1, load_in_4bit=True, bnb_4bit_quant_type="fp4")
    assert lora.peft_options() == {"r": 8, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.1}
    assert peft_config(lora).lora_dropout == 0.1 and peft_config(lora).r == 8
    with pytest.raises(ConfigError, match=r"sft\.lora\.bnb_4bit_quant_type: .*'nf4' or 'fp4'"):
        parse_config({"name": "x", "sft": {"lora": {"bnb_4bit_quant_type": "int4"}}})


def test_override_values_follow_the_keys_type_not_yaml_1_1():
    """YAML 1.1 reads `no` as false and `0123` as 83: on the command line, a value is what the
    key (or TRL's option) takes."""
    cfg = parse_config({"name": "x"}, overrides=["sft.trainer.save_strategy=no", "sft.trainer.run_name=0123",
                                                 "dpo.trainer.beta=.5", "sft.trainer.max_steps=7", "seed=010",
                                                 "sft.trainer.bf16=false", "sft.trainer.hub_model_id=nan"])
    assert cfg.sft.trainer == {"save_strategy": "no", "run_name": "0123", "max_steps": 7, "bf16": False,
                               "hub_model_id": "nan"}
    assert cfg.dpo.trainer["beta"] == 0.5 and cfg.seed == 10
    with pytest.raises(ConfigError, match=r"override sft\.trainer\.learning_rate=nan: .*learning_rate: expected float"):
        parse_config({"name": "x"}, overrides=["sft.trainer.learning_rate=nan"])


def test_auto_sampling_is_vllm_where_a_cuda_gpu_is_visible_else_generate(monkeypatch):
    import importlib.util

    from pipeline.config import schema
    from pipeline.config.schema import SamplingConfig

    auto, hf, vllm = SamplingConfig(), SamplingConfig(backend="hf"), SamplingConfig(backend="vllm")
    monkeypatch.setattr(schema, "cuda_gpu_visible", lambda: False)
    assert auto.backend == "auto" and auto.chosen_backend() == "hf" and auto.resolved() == hf
    # The key holds the backend that samples: configs that leave it out keep their keys on a CPU.
    assert auto.key_settings() == hf.key_settings() != vllm.key_settings()
    assert SamplingConfig(data_parallel_size=2).chosen_backend() == "vllm"  # only vLLM has engines to spread
    monkeypatch.setattr(schema, "cuda_gpu_visible", lambda: True)
    assert auto.chosen_backend() == "vllm" and auto.key_settings() == vllm.key_settings()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    assert auto.chosen_backend() == "hf"  # a GPU box without vLLM installed


def test_a_cuda_gpu_is_told_by_the_driver_files_unless_cuda_visible_devices_hides_them(monkeypatch, tmp_path):
    from pipeline.config import schema

    monkeypatch.setattr(schema, "DEVICES", tmp_path)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    (tmp_path / "nvidiactl").touch()  # the driver without a device
    assert not schema.cuda_gpu_visible()
    (tmp_path / "nvidia0").touch()
    assert schema.cuda_gpu_visible()
    for hidden in ("", "-1", "NoDevFiles"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert not schema.cuda_gpu_visible()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    (tmp_path / "nvidia0").unlink()
    assert not schema.cuda_gpu_visible()
    (tmp_path / "dxg").touch()  # WSL2
    assert schema.cuda_gpu_visible()
