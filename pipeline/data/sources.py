"""Data sets: local files (JSONL, JSON, Parquet, CSV) or hub data sets, their columns mapped to
the fields the stages read, loaded as `datasets.Dataset`, checked row by row.

SFT rows are prompt/completion (strings, or chat messages) or `messages`; evaluation rows
are prompt/answer (an optional `id` and `task`), or, for the `code` verifier, HumanEval's
prompt/test/entry_point (`test` defines `check(candidate)`); preference rows are
prompt/chosen/rejected, or chosen/rejected chats (TRL's implicit prompt). A `.jsonl.gz` file is
read as its JSONL.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config.schema import DataSource
from pipeline.data.hub import dataset_cached, hub_reachable
from pipeline.results.manifest import atomic_write_text, digest

if TYPE_CHECKING:  # `datasets` takes most of a second to import; checking data does not need it
    from datasets import Dataset

SFT_FIELDS = [{"prompt", "completion"}, {"messages"}]
EVAL_FIELDS = [{"prompt", "answer"}]
CODE_FIELDS = [{"prompt", "test", "entry_point"}]  # HumanEval's; an SFT row may add its completion
# With a prompt, or TRL's implicit prompt: chats that share their first turns.
PREFERENCE_FIELDS = [{"prompt", "chosen", "rejected"}, {"chosen", "rejected"}]
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
    lines = jsonl_lines(path, max_line_bytes)
    return checked_rows(lines, accepted) if accepted else (row for _, row in lines)


def jsonl_lines(path: Path, max_line_bytes: int | None = None) -> Iterator[tuple[str, object]]:
    """Each line's place (`file:line`) and its parsed JSON."""
    # Parsed here rather than by `load_dataset("json")`, whose errors name neither line nor field.
    count = 0
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
            count += 1
            yield f"{path}:{number}", row
    if not count:
        raise DataError(f"{path}: the data set is empty")


def checked_rows(rows: Iterable[tuple[str, object]], accepted: list[set[str]], columns: dict[str, str] | None = None,
                 answer_pattern: str | None = None) -> Iterator[dict]:
    """Rows with their columns named as `columns` maps them, each holding one of the `accepted`
    field sets in the same format as the first row, the answer cut out by `answer_pattern`."""
    first = None
    for at, raw in rows:
        row = mapped(raw, columns, at) if columns else raw
        fields = check_row(row, at, accepted)
        first = first or (fields, row)
        # A Dataset takes its columns from the first row, and a column is text or chats, not both.
        if fields != first[0]:
            raise DataError(f"{at}: has {'/'.join(sorted(fields))} rows, the rows before it "
                            f"{'/'.join(sorted(first[0]))}: use one format per data set")
        mixed = [f for f in sorted(fields) if isinstance(row[f], str) != isinstance(first[1][f], str)]
        if mixed:
            kind = lambda v: "a string" if isinstance(v, str) else "a chat (message list)"  # noqa: E731
            raise DataError(f"{at}: field '{mixed[0]}' is {kind(row[mixed[0]])}, in the rows "
                            f"before it {kind(first[1][mixed[0]])}: use one format per data set")
        if answer_pattern is not None and "answer" in fields:
            row = row | {"answer": extract_answer(row["answer"], answer_pattern, at)}
        elif answer_pattern is not None and fields & {"completion", "messages"}:
            extract_answer(reference_completion(row), answer_pattern, at)  # cut out where pairs are checked
        yield row


def mapped(row: object, columns: dict[str, str], at: str) -> dict:
    """A row with the data set's columns renamed to the fields they hold; other columns kept."""
    if not isinstance(row, dict):
        raise DataError(f"{at}: each row must be a JSON object, got {type(row).__name__}")
    if missing := [column for column in columns.values() if column not in row]:
        raise missing_column(at, columns, missing[0], list(row))
    renamed = set(columns.values()) | set(columns)
    return {k: v for k, v in row.items() if k not in renamed} | {field: row[c] for field, c in columns.items()}


def missing_column(at: str, columns: dict[str, str], column: str, there: list) -> DataError:
    field = next(f for f, c in columns.items() if c == column)
    return DataError(f"{at}: no column {column} (for {field}): its columns are {', '.join(map(str, there)) or 'none'}; "
                     "fix the data set's `columns`")


