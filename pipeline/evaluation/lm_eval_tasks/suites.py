"""The data of the project's own lm-eval tasks: the pipeline's general suite (`data.general_eval`,
rows with a `prompt` and an `answer`), which the evaluate stage names in the TaskManager's
metadata as `general_eval`. lm-eval passes that metadata to a task's `custom_dataset`."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import datasets

from pipeline.data import iter_jsonl

DISTRACTORS = 3  # wrong choices per question of the multiple-choice task


def general_eval(general_eval: str | None = None, **_: Any) -> datasets.DatasetDict:
    """The suite's rows as lm-eval's test split."""
    if general_eval is None:
        raise ValueError("this task reads the pipeline's general suite: run it through posttrain's evaluate stage "
                         "(its TaskManager metadata names data.general_eval)")
    rows = [{"prompt": r["prompt"], "answer": r["answer"], "task": r.get("task") or ""}
            for r in iter_jsonl(Path(general_eval), [{"prompt", "answer"}])]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def general_eval_choices(**kwargs: Any) -> datasets.DatasetDict:
    """The suite as multiple choice: each row's answer among the answers of other rows of the same
    task (the wrong choices), drawn and placed by a generator seeded with the row's position, so the
    choices are the same in every run."""
    rows = general_eval(**kwargs)["test"].to_list()
    answers: dict[str, list[str]] = {}
    for row in rows:
        answers.setdefault(row["task"], []).append(row["answer"])
    for i, row in enumerate(rows):
        rng = random.Random(i)
        others = sorted({a for a in answers[row["task"]] if a != row["answer"]})
        choices = rng.sample(others, min(DISTRACTORS, len(others)))
        row["gold"] = rng.randrange(len(choices) + 1)
        choices.insert(row["gold"], row["answer"])
        row["choices"] = choices
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
