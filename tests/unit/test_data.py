import gzip
import json
import os

import pytest

from pipeline.config import DataSource
from pipeline.data import (EVAL_FIELDS, PREFERENCE_FIELDS, SFT_FIELDS, DataError, load_rows, prompt_and_answer, read_jsonl,
                           reference, scored_fields, write_jsonl)


def test_write_then_load_as_dataset(tmp_path):
    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "1+2=", "completion": "3"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    dataset = load_rows(DataSource(path=str(tmp_path / "d.jsonl")), SFT_FIELDS)
    assert len(dataset) == 2 and dataset[0]["prompt"] == "1+1=" and dataset[1]["completion"] == "3"


@pytest.mark.parametrize("content, error", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n', r"d\.jsonl:2: malformed JSON"),
    ('{"prompt": "a"}\n', r"d\.jsonl:1: missing fields: expected completion/prompt or messages, got prompt"),
    ('\n\n{"prompt": "", "completion": "b"}\n', r"d\.jsonl:3: field 'prompt' must be a non-empty"),
    ('["a", "b"]\n', r"d\.jsonl:1: each row must be a JSON object, got list"),
    ("\n\n", r"d\.jsonl: the data set is empty"),
    ('{"prompt": "a", "completion": "b"}\n{"messages": [{"role": "user", "content": "a"}]}\n',
     r"d\.jsonl:2: has messages rows, the rows before it completion/prompt: use one format per file"),
    # pyarrow cannot hold strings and message lists in one column; say where, not pyarrow's error
    ('{"prompt": "a", "completion": "b"}\n\n{"prompt": [{"role": "user", "content": "a"}], "completion": "b"}\n',
     r"d\.jsonl:3: field 'prompt' is a chat \(message list\), in the rows before it a string: use one format"),
])
def test_bad_rows_name_file_and_line(tmp_path, content, error):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(DataError, match=error):
        read_jsonl(tmp_path / "d.jsonl", SFT_FIELDS)


def test_preference_rows_may_reject_an_empty_answer_but_not_a_number(tmp_path):
    # A model that stops at once wrote "" : a real rejected answer. A number is not a completion.
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": ""}, {"prompt": "2+2=",
                                                                                          "chosen": "4", "rejected": 5}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: field 'rejected' must be a string or message list"):
        read_jsonl(tmp_path / "p.jsonl", PREFERENCE_FIELDS)
    assert read_jsonl(tmp_path / "p.jsonl")[0]["rejected"] == ""


def test_non_utf8_bytes_name_the_line(tmp_path):
    good = json.dumps({"prompt": "a", "answer": "b"}).encode()
    (tmp_path / "d.jsonl").write_bytes(good + b"\n" + b'{"prompt": "\xff", "answer": "b"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid UTF-8"):
        read_jsonl(tmp_path / "d.jsonl", EVAL_FIELDS)


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"a": 1}])
    write_jsonl(tmp_path / "d.jsonl", [{"a": 2}])
    assert [p.name for p in tmp_path.iterdir()] == ["d.jsonl"]
    assert read_jsonl(tmp_path / "d.jsonl") == [{"a": 2}]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "d.jsonl").stat().st_mode & 0o777 == 0o666 & ~umask  # not the temporary file's 0600


def test_an_evaluation_answer_must_be_a_string(tmp_path):
    write_jsonl(tmp_path / "e.jsonl", [{"prompt": "1+1=", "answer": "2"},
                                       {"prompt": "2+2=", "answer": [{"role": "assistant", "content": "4"}]}])
    with pytest.raises(DataError, match=r"e\.jsonl:2: field 'answer' must be a string: the reference"):
        read_jsonl(tmp_path / "e.jsonl", EVAL_FIELDS)


def test_code_problems_are_humaneval_rows_and_their_own_reference(tmp_path):
    problem = {"prompt": "def f():\n", "test": "def check(candidate):\n    assert candidate() == 1\n",
               "entry_point": "f", "task_id": "t/0"}
    with gzip.open(tmp_path / "code.jsonl.gz", "wt") as f:
        f.write(json.dumps(problem) + "\n")
    source = DataSource(path=str(tmp_path / "code.jsonl.gz"), verifier="code")
    rows = list(load_rows(source, scored_fields(source, EVAL_FIELDS)))
    assert reference(rows[0]) == {k: problem[k] for k in ("prompt", "test", "entry_point")}
    assert reference({"prompt": "1+1=", "answer": "2"}) == "2"
    # SFT rows with tests: the completion is not the reference, the tests are
    assert prompt_and_answer(problem | {"completion": "    return 1\n"}) == problem
    write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    wrong = DataSource(path=str(tmp_path / "qa.jsonl"), verifier="code")
    with pytest.raises(DataError, match=r"qa\.jsonl:1: missing fields: expected entry_point/prompt/test, got answer"):
        load_rows(wrong, scored_fields(wrong, EVAL_FIELDS))


def test_a_line_longer_than_the_limit_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "' + b"x" * 3_000_000 + b'", "completion": "b"}\n')
    with pytest.raises(DataError, match=r"big\.jsonl:2: the line is longer than 1048576 bytes .*raise max_line_bytes"):
        load_rows(DataSource(path=str(path)), SFT_FIELDS)
    assert len(load_rows(DataSource(path=str(path), max_line_bytes=4_000_000), SFT_FIELDS)) == 2
