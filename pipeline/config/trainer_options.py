"""The options of TRL's trainer configs (SFTConfig, DPOConfig) as a config check needs them: each
option's name, its simple value types and its numeric default.

They are read from TRL's own dataclasses, so every option a TRL user knows is accepted and a
misspelt one is refused. Importing TRL takes seconds (it imports torch, transformers and peft),
and checking a config should not: what is read is kept in the user's cache, one file per
installed TRL and transformers version, and read from there afterwards. Nothing in TRL or
transformers offers its options without the import, hence this cache.
"""

from __future__ import annotations

import json
import os
from importlib.metadata import version
from pathlib import Path
from typing import Any

CONFIGS = ("SFTConfig", "DPOConfig")
SIMPLE_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}


def cache_file() -> Path:
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return home / "posttrain" / f"trainer-options-trl{version('trl')}-transformers{version('transformers')}.json"


def trainer_options(config_name: str) -> dict[str, dict[str, Any]]:
    """`{option: {"types": ["int", "None"] or None (not simple), "default": a number or None}}`
    of TRL's config class `config_name`: from the cache, else from TRL (and then cached)."""
    path = cache_file()
    try:
        return json.loads(path.read_text())[config_name]
    except (OSError, ValueError, KeyError):  # not cached yet, or a cache file cut off or from elsewhere
        options = read_trainer_options()
    from pipeline.results.manifest import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(options, indent=1))
    return options[config_name]


def read_trainer_options() -> dict[str, dict[str, dict[str, Any]]]:
    """Every init option of TRL's configs, read from the dataclasses (this imports TRL)."""
    import dataclasses
    import types
    import typing

    import trl

    plain = {t: name for name, t in SIMPLE_TYPES.items()}
    options = {}
    for name in CONFIGS:
        cls = getattr(trl, name)
        hints = typing.get_type_hints(cls)
        fields = {}
        for field in dataclasses.fields(cls):
            if not field.init:
                continue
            hint = hints.get(field.name)
            args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
            default = field.default
            numeric = isinstance(default, int | float) and not isinstance(default, bool)
            fields[field.name] = {"types": [plain[a] for a in args] if all(a in plain for a in args) else None,
                                  "default": default if numeric else None}
        options[name] = fields
    return options
