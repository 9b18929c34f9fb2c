"""TRL's trainer options, read once from TRL's dataclasses and then from the user's cache, so
that checking a config does not import TRL (and torch) each time."""

import json

import pytest

from pipeline.config import trainer_options as options_module
from pipeline.config.schema import ConfigError, parse_config
from pipeline.config.trainer_options import cache_file, read_trainer_options, trainer_options


@pytest.fixture
def cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


def test_the_options_are_read_from_trl_once_then_from_the_cache(cache_home, monkeypatch):
    fresh = read_trainer_options()
    assert fresh["DPOConfig"]["beta"] == {"types": ["float"], "default": 0.1}
    assert fresh["SFTConfig"]["max_steps"]["default"] == -1 and "lr_scheduler_type" in fresh["SFTConfig"]
    assert trainer_options("SFTConfig") == fresh["SFTConfig"]  # read from TRL, and cached
    path = cache_file()
    assert path.parent == cache_home / "posttrain" and "trl" in path.name and "transformers" in path.name
    assert json.loads(path.read_text()) == fresh

    def no_trl():
        raise AssertionError("TRL read again")

    monkeypatch.setattr(options_module, "read_trainer_options", no_trl)
    assert trainer_options("DPOConfig") == fresh["DPOConfig"]  # from the cache alone


def test_a_config_is_checked_against_the_cache_and_a_damaged_cache_is_read_again(cache_home):
    trainer_options("SFTConfig")
    path = cache_file()
    cached = json.loads(path.read_text())
    del cached["SFTConfig"]["max_steps"]  # as if this TRL had no such option
    path.write_text(json.dumps(cached))
    with pytest.raises(ConfigError, match=r"sft\.trainer\.max_steps: not an option of TRL's SFTConfig"):
        parse_config({"name": "x", "sft": {"trainer": {"max_steps": 5}}})
    path.write_text(path.read_text()[:100])  # cut off
    assert parse_config({"name": "x", "sft": {"trainer": {"max_steps": 5}}}).sft.trainer == {"max_steps": 5}
    assert json.loads(path.read_text()) == read_trainer_options()
