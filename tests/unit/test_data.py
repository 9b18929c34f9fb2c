import gzip
import json
import os

import pytest

from pipeline.config.schema import DataSource
from pipeline.data.sources import (EVAL_FIELDS, PREFERENCE_FIELDS, SFT_FIELDS, DataError, load_rows, prompt_and_answer,
                                   read_jsonl, reference, scored_fields, write_jsonl)


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
     r"d\.jsonl:2: has messages rows, the rows before it completion/prompt: use one format per data set"),
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


GSM8K_ROWS = [{"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
               "answer": "In May she sold 48/2 = 24.\nIn all 48+24 = 72.\n#### 72"},
              {"question": "Weng earns $12 an hour. How much for 50 minutes?", "answer": "12/60*50 = 10\n#### 10"}]


def hub_layout(folder, splits: dict[str, list[dict]]):
    """A data set folder laid out as GSM8K is on the hub: a `main` configuration whose splits are
    Parquet files, declared in the README's metadata, which `load_dataset` reads as the hub's."""
    from datasets import Dataset

    (folder / "main").mkdir(parents=True)
    for split, rows in splits.items():
        Dataset.from_list(rows).to_parquet(str(folder / "main" / f"{split}-00000-of-00001.parquet"))
    files = "".join(f"  - split: {split}\n    path: main/{split}-*\n" for split in splits)
    (folder / "README.md").write_text(f"---\nconfigs:\n- config_name: main\n  data_files:\n{files}---\n")
    return folder


def gsm8k_layout(folder):
    return hub_layout(folder, {"train": GSM8K_ROWS, "test": GSM8K_ROWS[:1]})


def test_a_hub_data_set_with_a_subset_its_own_column_names_and_gsm8k_final_answers(tmp_path):
    hub = str(gsm8k_layout(tmp_path / "gsm8k"))
    sft = load_rows(DataSource(hub=hub, subset="main", columns={"prompt": "question", "completion": "answer"}),
                    SFT_FIELDS)
    assert sft.column_names == ["prompt", "completion"] and len(sft) == 2  # the data set's columns, renamed
    assert sft[0]["completion"].endswith("#### 72")  # SFT trains on the whole solution
    test = load_rows(DataSource(hub=hub, subset="main", split="test", columns={"prompt": "question"},
                                answer_pattern=r"####\s*(.+)"), EVAL_FIELDS)
    assert test.to_list() == [{"prompt": GSM8K_ROWS[0]["question"], "answer": "72"}]  # the final answer only
    # On-policy pairs from the SFT rows check samples against the final answer too.
    row = prompt_and_answer(sft[1], r"####\s*(.+)", "row 2")
    assert row == {"prompt": GSM8K_ROWS[1]["question"], "answer": "10"}


@pytest.mark.parametrize("suffix", ["parquet", "csv", "json", "jsonl"])
def test_local_parquet_csv_json_and_jsonl_files_with_their_own_column_names(tmp_path, suffix):
    from datasets import Dataset

    path = tmp_path / f"d.{suffix}"
    rows = [{"question": q["question"], "solution": q["answer"], "source": "gsm8k"} for q in GSM8K_ROWS]
    if suffix == "jsonl":
        write_jsonl(path, rows)
    else:
        getattr(Dataset.from_list(rows), f"to_{suffix}")(str(path))
    dataset = load_rows(DataSource(path=str(path), columns={"prompt": "question", "completion": "solution"}),
                        SFT_FIELDS)
    assert dataset.to_list() == [{"source": "gsm8k", "prompt": r["question"], "completion": r["solution"]}
                                 for r in rows]  # other columns are kept, as TRL keeps them


def test_a_missing_column_is_named_with_the_columns_there_are(tmp_path):
    hub = str(gsm8k_layout(tmp_path / "gsm8k"))
    with pytest.raises(DataError, match=r"gsm8k \(main, train\): no column problem \(for prompt\): its columns are "
                                        r"question, answer; fix the data set's `columns`"):
        load_rows(DataSource(hub=hub, subset="main", columns={"prompt": "problem", "answer": "answer"}), EVAL_FIELDS)
    write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: no column problem \(for prompt\): its columns are question, "
                                        "answer"):
        load_rows(DataSource(path=str(tmp_path / "d.jsonl"), columns={"prompt": "problem"}), EVAL_FIELDS)
    with pytest.raises(DataError, match=r"gsm8k \(socratic, train\): .*socratic"):  # no such subset
        load_rows(DataSource(hub=hub, subset="socratic"), EVAL_FIELDS)


