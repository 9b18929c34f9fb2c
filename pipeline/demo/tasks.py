"""Synthetic tasks of the demo world, each with a generator and an exactly checkable answer.

The general tasks are the skills the base model must not forget; the base model learns each
of them well in pretraining (Pass@1 >= 0.9). The domain task, sorting digits in DESCENDING
order (`dsort 2715=` -> `7521`), is one the base model gets confidently wrong: after `dsort`
it writes the digits ascending, as `sort` taught it (on the demo's base model, at 87% of the
answer tokens its most likely token is another, at probability >= 0.5: `target/confident_wrong`).
Those are the "confident conflicts" the forgetting-aware losses act on, and plain SFT on them
erodes the general skills, `sort` first, then the others, in part.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

Example = dict[str, str]  # {"task", "prompt", "completion"}


def _digits(rng: random.Random) -> str:
    return "".join(rng.choices(string.digits, k=rng.randint(3, 8)))


def _upper(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8)))
    return f"up {word}=", word.upper()


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8)))
    return f"rev {word}=", word[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = _digits(rng)
    return f"sort {digits}=", "".join(sorted(digits))


def _count(rng: random.Random) -> tuple[str, str]:
    letter = rng.choice("abc")
    word = "".join(rng.choices("abcd", k=rng.randint(3, 7)))
    return f"count {letter} in {word}=", str(word.count(letter))


def _sort_descending(rng: random.Random) -> tuple[str, str]:
    digits = _digits(rng)
    return f"dsort {digits}=", "".join(sorted(digits, reverse=True))


GENERAL_TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "count": _count,
    "reverse": _reverse,
    "sort": _sort,
    "upper": _upper,
}
DOMAIN_TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {"dsort": _sort_descending}


def generate(
    tasks: dict[str, Callable[[random.Random], tuple[str, str]]],
    count: int,
    seed: int,
    exclude: set[str] = frozenset(),
) -> list[Example]:
    """`count` distinct examples spread evenly over `tasks`, none whose prompt is in `exclude`."""
    rng = random.Random(seed)
    seen = set(exclude)
    examples: list[Example] = []
    names = sorted(tasks)
    attempts = 0
    while len(examples) < count:
        attempts += 1
        if attempts > 50 * count:
            raise ValueError(f"cannot draw {count} distinct examples of {names}: too few exist")
        name = names[len(examples) % len(names)]
        prompt, answer = tasks[name](rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        examples.append({"task": name, "prompt": prompt, "completion": answer})
    return examples


def _prompts(*splits: list[Example]) -> set[str]:
    return {e["prompt"] for split in splits for e in split}


def make_splits(seed: int, train: int, domain_train: int, test: int, val: int = 0,
                replay: float = 0.0) -> dict[str, list[Example]]:
    """The demo world's data. General and domain tasks each get train, validation and test
    splits (`test` and `val` examples per task; no validation split for `val` 0), no prompt in
    two of them. `sft_train` is the
    domain's training rows plus general replay: rows of the pretraining data (`general_train`),
    `replay` of the whole, shuffled in."""
    general_test = generate(GENERAL_TASKS, test * len(GENERAL_TASKS), seed + 1)
    domain_test = generate(DOMAIN_TASKS, test * len(DOMAIN_TASKS), seed + 2)
    general_val = generate(GENERAL_TASKS, val * len(GENERAL_TASKS), seed + 4, _prompts(general_test))
    domain_val = generate(DOMAIN_TASKS, val * len(DOMAIN_TASKS), seed + 5, _prompts(domain_test))
    general_train = generate(GENERAL_TASKS, train, seed, _prompts(general_test, general_val))
    domain_rows = generate(DOMAIN_TASKS, domain_train, seed + 3, _prompts(domain_test, domain_val))
    rng = random.Random(seed + 6)
    replayed = rng.sample(general_train, round(domain_train * replay / (1 - replay)))
    sft_train = domain_rows + replayed
    rng.shuffle(sft_train)
    splits = {"general_train": general_train, "general_val": general_val, "general_test": general_test,
              "domain_val": domain_val, "domain_test": domain_test, "sft_train": sft_train}
    return {name: rows for name, rows in splits.items() if rows or not name.endswith("_val")}