def extract_answer(text: str, pattern: str, at: str) -> str:
    """The first group of `answer_pattern`'s first match in a reference (GSM8K: what follows `####`)."""
    match = re.search(pattern, text)
    if match is None or match.group(1) is None:
        raise DataError(f"{at}: the answer does not match answer_pattern {pattern!r}: {text[-80:]!r}")
    return match.group(1).strip()


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


def source_rows(source: DataSource) -> Iterator[tuple[str, object]]:
    """A data source's rows, each with its place for errors: a JSONL file's lines, or the rows
    `datasets` reads from another local file or a hub data set."""
    if source.format == "jsonl":
        yield from jsonl_lines(source.file, source.max_line_bytes)
        return
    from datasets import Features, Value, load_dataset
    from datasets.exceptions import DatasetsError

    text = {}
    if source.format == "csv":  # its cells as written: pandas would read a column of numbers as numbers, 0123 as 123
        with source.file.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        text = {"features": Features({column: Value("string") for column in header}), "keep_default_na": False}
    try:
        if source.file is not None:
            dataset = load_dataset(source.format, data_files=str(source.file), split="train", **text)
        else:
            dataset = load_dataset(source.hub, source.subset, split=source.split)
    except (ValueError, OSError, DatasetsError) as error:  # no such subset or split, a file it cannot parse
        cause = error.__cause__ or error
        raise DataError(f"{source.name}: cannot be read: {type(cause).__name__}: "
                        f"{str(cause).splitlines()[0] if str(cause) else ''}") from None
    if len(dataset) == 0:
        raise DataError(f"{source.name}: the data set is empty")
    if missing := [c for c in source.columns.values() if c not in dataset.column_names]:
        raise missing_column(source.name, source.columns, missing[0], dataset.column_names)
    mapped_columns = set(source.columns.values())
    for i, row in enumerate(dataset):  # every row has every column: a column a row lacks is None
        yield f"{source.name} row {i + 1}", {k: v for k, v in row.items() if v is not None or k in mapped_columns}


def load_rows(source: DataSource, accepted: list[set[str]]) -> Dataset:
    """A data source's rows, checked, with the fields the stage reads (`accepted`)."""
    from datasets import Dataset

    return Dataset.from_list(list(checked_rows(source_rows(source), accepted, source.columns, source.answer_pattern)))


def reference_completion(row: dict) -> str:
    """A training row's reference completion: its `completion`, or its last assistant turn."""
    completion = row["completion"] if "completion" in row else row["messages"][-1]
    return completion if isinstance(completion, str) else (completion[-1] if isinstance(completion, list)
                                                           else completion)["content"]


def prompt_and_answer(row: dict, answer_pattern: str | None = None, at: str = "") -> dict:
    """A training row as a prompt with the answer its samples are checked against: its `answer`,
    else its reference completion, cut out by `answer_pattern` if the data set has one."""
    row = {k: v for k, v in row.items() if v is not None}  # a Dataset gives every row every column
    if ("answer" in row or "test" in row) and "prompt" in row:  # a code problem is its own reference
        return {k: v for k, v in row.items() if k != "completion"}
    answer = reference_completion(row)
    answer = extract_answer(answer, answer_pattern, at) if answer_pattern else answer
    if "prompt" in row:
        return {k: v for k, v in row.items() if k != "completion"} | {"answer": answer}
    messages = row["messages"]
    return {k: v for k, v in row.items() if k != "messages"} | {"prompt": messages[:-1], "answer": answer}


def hub_data_readable(hub: str) -> bool:
    """A hub data set can be read here: a local folder `load_dataset` reads as one, one in the
    cache, or a reachable hub."""
    return Path(hub).is_dir() or dataset_cached(hub) or hub_reachable()


def source_digest(source: DataSource) -> str:
    """What identifies a data source in a stage key: the file's content digest, or the hub data
    set's name, subset and split; and how its rows are read, where the config says."""
    if source.file is not None:
        identity = digest(source.file)
    elif Path(source.hub).is_dir():  # a local folder read as a hub data set: its files' content
        identity = f"folder:{digest(Path(source.hub))}:{source.split}"
    else:
        identity = f"hub:{source.hub}:{source.split}"
    if source.subset is not None:
        identity += f":{source.subset}"
    if source.columns or source.answer_pattern is not None:
        identity += ":" + json.dumps([source.columns, source.answer_pattern], sort_keys=True)
    return identity