def test_an_answer_the_pattern_does_not_find_names_the_row(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "answer": "#### 3"}, {"prompt": "q", "answer": "three"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: the answer does not match answer_pattern '####\\\\s\*\(\.\+\)'"):
        load_rows(DataSource(path=str(tmp_path / "d.jsonl"), answer_pattern=r"####\s*(.+)"), EVAL_FIELDS)


def test_how_rows_are_read_is_part_of_the_data_sets_identity(tmp_path):
    from pipeline.data.sources import source_digest

    write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "#### 3"}])
    plain = DataSource(path=str(tmp_path / "d.jsonl"))
    keys = {source_digest(plain), source_digest(plain.model_copy(update={"columns": {"prompt": "question"}})),
            source_digest(plain.model_copy(update={"answer_pattern": "#### (.+)"})),
            source_digest(DataSource(hub="openai/gsm8k")), source_digest(DataSource(hub="openai/gsm8k", subset="main"))}
    assert len(keys) == 5
    assert source_digest(plain) == source_digest(DataSource(path=str(tmp_path / "d.jsonl")))


@pytest.mark.parametrize("settings, error", [
    ({"path": "d.jsonl", "columns": {"question": "q"}}, "columns: question is not a field: map prompt, completion"),
    ({"path": "d.jsonl", "columns": {"prompt": "q", "completion": "q"}}, "one column is mapped to two fields"),
    ({"path": "d.jsonl", "answer_pattern": "#### .+"}, "answer_pattern: give the answer as a group"),
    ({"path": "d.jsonl", "answer_pattern": "(+"}, "answer_pattern: not a regular expression"),
    ({"path": "d.jsonl", "subset": "main"}, "subset is a hub data set's configuration: give it with 'hub'"),
    ({"path": "d.txt"}, r"d\.txt: not a data file this reads: give a \.jsonl, \.jsonl\.gz, \.json, \.parquet, \.csv"),
])
def test_data_set_settings_that_cannot_work_are_refused(tmp_path, monkeypatch, settings, error):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text("")
    (tmp_path / "d.txt").write_text("")
    with pytest.raises(ValueError, match=error):
        DataSource(**settings)


def test_preference_rows_take_trls_implicit_prompt(tmp_path):
    """Chats that share their first turns (Anthropic HH's layout): TRL's DPO extracts the prompt."""
    user = {"role": "user", "content": "2+2?"}
    write_jsonl(tmp_path / "hh.jsonl", [{"chosen": [user, {"role": "assistant", "content": "4"}],
                                         "rejected": [user, {"role": "assistant", "content": "5"}]}])
    rows = load_rows(DataSource(path=str(tmp_path / "hh.jsonl")), PREFERENCE_FIELDS)
    assert rows.column_names == ["chosen", "rejected"] and rows[0]["chosen"][1]["content"] == "4"


def test_csv_cells_are_read_as_written_and_unreadable_files_name_themselves(tmp_path):
    (tmp_path / "d.csv").write_text("q,a\n2+2=,4\n9-2=,007\n")  # pandas would read 4 and 7, numbers
    rows = load_rows(DataSource(path=str(tmp_path / "d.csv"), columns={"prompt": "q", "answer": "a"}), EVAL_FIELDS)
    assert [r["answer"] for r in rows] == ["4", "007"]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot be read: "):
        load_rows(DataSource(path=str(tmp_path / "bad.parquet")), EVAL_FIELDS)
    (tmp_path / "bad.json").write_text('[{"prompt": "a", "answer": "b"},')
    with pytest.raises(DataError, match=r"bad\.json: cannot be read: "):
        load_rows(DataSource(path=str(tmp_path / "bad.json")), EVAL_FIELDS)


def test_an_empty_cell_of_a_mapped_column_is_named_as_empty_not_missing(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"q": "2+2=", "a": "4"}, {"q": None, "a": "5"}]).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"d\.parquet row 2: field 'prompt' must be a non-empty string"):
        load_rows(DataSource(path=str(tmp_path / "d.parquet"), columns={"prompt": "q", "answer": "a"}), EVAL_FIELDS)


def test_a_local_folder_read_as_a_hub_data_set_is_identified_by_its_files(tmp_path):
    from pipeline.data.sources import source_digest

    folder = gsm8k_layout(tmp_path / "gsm8k")
    before = source_digest(DataSource(hub=str(folder), subset="main"))
    (folder / "main" / "train-00000-of-00001.parquet").write_bytes(b"changed")
    assert source_digest(DataSource(hub=str(folder), subset="main")) != before
