"""A model or tokenizer named by hub id is checked before any stage, as a local folder is when
the config is read: from the local Hugging Face cache, else from the hub, with an error naming
the key. The hub here is a small local server that answers as the hub does (its status codes
and X-Error-Code headers), since these machines reach no real one."""

import http.server
import json
import threading

import pytest
from huggingface_hub import constants

from pipeline.config.schema import ConfigError, parse_config
from pipeline.data import hub
from pipeline.data.hub import check_hub_models

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
BERT = {"model_type": "bert", "architectures": ["BertModel"]}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def config_naming(model: str, tokenizer: str | None = None):
    data = {"sft": {"hub": "a/b"}, "target_eval": {"hub": "a/c"}, "general_eval": {"hub": "a/d"}}
    return parse_config({"name": "x", "model": {"path": model, "tokenizer": tokenizer}, "data": data})


def cache_model(cache, repo_id: str, files: dict[str, dict]) -> None:
    """A model as `huggingface_hub` leaves it in its cache: a snapshot per commit, a ref to it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    for name, content in files.items():
        (repo / "snapshots" / COMMIT / name).write_text(json.dumps(content))


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(hub, "_REACHABLE", None)
    return tmp_path / "hub-cache"


@pytest.fixture
def offline(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def fake_hub(cache, monkeypatch):
    """A hub on localhost: org/tiny-llama is a causal LM, org/bert is not, org/gated is gated,
    every other repository does not exist."""
    repos = {"org/tiny-llama": {"config.json": LLAMA, "tokenizer_config.json": {}}, "org/bert": {"config.json": BERT},
             "org/adapter": {"adapter_config.json": {"base_model_name_or_path": "org/tiny-llama"}}}

    class Hub(http.server.BaseHTTPRequestHandler):
        def answer(self, body: bool) -> None:
            repo_id, _, rest = self.path.lstrip("/").partition("/resolve/")
            filename = rest.partition("/")[2]
            if repo_id == "org/gated":
                self.send_response(403)
                self.send_header("X-Error-Code", "GatedRepo")
                content = b""
            elif repo_id not in repos:
                self.send_response(404)
                self.send_header("X-Error-Code", "RepoNotFound")
                content = b""
            elif filename not in repos[repo_id]:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                content = b""
            else:
                content = json.dumps(repos[repo_id][filename]).encode()
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{abs(hash(content))}"')
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if body:
                self.wfile.write(content)

        def do_HEAD(self):
            self.answer(body=False)

        def do_GET(self):
            self.answer(body=True)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    for switch in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # tests/conftest.py switches the hub off
        monkeypatch.delenv(switch, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    yield cache
    server.shutdown()


def test_a_hub_id_neither_cached_nor_reachable_is_refused_naming_the_key(offline):
    with pytest.raises(ConfigError, match=r"^model\.path: org/absent is neither in the local Hugging Face cache "
                                          r"\(.*hub-cache\) nor on a hub this machine reaches: download it"):
        check_hub_models(config_naming("org/absent"))


def test_a_cached_hub_model_is_checked_offline_to_be_a_causal_lm(offline):
    cache_model(offline, "org/tiny-llama", {"config.json": LLAMA})
    cache_model(offline, "org/bert", {"config.json": BERT})
    check_hub_models(config_naming("org/tiny-llama"))
    with pytest.raises(ConfigError, match=r"^model\.path: org/bert holds a BertModel, not a causal language model"):
        check_hub_models(config_naming("org/bert"))
    with pytest.raises(ConfigError, match=r"^model\.tokenizer: org/other-tokenizer is neither in the local"):
        check_hub_models(config_naming("org/tiny-llama", tokenizer="org/other-tokenizer"))
    check_hub_models(config_naming("org/tiny-llama", tokenizer="org/bert"))  # cached, without a tokenizer_config.json


def test_a_hub_model_with_its_own_code_needs_trust_remote_code(offline):
    cache_model(offline, "org/custom", {"config.json": {"model_type": "my_lm", "architectures": ["MyLM"],
                                                        "auto_map": {"AutoModelForCausalLM": "modeling.MyLM"}}})
    with pytest.raises(ConfigError, match=r"^model\.path: org/custom runs its own code .*set "
                                          r"model\.trust_remote_code: true if you trust it"):
        check_hub_models(config_naming("org/custom"))
    trusted = config_naming("org/custom")
    check_hub_models(trusted.model_copy(update={"model": trusted.model.model_copy(update={"trust_remote_code": True})}))


def test_a_hub_model_without_a_tokenizer_or_chat_template_is_named(offline):
    from pipeline.data.hub import check_tokenizer

    cache_model(offline, "org/tiny-llama", {"config.json": LLAMA})
    with pytest.raises(ConfigError, match=r"^model\.path: org/tiny-llama has no tokenizer"):
        check_tokenizer(config_naming("org/tiny-llama"), chats=False)
    cache_model(offline, "org/chat", {"config.json": LLAMA, "tokenizer_config.json": {"chat_template": "{{ 1 }}"}})
    cache_model(offline, "org/plain", {"config.json": LLAMA, "tokenizer_config.json": {}})
    check_tokenizer(config_naming("org/chat"), chats=True)
    check_tokenizer(config_naming("org/plain"), chats=False)
    with pytest.raises(ConfigError, match=r"^model\.path: the tokenizer of org/plain has no chat template"):
        check_tokenizer(config_naming("org/plain"), chats=True)


def test_on_a_reachable_hub_a_model_is_found_or_refused_for_what_the_hub_says(fake_hub):
    check_hub_models(config_naming("org/tiny-llama", tokenizer="org/tiny-llama"))
    assert (fake_hub / "models--org--tiny-llama" / "snapshots" / COMMIT / "config.json").is_file()  # kilobytes, cached
    with pytest.raises(ConfigError, match=r"^model\.path: there is no model org/absent on the hub"):
        check_hub_models(config_naming("org/absent"))
    with pytest.raises(ConfigError, match=r"^model\.path: org/gated is gated on the hub: accept its terms"):
        check_hub_models(config_naming("org/gated"))
    with pytest.raises(ConfigError, match=r"^model\.path: org/bert holds a BertModel, not a causal language model"):
        check_hub_models(config_naming("org/bert"))
    # a tokenizer repository without tokenizer_config.json exists, and that is all a tokenizer needs here
    check_hub_models(config_naming("org/tiny-llama", tokenizer="org/bert"))
    check_hub_models(config_naming("org/adapter"))  # a PEFT adapter, as a local adapter folder is accepted


def test_a_path_that_is_neither_a_folder_nor_a_hub_id_is_named_so(offline):
    with pytest.raises(ConfigError, match=r"^model\.path: results/sft/final is neither a local folder nor a hub id"):
        check_hub_models(config_naming("results/sft/final"))
