"""The Hugging Face Hub, as the checks before any stage see it: can it be reached, and can a
model or data set it names be read here (from the local cache, or from a reachable hub)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from pipeline.config.schema import ConfigError, PipelineConfig, causal_lm_problem

_REACHABLE: bool | None = None


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub can be reached: not switched off, and its host answers (cached per process)."""
    global _REACHABLE
    if _REACHABLE is None:
        from huggingface_hub import constants

        off = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        endpoint = urlparse(constants.ENDPOINT)
        host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
        _REACHABLE = not off and _answers(host, port, timeout_s)
    return _REACHABLE


def _answers(host: str, port: int, timeout_s: float) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def dataset_cached(dataset: str) -> bool:
    """Whether `datasets` has the hub data set in its cache (its files or its prepared Arrow tables)."""
    from datasets import config
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}").is_dir() or \
        (Path(config.HF_DATASETS_CACHE) / dataset.replace("/", "___")).is_dir()


def hub_file(repo_id: str, filename: str, key: str) -> Path | None:
    """A file of a hub model repository, from the hub where it is reachable (a config or tokenizer
    file: kilobytes), else from the local cache. None when the repository exists without that
    file. Raises ConfigError naming `key` when the repository cannot be read here."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=constants.HF_HUB_CACHE,
                                    local_files_only=not hub_reachable()))
    except HFValidationError:
        raise ConfigError(f"{key}: {repo_id} is neither a local folder nor a hub id (org/name); a relative folder "
                          "starts with ./") from None
    except LocalEntryNotFoundError:
        if model_cached(repo_id):
            return None  # the repository is here, without that file
        raise ConfigError(f"{key}: {repo_id} is neither in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
                          f"nor on a hub this machine reaches: download it where the hub is reachable (`hf download "
                          f"{repo_id}`), or give a local folder") from None
    except GatedRepoError:
        raise ConfigError(f"{key}: {repo_id} is gated on the hub: accept its terms on its page and log in "
                          "(`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{key}: there is no model {repo_id} on the hub (or it is private: log in with "
                          "`hf auth login`)") from None
    except EntryNotFoundError:
        return None
    except Exception as error:  # noqa: BLE001 - the hub client's network and HTTP errors, of several libraries
        raise ConfigError(f"{key}: {repo_id} could not be read from the hub ({type(error).__name__}: "
                          f"{str(error).splitlines()[0][:200] if str(error) else ''})") from None


def model_cached(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds a snapshot of the model repository."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_tokenizer(cfg: PipelineConfig, chats: bool) -> None:
    """The tokenizer (model.tokenizer, else the model's own) is there, and has a chat template
    when the data holds chats and the config names none: found before any stage, not when the
    first chat is rendered."""
    source = cfg.model.tokenizer or cfg.model.path
    key = "model.tokenizer" if cfg.model.tokenizer else "model.path"
    if source is None:
        return  # the demo world builds its own
    folder = Path(source).expanduser()
    if folder.is_dir():
        if not any((folder / f).is_file() for f in TOKENIZER_FILES):
            if (folder / "adapter_config.json").is_file():
                return  # a PEFT adapter without a tokenizer: its base model's is loaded
            raise ConfigError(f"{key}: {folder} holds no tokenizer ({', '.join(TOKENIZER_FILES)}): save the model's "
                              "tokenizer beside it, or name one in model.tokenizer")
        settings, template = folder / "tokenizer_config.json", folder / "chat_template.jinja"
    else:
        settings, template = hub_file(source, "tokenizer_config.json", key), hub_file(source, "chat_template.jinja", key)
        if settings is None and not any(hub_file(source, f, key) for f in ("tokenizer.json", "adapter_config.json")):
            raise ConfigError(f"{key}: {source} has no tokenizer (no tokenizer_config.json or tokenizer.json): name "
                              "one in model.tokenizer")
    if not chats or cfg.model.chat_template is not None:
        return
    has_template = (template is not None and template.is_file()) or (
        settings is not None and settings.is_file() and json.loads(settings.read_text()).get("chat_template"))
    if not has_template:
        raise ConfigError(f"{key}: the tokenizer of {source} has no chat template, and the data holds chats: set "
                          "model.chat_template (chatml, or a .jinja file)")


def check_hub_models(cfg: PipelineConfig) -> None:
    """The models and tokenizer the config names by hub id resolve, before any stage: readable
    here, and a model's config that of a causal language model (a local folder is checked when
    the config is read)."""
    for key, repo_id, filename in (("model.path", cfg.model.path, "config.json"),
                                   ("model.tokenizer", cfg.model.tokenizer, "tokenizer_config.json")):
        if repo_id is None or Path(repo_id).expanduser().is_dir():
            continue
        found = hub_file(repo_id, filename, key)
        if filename != "config.json":
            continue
        if found is None:  # a PEFT adapter names its base model, checked when it is loaded (as a local adapter)
            if hub_file(repo_id, "adapter_config.json", key) is not None:
                continue
            raise ConfigError(f"{key}: {repo_id} has no config.json: not a transformers model")
        if (problem := causal_lm_problem(found, f"{key}: {repo_id}", cfg.model.trust_remote_code)) is not None:
            raise ConfigError(problem)
