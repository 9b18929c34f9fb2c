"""Property-based tests: whatever the config or data file holds, the loaders either accept it
or raise their own error that names where; never another exception."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config.schema import ConfigError, PipelineConfig, load_config, parse_config
from pipeline.data.sources import EVAL_FIELDS, PREFERENCE_FIELDS, SFT_FIELDS, DataError, read_jsonl

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

SECTIONS = ["name", "seed", "results_dir", "model", "demo", "data", "pretrain", "sft", "pairs", "dpo",
            "sampling", "evaluate", "tracking", "trainer", "loss", "path", "n", "ks", "beta", "prompts", "lora"]
scalars = st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8)
keys = st.sampled_from(SECTIONS) | st.text(max_size=6)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4),
                      max_leaves=12)


@FUZZ
@given(st.dictionaries(keys, values, max_size=6))
def test_config_loader_accepts_or_names_the_key(data):
    try:
        cfg = parse_config(data, "fuzz.yaml")
    except ConfigError as error:
        assert str(error).startswith(("invalid config", "fuzz.yaml"))
    else:
        assert isinstance(cfg, PipelineConfig)


@FUZZ
@given(st.text(max_size=200))
def test_config_file_of_any_text_is_a_config_or_a_config_error(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as error:
        assert str(path) in str(error) or str(error).startswith("invalid config")


json_rows = st.dictionaries(st.sampled_from(["prompt", "completion", "answer", "chosen", "rejected", "messages", "id"])
                            | st.text(max_size=4), values, max_size=5).map(lambda row: json.dumps(row).encode())
lines = st.lists(json_rows | st.binary(max_size=30), max_size=6)  # raw bytes: not always UTF-8


@FUZZ
@given(lines, st.sampled_from([SFT_FIELDS, EVAL_FIELDS, PREFERENCE_FIELDS]))
def test_jsonl_loader_accepts_only_valid_rows_or_names_the_line(tmp_path, content, accepted):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(content))
    try:
        rows = read_jsonl(path, accepted)
    except DataError as error:
        assert str(error).startswith(str(path))
    else:
        assert rows and all(any(f <= row.keys() for f in accepted) for row in rows)
