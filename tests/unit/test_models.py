"""The model and tokenizer as `model:` says: loading options, and the chat template chat data is
rendered with, the same in training (TRL renders it) and in sampling."""

import json

import pytest
from datasets import Dataset

from pipeline.config.schema import ModelConfig
from pipeline.models.loading import load_causal_lm, load_tokenizer, rendered_prompts, with_chat_template_kwargs

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]


def tiny_qwen3(folder):
    """A tiny Qwen3 with the chat world's byte-level BPE tokenizer (trained here) and no chat
    template, saved in `folder` as a downloaded model is."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from pipeline.demo.world import build_bpe_tokenizer

    tokenizer = build_bpe_tokenizer(["Be brief. 2+2? It is 4.", "think about it"] * 20)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=16)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_qwen3(tmp_path_factory.mktemp("qwen3"))


def test_a_shipped_template_renders_chats_with_the_variables_the_config_gives(model_dir):
    model = ModelConfig(path=str(model_dir), chat_template="chatml", chat_template_kwargs={"enable_thinking": False})
    assert load_tokenizer(model_dir, ModelConfig(path=str(model_dir))).chat_template is None  # the folder has none
    assert rendered_prompts([CHAT, "plain"], model_dir, model) == [
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
        "<think>\n\n</think>\n\n", "plain"]
    thinking = rendered_prompts([CHAT], model_dir, model.model_copy(update={"chat_template_kwargs": {}}))
    assert thinking[0].endswith("<|im_start|>assistant\n")
    assert rendered_prompts([CHAT], model_dir, ModelConfig(path=str(model_dir))) == [CHAT]  # left to the backend


def test_trl_renders_training_rows_with_the_same_template_and_variables(model_dir, tmp_path):
    """What SFT trains on is what sampling gives the model: TRL reads each row's
    chat_template_kwargs, and the tokenizer carries the configured template."""
    from trl import SFTConfig, SFTTrainer

    from pipeline.models.loading import load_causal_lm

    model = ModelConfig(path=str(model_dir), chat_template="chatml", chat_template_kwargs={"enable_thinking": False})
    rows = with_chat_template_kwargs(Dataset.from_list([{"prompt": CHAT, "completion": [
        {"role": "assistant", "content": "It is 4."}]}]), model)
    assert rows[0]["chat_template_kwargs"] == {"enable_thinking": False}
    tokenizer = load_tokenizer(model_dir, model)
    trainer = SFTTrainer(model=load_causal_lm(model_dir, model), processing_class=tokenizer, train_dataset=rows,
                         args=SFTConfig(output_dir=str(tmp_path), report_to="none", max_steps=1, bf16=False))
    row = trainer.train_dataset[0]  # the prompt's labels are -100: not trained on
    prompt = [i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label == -100]
    completion = [i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    assert tokenizer.decode(prompt) == rendered_prompts([CHAT], model_dir, model)[0]  # what sampling gives it
    assert tokenizer.decode(completion) == "It is 4.<|im_end|>\n"


def test_loading_options_reach_the_model(model_dir):
    import torch

    loaded = load_causal_lm(model_dir, ModelConfig(path=str(model_dir), dtype="bfloat16", attn_implementation="eager"))
    assert loaded.dtype == torch.bfloat16 and loaded.config._attn_implementation == "eager"


def test_the_model_settings_enter_the_stage_keys_only_where_they_are_set(tmp_path, model_dir):
    assert ModelConfig().key_settings() == {"tokenizer": "None"}  # the keys made before these settings exist
    template = tmp_path / "mine.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    first = ModelConfig(chat_template=str(template), chat_template_kwargs={"enable_thinking": False}).key_settings()
    assert first["model"]["chat_template_kwargs"] == {"enable_thinking": False}
    template.write_text("{{ messages[-1]['content'] }}")  # an edited template is another template
    assert ModelConfig(chat_template=str(template), chat_template_kwargs={"enable_thinking": False}).key_settings() \
        != first


@pytest.mark.parametrize("settings, error", [
    ({"chat_template": "chatmx"}, r"'chatmx' is neither a chat template posttrain ships \(chatml\) nor a \.jinja"),
    ({"chat_template": "absent.jinja"}, "no chat template file at absent.jinja"),
])
def test_a_chat_template_that_is_not_there_is_refused(settings, error):
    with pytest.raises(ValueError, match=error):
        ModelConfig(**settings)


def test_a_model_with_its_own_code_needs_trust_remote_code(tmp_path, model_dir):
    folder = tmp_path / "custom"
    folder.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "my_lm", "architectures": ["MyLM"],
                                                             "auto_map": {"AutoModelForCausalLM": "modeling.MyLM"}}))
    (folder / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"runs its own code .*set model\.trust_remote_code: true if you trust it"):
        ModelConfig(path=str(folder))
    assert ModelConfig(path=str(folder), trust_remote_code=True).trust_remote_code


def test_validate_finds_a_missing_tokenizer_or_chat_template_before_any_stage(model_dir, tmp_path):
    import shutil

    from pipeline.config.schema import ConfigError, parse_config
    from pipeline.data.sources import write_jsonl
    from pipeline.orchestration.checks import check_inputs

    chats, strings = tmp_path / "chats.jsonl", tmp_path / "strings.jsonl"
    write_jsonl(chats, [{"prompt": CHAT, "completion": [{"role": "assistant", "content": "4"}], "answer": "4"}])
    write_jsonl(strings, [{"prompt": "2+2=", "completion": "4", "answer": "4"}])

    def config(model, data, **settings):
        return parse_config({"name": "x", "model": {"path": str(model), **settings},
                             "data": {k: {"path": str(data)} for k in ("sft", "target_eval", "general_eval")}})

    check_inputs(config(model_dir, strings))  # strings need no template
    with pytest.raises(ConfigError, match=r"model\.path: the tokenizer of .* has no chat template, and the data holds "
                                          r"chats: set model\.chat_template"):
        check_inputs(config(model_dir, chats))
    check_inputs(config(model_dir, chats, chat_template="chatml"))
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    with pytest.raises(ConfigError, match=r"model\.path: .*bare holds no tokenizer \(tokenizer\.json, "):
        check_inputs(config(bare, strings))


def test_settings_added_since_leave_the_keys_of_configs_that_do_not_set_them_as_they_were():
    """A new option at its default must not make every cached result stale: the stage settings of
    a config that sets none of them hold none of them."""
    from pipeline.config.schema import parse_config
    from stages import demo_data, dpo, evaluate, pretrain, sample, sft

    cfg = parse_config({"name": "x", "sft": {"lora": {"r": 8}}, "dpo": {"lora": {"r": 4, "lora_dropout": 0.1}}})
    assert sft.settings(cfg)["sft"]["lora"] == {"r": 8, "lora_alpha": 32, "target_modules": "all-linear"}
    assert dpo.settings(cfg)["dpo"]["lora"] == {"r": 4, "lora_alpha": 32, "target_modules": "all-linear",
                                                "lora_dropout": 0.1}
    assert "world" not in demo_data.settings(cfg)["demo"] and "world" not in pretrain.settings(cfg)["demo"]
    for stage in (sft, dpo, evaluate, sample):
        assert "model" not in stage.settings(cfg)
    chat = parse_config({"name": "x", "demo": {"world": "chat"}, "model": {"dtype": "bfloat16"},
                         "sft": {"lora": {"load_in_4bit": True}}})
    assert demo_data.settings(chat)["demo"]["world"] == pretrain.settings(chat)["demo"]["world"] == "chat"
    assert sft.settings(chat)["model"] == {"dtype": "bfloat16"} and sft.settings(chat)["sft"]["lora"]["load_in_4bit"]
    assert "model" not in evaluate.settings(chat)  # sampling does not read the training dtype


def test_qlora_loads_4_bits_on_each_process_own_device(model_dir, monkeypatch):
    """The options the 4-bit load is given (bitsandbytes needs a CUDA GPU: from_pretrained is
    stood in for)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.config.schema import LoraConfig

    given = {}
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda path, **options: given.update(options))
    load_causal_lm(model_dir, ModelConfig(path=str(model_dir), trust_remote_code=True),
                   LoraConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", use_bnb_nested_quant=True))
    quantization = given.pop("quantization_config")
    assert given == {"dtype": torch.bfloat16, "trust_remote_code": True, "device_map": {"": 0}}
    assert quantization.load_in_4bit and quantization.bnb_4bit_quant_type == "fp4"
    assert quantization.bnb_4bit_use_double_quant and quantization.bnb_4bit_compute_dtype == torch.bfloat16


def test_a_qlora_model_is_merged_into_its_base_loaded_again_unquantized(model_dir, tmp_path):
    """`merged` on a 4-bit model reloads the base in the compute dtype and merges the adapter
    there. Stood in for by a float model marked as 4-bit (bitsandbytes needs a CUDA GPU): its
    merge must equal peft's merge of the same adapter, and its config carry no quantization."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model
    from transformers import BitsAndBytesConfig

    from pipeline.training.train import merged

    torch.manual_seed(0)
    base = ModelConfig(path=str(model_dir))
    model = get_peft_model(load_causal_lm(model_dir, base), PeftLoraConfig(
        task_type="CAUSAL_LM", r=4, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    expected = PeftModel.from_pretrained(load_causal_lm(model_dir, base), tmp_path / "adapter").merge_and_unload()
    inner = model.get_base_model()
    inner.is_loaded_in_4bit = True
    inner.config.quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    result = merged(model)
    assert result is not inner and not hasattr(result.config, "quantization_config")  # loaded again, unquantized
    for name, weight in expected.state_dict().items():
        torch.testing.assert_close(result.state_dict()[name], weight, msg=name)
    assert any(not torch.equal(weight, load_causal_lm(model_dir, base).state_dict()[name])
               for name, weight in expected.state_dict().items())  # the adapter changed something
