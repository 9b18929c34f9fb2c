"""Data sets: JSONL files or hub data sets, loaded as `datasets.Dataset`, checked row by row.

SFT rows are prompt/completion (strings, or chat messages) or `messages`; evaluation rows
are prompt/answer (an optional `id` and `task`), or, for the `code` verifier, HumanEval's
prompt/test/entry_point (`test` defines `check(candidate)`); preference rows are
prompt/chosen/rejected. A `.jsonl.gz` file is read as its JSONL.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import EVAL_SUITES, DataSource, PipelineConfig
from pipeline.hub import check_hub_models
from pipeline.lm_eval_suite import check_lm_eval
from pipeline.manifest import atomic_write_text, digest

if TYPE_CHECKING:  # `datasets` takes most of a second to import; checking data does not need it
    from datasets import Dataset

SFT_FIELDS = [{"prompt", "completion"}, {"messages"}]
EVAL_FIELDS = [{"prompt", "answer"}]
CODE_FIELDS = [{"prompt", "test", "entry_point"}]  # HumanEval's; an SFT row may add its completion
PREFERENCE_FIELDS = [{"prompt", "chosen", "rejected"}]
# Training prompts to sample from: with the answer to check samples against, or the SFT row itself.
TRAIN_PROMPT_FIELDS = [{"prompt", "answer"}, *SFT_FIELDS]


class DataError(ValueError):
    """Bad data; the message names the file (or hub data set) and line or row."""


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path, accepted: list[set[str]] | None = None, max_line_bytes: int | None = None) -> list[dict]:
    """Rows of a JSONL file; with `accepted`, each must hold one of those field sets; a line longer
    than `max_line_bytes` is an error before it is read whole."""
    return list(iter_jsonl(path, accepted, max_line_bytes))


def iter_jsonl(path: Path, accepted: list[set[str]] | None = None, max_line_bytes: int | None = None) -> Iterator[dict]:
    """`read_jsonl` one row at a time, so that checking a large file does not hold it."""
    # Parsed here rather than by `load_dataset("json")`, whose errors name neither line nor field.
    count = 0
    first = None
    with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as f:
        lines = iter(lambda: f.readline(-1 if max_line_bytes is None else max_line_bytes + 1), b"")
        for number, raw in enumerate(lines, start=1):
            if max_line_bytes is not None and len(raw.rstrip(b"\r\n")) > max_line_bytes:
                raise DataError(f"{path}:{number}: the line is longer than {max_line_bytes} bytes (the data set's "
                                "max_line_bytes): split the row, or raise max_line_bytes")
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{number}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: malformed JSON: {error.msg} (column {error.colno})") from None
            if accepted:
                fields = check_row(row, f"{path}:{number}", accepted)
                first = first or (fields, row)
                # A Dataset takes its columns from the first row, and a column is text or chats, not both.
                if fields != first[0]:
                    raise DataError(f"{path}:{number}: has {'/'.join(sorted(fields))} rows, the rows before it "
                                    f"{'/'.join(sorted(first[0]))}: use one format per file")
                mixed = [f for f in sorted(fields) if isinstance(row[f], str) != isinstance(first[1][f], str)]
                if mixed:
                    kind = lambda v: "a string" if isinstance(v, str) else "a chat (message list)"  # noqa: E731
                    raise DataError(f"{path}:{number}: field '{mixed[0]}' is {kind(row[mixed[0]])}, in the rows "
                                    f"before it {kind(first[1][mixed[0]])}: use one format per file")
            count += 1
            yield row
    if not count:
        raise DataError(f"{path}: the data set is empty")


def check_row(row: object, at: str, accepted: list[set[str]]) -> set[str]:
    """The row has one of the accepted field sets, each a string or message list (a non-empty prompt)."""
    if not isinstance(row, dict):
        raise DataError(f"{at}: each row must be a JSON object, got {type(row).__name__}")
    fields = next((f for f in accepted if f <= row.keys()), None)
    if fields is None:
        options = " or ".join("/".join(sorted(f)) for f in accepted)
        raise DataError(f"{at}: missing fields: expected {options}, got {', '.join(sorted(row)) or 'none'}: "
                        "give every row one of these field sets (rename the fields to match)")
    for name in fields:
        value = row[name]
        # An empty answer is an answer (a model that stops at once); an empty prompt is a broken row.
        if not isinstance(value, (str, list)) or (not value and name in ("prompt", "messages")):
            raise DataError(f"{at}: field '{name}' must be a {'non-empty ' if name in ('prompt', 'messages') else ''}"
                            "string or message list")
        if name == "answer" and not isinstance(value, str):
            raise DataError(f"{at}: field 'answer' must be a string: the reference a completion is checked against")
    return fields


def scored_fields(source: DataSource, fields: list[set[str]]) -> list[set[str]]:
    """The fields rows scored by the source's verifier need: a code problem's, or ``fields``."""
    return CODE_FIELDS if source.verifier == "code" else fields


def reference(row: dict) -> str | dict:
    """What a verifier checks a completion against: the row's answer, or the code problem."""
    if "answer" in row:
        return row["answer"]
    return {"prompt": row["prompt"], "test": row["test"], "entry_point": row["entry_point"]}


def load_rows(source: DataSource, accepted: list[set[str]]) -> Dataset:
    from datasets import Dataset, load_dataset

    if source.file is not None:
        return Dataset.from_list(read_jsonl(source.file, accepted, source.max_line_bytes))
    dataset = load_dataset(source.hub, split=source.split)
    where = f"hub data set {source.hub} ({source.split})"
    if len(dataset) == 0:
        raise DataError(f"{where}: the data set is empty")
    for i, row in enumerate(dataset):
        check_row(row, f"{where} row {i}", accepted)
    return dataset


def prompt_and_answer(row: dict) -> dict:
    """A training row as a prompt with the answer its samples are checked against: its `answer`,
    else its reference completion (the last assistant turn of a `messages` row)."""
    row = {k: v for k, v in row.items() if v is not None}  # a Dataset gives every row every column
    if ("answer" in row or "test" in row) and "prompt" in row:  # a code problem is its own reference
        return {k: v for k, v in row.items() if k != "completion"}
    if "prompt" in row:
        completion = row["completion"]
        answer = completion if isinstance(completion, str) else completion[-1]["content"]
        return {k: v for k, v in row.items() if k != "completion"} | {"answer": answer}
    messages = row["messages"]
    return {k: v for k, v in row.items() if k != "messages"} | {"prompt": messages[:-1], "answer": messages[-1]["content"]}


def check_inputs(cfg: PipelineConfig) -> None:
    """Everything a run reads, checked before any stage runs: every local data set of the config,
    row by row (hub data sets are checked when their stage loads them); the models and tokenizer
    named by hub id; the lm-eval tasks' names and that their data can be read."""
    sources = [(cfg.data.sft, SFT_FIELDS), (cfg.data.preference, PREFERENCE_FIELDS),
               (cfg.pairs.prompts, TRAIN_PROMPT_FIELDS)]
    sources += [(getattr(cfg.data, key), EVAL_FIELDS) for key in EVAL_SUITES.values()]
    for source, fields in sources:
        if source is not None and source.file is not None:
            for _ in iter_jsonl(source.file, scored_fields(source, fields), source.max_line_bytes):
                pass
    check_hub_models(cfg)
    check_lm_eval(cfg)


def source_digest(source: DataSource) -> str:
    """What identifies a data source in a stage key: the file's content digest, or hub name and split."""
    return digest(source.file) if source.file else f"hub:{source.hub}:{source.split}"
