import random

import pytest
from transformers import AutoTokenizer

from pipeline.demo import CHARACTERS, build_tokenizer
from pipeline.tasks import DOMAIN_TASKS, GENERAL_TASKS, generate, make_splits
from pipeline.verifiers import verify_exact


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
        prompt, answer = GENERAL_TASKS["add"](rng)
        a, b = prompt[:-1].split("+")
        assert int(answer) == int(a) + int(b)
        prompt, answer = DOMAIN_TASKS["mul_reversed"](rng)
        a, b = prompt[:-1].split("*")
        assert int(answer[::-1]) == int(a) * int(b)  # least significant digit first
        prompt, answer = GENERAL_TASKS["sort"](rng)
        assert answer == "".join(sorted(prompt[5:-1]))


def test_splits_are_disjoint_balanced_and_reproducible():
    splits = make_splits(seed=3, train=400, domain_train=100, test=20)
    again = make_splits(seed=3, train=400, domain_train=100, test=20)
    assert splits == again
    assert len(splits["general_test"]) == 20 * len(GENERAL_TASKS)
    train_prompts = {e["prompt"] for e in splits["general_train"]}
    assert not train_prompts & {e["prompt"] for e in splits["general_test"]}
    assert not {e["prompt"] for e in splits["domain_train"]} & {e["prompt"] for e in splits["domain_test"]}
    tasks = [e["task"] for e in splits["general_train"]]
    assert {tasks.count(t) for t in GENERAL_TASKS} == {100}


def test_generate_refuses_impossible_requests():
    tiny = {"one": lambda rng: ("same=", "1")}
    with pytest.raises(ValueError, match="too few exist"):
        generate(tiny, 5, seed=0)
