import random

import pytest
from transformers import AutoTokenizer

from pipeline.demo.tasks import DOMAIN_TASKS, GENERAL_TASKS, generate, make_splits
from pipeline.demo.world import CHARACTERS, build_tokenizer
from pipeline.evaluation.verifiers import verify_exact


def test_tokenizer_round_trips_every_character_and_loads_with_auto(tmp_path):
    tokenizer = build_tokenizer()
    text = CHARACTERS + "12+345=357"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.decode(loaded("rev abc=cba")["input_ids"]) == "rev abc=cba"
    assert loaded.eos_token == "<eos>" and loaded.pad_token == "<pad>"
    assert loaded("é")["input_ids"] == [loaded.unk_token_id]


def test_chat_template_formats_a_conversation():
    tokenizer = build_tokenizer()
    chat = [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == "<|user|>2+2=<|assistant|>4<eos>"
    prompt = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>")


@pytest.mark.parametrize("name", sorted(GENERAL_TASKS) + sorted(DOMAIN_TASKS))
def test_each_task_generates_checkable_answers(name):
    task = {**GENERAL_TASKS, **DOMAIN_TASKS}[name]
    rng = random.Random(0)
    for _ in range(200):
        prompt, answer = task(rng)
        assert prompt.endswith("=") and answer
        assert verify_exact(answer, answer) and verify_exact(answer + "<eos>junk", answer)
        assert not verify_exact(answer + "9", answer)


def test_answers_are_right():
    rng = random.Random(1)
    for _ in range(100):
        prompt, answer = GENERAL_TASKS["upper"](rng)
        assert answer == prompt[3:-1].upper()
        prompt, answer = GENERAL_TASKS["sort"](rng)
        assert answer == "".join(sorted(prompt[5:-1]))
        prompt, answer = GENERAL_TASKS["count"](rng)
        letter, word = prompt[6], prompt.split(" in ")[1][:-1]
        assert answer == str(word.count(letter))
        prompt, answer = DOMAIN_TASKS["dsort"](rng)
        digits = prompt[6:-1]
        assert answer == "".join(sorted(digits, reverse=True)) and sorted(answer) == sorted(digits)


def test_splits_are_disjoint_balanced_and_reproducible():
    splits = make_splits(seed=3, train=400, domain_train=100, test=20, val=10, replay=0.2)
    again = make_splits(seed=3, train=400, domain_train=100, test=20, val=10, replay=0.2)
    assert splits == again
    assert len(splits["general_test"]) == 20 * len(GENERAL_TASKS)
    assert len(splits["general_val"]) == 10 * len(GENERAL_TASKS) and len(splits["domain_val"]) == 10
    prompts = {name: {e["prompt"] for e in rows} for name, rows in splits.items()}
    for held in ("general_test", "general_val"):
        assert not prompts["general_train"] & prompts[held]
    assert not prompts["general_test"] & prompts["general_val"]
    assert not prompts["domain_test"] & prompts["domain_val"]
    assert not prompts["sft_train"] & (prompts["domain_test"] | prompts["domain_val"] | prompts["general_test"]
                                       | prompts["general_val"])
    tasks = [e["task"] for e in splits["general_train"]]
    assert {tasks.count(t) for t in GENERAL_TASKS} == {100}
    # replay: 20% of the SFT rows are pretraining rows, shuffled in among the 100 domain rows
    sft = splits["sft_train"]
    replayed = [e for e in sft if e["task"] in GENERAL_TASKS]
    assert len(sft) == 125 and len(replayed) == 25
    assert all(e in splits["general_train"] for e in replayed)
    assert min(i for i, e in enumerate(sft) if e["task"] in GENERAL_TASKS) < 100  # shuffled, not appended
    plain = make_splits(seed=3, train=400, domain_train=100, test=20)
    assert len(plain["sft_train"]) == 100 and {e["task"] for e in plain["sft_train"]} == set(DOMAIN_TASKS)
    assert "general_val" not in plain and "domain_val" not in plain  # val=0: no validation split


def test_generate_refuses_impossible_requests():
    tiny = {"one": lambda rng: ("same=", "1")}
    with pytest.raises(ValueError, match="too few exist"):
        generate(tiny, 5, seed=0)


def test_replay_beyond_the_pretraining_data_is_refused_naming_the_key():
    from pipeline.config.schema import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"demo\.general_replay: general_replay 0\.95 wants 38000 replay rows, "
                                          r"more than the 24000 pretraining rows \(train_examples\): at most 0\.923"):
        parse_config({"name": "x", "demo": {"general_replay": 0.95}})
    parse_config({"name": "x", "demo": {"general_replay": 0.9}})  # 18,000 rows: enough exist
