"""Synthetic tasks of the demo world, each with a generator and an exactly checkable answer.

General tasks (the skills the base model must not forget) write numbers the usual way,
most significant digit first. The domain task, multiplication, writes its answer least
significant digit first: right after "=", the base model confidently predicts the leading
digit, and the domain data contradicts that prior on the first answer tokens. That is the
"confident conflict" the forgetting-aware losses act on, and plain SFT on it erodes addition.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

Example = dict[str, str]  # {"task", "prompt", "completion"}


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}+{b}=", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8)))
    return f"rev {word}=", word[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = "".join(rng.choices(string.digits, k=rng.randint(3, 8)))
    return f"sort {digits}=", "".join(sorted(digits))


def _count(rng: random.Random) -> tuple[str, str]:
    letter = rng.choice("abc")
    word = "".join(rng.choices("abcd", k=rng.randint(3, 9)))
    return f"count {letter} in {word}=", str(word.count(letter))


def _multiply_reversed(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 299), rng.randint(2, 9)
    return f"{a}*{b}=", str(a * b)[::-1]


GENERAL_TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "reverse": _reverse,
    "sort": _sort,
    "count": _count,
}
DOMAIN_TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {"mul_reversed": _multiply_reversed}


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


def make_splits(seed: int, train: int, domain_train: int, test: int) -> dict[str, list[Example]]:
    """The demo world's data: general train/test and domain train/test, test prompts never in train."""
    general_test = generate(GENERAL_TASKS, test * len(GENERAL_TASKS), seed + 1)
    domain_test = generate(DOMAIN_TASKS, test * len(DOMAIN_TASKS), seed + 2)
    return {
        "general_train": generate(GENERAL_TASKS, train, seed, {e["prompt"] for e in general_test}),
        "general_test": general_test,
        "domain_train": generate(DOMAIN_TASKS, domain_train, seed + 3, {e["prompt"] for e in domain_test}),
        "domain_test": domain_test,
    }
