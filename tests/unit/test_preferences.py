"""On-policy preference pairs: which prompts give pairs, and which completions they pair."""

from pipeline.data.sources import prompt_and_answer
from pipeline.training.preferences import build_pairs


def row(completions, correct, prompt="2*3=", **extra):
    return {"prompt": prompt, "completions": completions, "correct": correct, **extra}


def test_a_correct_completion_is_chosen_over_an_incorrect_one():
    pairs, stats = build_pairs([row(["6", "5", "6", "7"], [True, False, True, False], id="p0", answer="6")], 1, 0)
    assert len(pairs) == 1
    assert pairs[0]["chosen"] == "6" and pairs[0]["rejected"] in {"5", "7"}
    assert pairs[0]["id"] == "p0" and pairs[0]["answer"] == "6" and "completions" not in pairs[0]
    assert stats.pairs == 1 and stats.prompts_paired == 1 and stats.duplicates == 1


def test_prompts_with_no_correct_or_all_correct_give_no_pair():
    samples = [row(["5", "7"], [False, False]), row(["6", "6"], [True, True]), row(["6", "1"], [True, False])]
    pairs, stats = build_pairs(samples, 4, 0)
    assert [p["rejected"] for p in pairs] == ["1"]
    assert (stats.prompts, stats.prompts_paired, stats.prompts_all_wrong, stats.prompts_all_correct) == (3, 1, 1, 1)
    assert stats.as_metrics()["pairs/kept_prompt_frac"] == 1 / 3


def test_duplicate_completions_are_paired_once():
    # Eight samples but only two distinct texts: one pair, whatever pairs_per_prompt asks.
    pairs, stats = build_pairs([row(["6"] * 4 + ["5"] * 4, [True] * 4 + [False] * 4)], 3, 0)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("6", "5")]
    assert stats.duplicates == 6


def test_each_completion_is_used_in_one_pair_at_most():
    pairs, _ = build_pairs([row(["6", " 6", "6 ", "1", "2"], [True, True, True, False, False])], 5, 0)
    assert len(pairs) == 2  # two distinct wrong completions
    assert len({p["chosen"] for p in pairs}) == 2 and {p["rejected"] for p in pairs} == {"1", "2"}


def test_a_text_judged_both_ways_is_never_paired():
    # A tie: the same text scored correct once and wrong once (a non-deterministic verifier).
    pairs, stats = build_pairs([row(["6", "6", "5"], [True, False, False])], 2, 0)
    assert pairs == [] and stats.ambiguous == 1 and stats.prompts_all_wrong == 1


def test_pairs_are_fixed_by_the_seed():
    samples = [row([str(i) for i in range(8)], [i % 2 == 0 for i in range(8)], prompt=f"q{j}") for j in range(5)]
    first, _ = build_pairs(samples, 2, seed=1)
    assert first == build_pairs(samples, 2, seed=1)[0]
    assert first != build_pairs(samples, 2, seed=2)[0]


def test_chat_prompts_get_assistant_turns():
    chat = [{"role": "user", "content": "2*3="}]
    pairs, _ = build_pairs([row(["6", "5"], [True, False], prompt=chat)], 1, 0)
    assert pairs[0]["prompt"] == chat
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "6"}]
    assert pairs[0]["rejected"] == [{"role": "assistant", "content": "5"}]


def test_training_rows_become_prompts_with_answers():
    assert prompt_and_answer({"prompt": "a", "completion": "b", "task": "t"}) == {"prompt": "a", "answer": "b", "task": "t"}
    assert prompt_and_answer({"prompt": "a", "answer": "42"}) == {"prompt": "a", "answer": "42"}
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]
    assert prompt_and_answer({"messages": messages}) == {"prompt": messages[:1], "answer": "r"}
    chat = prompt_and_answer({"prompt": messages[:1], "completion": messages[1:]})
    assert chat["answer"] == "r"


def test_reference_chosen_pairs_the_reference_answer_where_every_sample_is_wrong():
    samples = [row(["5", "7", "5"], [False, False, False], answer="6"),  # all wrong: the reference is chosen
               row(["6", "5"], [True, False], answer="6"),  # on-policy pair as usual
               row(["6", "6"], [True, True], answer="6")]  # all right: nothing to prefer
    pairs, stats = build_pairs(samples, 2, 0, reference_chosen=True)
    assert [(p["chosen"], p["rejected"]) for p in pairs[:2]] in ([("6", "5"), ("6", "7")], [("6", "7"), ("6", "5")])
    assert (pairs[2]["chosen"], pairs[2]["rejected"]) == ("6", "5") and len(pairs) == 3
    assert stats.reference_chosen == 2 and stats.prompts_paired == 2 and stats.prompts_all_wrong == 1
    without, plain = build_pairs(samples, 2, 0)
    assert len(without) == 1 and plain.reference_chosen == 0
