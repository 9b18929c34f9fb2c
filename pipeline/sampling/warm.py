"""One vLLM engine for the stages of a run, and of a `compare`, that sample with vLLM: started
by the first of them, then given each stage's model by loading its weights into the running
engine (docs/pipeline.md, "One vLLM engine for the whole run").

The stages are processes that end, so the engine lives in a process of its own, the sampler,
which the flow's process starts when the first such stage runs (`sampler_env`) and stops when it
exits. A stage's process opens a session with it (`sampler.warm_session`): its model and its
stdout and stderr, where the sampling's progress goes, then calls (sampling, and lm-eval's
log-likelihood and generation requests), each answered in turn. Written here because
neither `vllm serve` (one model for its life) nor TRL's `trl vllm-serve` (weights over NCCL from
a trainer in the same job) loads a checkpoint folder into a running engine on request.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from multiprocessing.connection import Connection, Listener
from multiprocessing.reduction import recv_handle
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config.schema import SamplingConfig
from pipeline.runtime.progress import STAGE_ENV
from pipeline.runtime.process import stop_process
from pipeline.sampling.sampler import (ENGINE_CALLS, SAMPLER_CLIENT_ENV, SAMPLER_ENV, BadRequest, shutdown_engine,
                                      start_engine, vllm_engine_args)

if TYPE_CHECKING:
    from vllm import LLM

SERVING = "serving"  # in the sampler's folder, beside its socket: the client whose request it answers
# Config keys that do not change what vLLM builds: saves' own bookkeeping, and the cache switch training turns off.
IGNORED = ("transformers_version", "use_cache")


class CheckpointLoader:
    """Mixed into vLLM's workers (the engine's `worker_extension_cls`), called through
    `collective_rpc("load_checkpoint", ...)`: the checkpoint's weights, loaded in place."""

    def load_checkpoint(self, path: str) -> None:
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

        self.reload_weights(weights_path=path)
        # A tied LM head loads nothing of its own, so vLLM 0.32's reload leaves it as processed from
        # the old weights: on a CPU, a oneDNN copy packed at start, stale though the tensor it shares
        # with the embedding is new. Processing it again packs the new one (elsewhere it does nothing).
        head = getattr(self.model_runner.get_model(), "lm_head", None)
        tied = getattr(self.vllm_config.model_config.hf_text_config, "tie_word_embeddings", False)
        if tied and isinstance(getattr(head, "quant_method", None), UnquantizedEmbeddingMethod):
            head.quant_method.process_weights_after_loading(head)


def engine_identity(model_dir: Path, settings: SamplingConfig, tokenizer_dir: str | Path | None = None,
                    trust_remote_code: bool = False) -> str:
    """What an engine is built from but the weights, as loaded: the model's config (its
    architecture), its generation config (vLLM takes its stop tokens at start), the tokenizer (the
    engine renders the prompts and decodes with the one it started with) and the engine settings.
    Not the seed: every request carries its prompts' own (sampler.prompt_seeds). A model with its
    own code (`trust_remote_code`) is itself only in its own folder."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code).to_dict()
    try:
        generation = GenerationConfig.from_pretrained(model_dir).to_dict()
    except OSError:  # none: vLLM's defaults
        generation = {}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir, trust_remote_code=trust_remote_code)
    identity = {
        "config": {k: v for k, v in config.items() if not k.startswith("_") and k not in IGNORED},
        "generation": {k: v for k, v in generation.items() if not k.startswith("_") and k not in IGNORED},
        # A fast tokenizer's whole definition is its JSON; a slow one is only the same where it was read.
        "tokenizer": tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False)
        else tokenizer.name_or_path,
        "special": tokenizer.all_special_tokens, "chat_template": tokenizer.chat_template,
        "code": str(model_dir) if trust_remote_code else None,
        "engine": vllm_engine_args(settings),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


class WarmEngine:
    """The sampler's engine, kept between requests: its weights replaced where the identity
    allows, else a new engine."""

    def __init__(self) -> None:
        from vllm.platforms import current_platform

        self.llm: LLM | None = None
        self.identity = ""
        self.asleep = False
        self.sleeps = current_platform.is_sleep_mode_available()  # on CUDA; not on a CPU

    def ready_for(self, identity: str, model_dir: Path, settings: SamplingConfig, tokenizer_dir: str | Path | None,
                  trust_remote_code: bool) -> str:
        """The engine, holding this model's weights (of `engine_identity`); says how it got them."""
        began = time.perf_counter()
        if self.llm is not None and identity != self.identity:
            self.close()
        if self.llm is None:
            self.llm = start_engine(model_dir, settings, tokenizer_dir, trust_remote_code,
                                    worker_extension_cls=f"{__name__}.{CheckpointLoader.__qualname__}",
                                    **({"enable_sleep_mode": True} if self.sleeps else {}))
            self.identity = identity
            return f"a new vLLM engine (started in {time.perf_counter() - began:.1f} s)"
        if self.asleep:  # as vLLM's sleep mode documents: the weights' memory, new weights, then the cache
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("load_checkpoint", args=(str(model_dir),))
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()  # computed with the old weights
        return f"the run's vLLM engine, its weights loaded in place ({time.perf_counter() - began:.1f} s)"

    def rest(self) -> None:
        """Between requests, on a GPU: its weights' and KV cache's memory back to the stages that
        train (vLLM's sleep level 2; the CUDA context and its graphs' pool stay)."""
        if self.llm is not None and self.sleeps:
            self.llm.sleep(level=2)
            self.asleep = True

    def close(self) -> None:
        if self.llm is not None:
            llm, self.llm, self.asleep = self.llm, None, False
            try:
                shutdown_engine(llm)
            except Exception:  # noqa: BLE001 - its processes end with the sampler's at the latest
                traceback.print_exc()


@contextmanager
def output_to(stdout: int, stderr: int) -> Iterator[None]:
    """This process's stdout and stderr sent to a stage's for the duration. (The engine's own
    processes keep the sampler's: they outlive the stage.)"""
    saved = os.dup(1), os.dup(2)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with suppress(OSError, ValueError):  # the stage's end of the pipe may be gone
                stream.flush()
        for fd, original in zip((1, 2), saved):
            os.dup2(original, fd)
            os.close(original)


def answer(connection: Connection, engine: WarmEngine, devices: dict[str, str], serving: Path) -> None:
    """One stage's session (opened by sampler.warm_session). While it is served, the file
    `serving` names the stage it came from (`Sampler.serving`)."""
    try:
        request = connection.recv()
    except (EOFError, OSError):
        return  # the stage ended (was stopped) before its request was in
    serving.write_text(request.get("client", ""))
    try:
        serve_session(connection, request, engine, devices)
    finally:
        serving.unlink(missing_ok=True)


class StageGone(Exception):
    """The stage's end of the connection closed: nothing to answer."""


def serve_session(connection: Connection, request: dict[str, Any], engine: WarmEngine, devices: dict[str, str]) -> None:
    """The request's model loaded into the engine, then the stage's calls (`ENGINE_CALLS`)
    answered one by one until it says "end": each reply the result, or the error that ends the
    session. The last reply (the end's, or an error's) is sent once the engine rests."""
    output: list[int] = []
    engine_used = False
    reply: tuple | None = None
    try:
        settings = SamplingConfig.model_validate(request["settings"])
        model_dir, tokenizer_dir = Path(request["model_dir"]), request["tokenizer_dir"]
        trust = request["trust_remote_code"]
        identity = engine_identity(model_dir, settings, tokenizer_dir, trust)  # unreadable: the request's fault
        engine_used = True
        how = engine.ready_for(identity, model_dir, settings, tokenizer_dir, trust)
        # The stage's stdout and stderr, sent after the request, taken once the engine runs: its
        # processes must not hold them (or the stage's output would not end with the stage).
        try:
            output.append(recv_handle(connection))
            output.append(recv_handle(connection))
        except (EOFError, OSError, RuntimeError) as error:
            raise StageGone from error
        os.environ[STAGE_ENV] = request["stage"]  # names the progress bar
        with output_to(*output):
            on = f" ({', '.join(f'{k}={os.environ.get(k)}' for k in devices)})" if devices else ""
            print(f"sampling {model_dir} with {how}{on}", flush=True)
            result: Any = None
            while True:
                try:
                    connection.send(("ok", result))
                    name, args = connection.recv()
                except (EOFError, OSError) as error:
                    raise StageGone from error
                if name == "end":
                    break
                if name not in ENGINE_CALLS:
                    raise BadRequest(f"no engine call {name!r}")
                result = ENGINE_CALLS[name](engine.llm, settings, *args)
        reply = ("ok", None)
    except StageGone:
        pass
    except Exception as error:
        if engine_used and not isinstance(error, BadRequest):
            engine.close()  # an engine that failed in a request is not trusted with the next
        reply = ("error", type(error).__name__, str(error), traceback.format_exc())
    finally:
        for fd in output:
            os.close(fd)
    try:  # before the last reply: the stage goes on to what needs the GPU's memory
        engine.rest()
    except Exception:  # noqa: BLE001 - the results are kept; a new engine serves the next request
        traceback.print_exc()
        engine.close()
    if reply is not None:
        with suppress(OSError):  # a stage stopped meanwhile: the next is answered all the same
            connection.send(reply)


def serve(address: str, parent: int, ready: Connection, devices: dict[str, str]) -> None:
    """The sampler's process: answer requests one at a time until stopped, or until the flow's
    process that started it is gone. `devices`: its pipeline's GPUs, when pipelines run side by side."""
    os.setsid()  # a Ctrl-C at the terminal is the flow's to handle: it stops this process at its exit
    os.environ.update(devices)  # before vLLM, hence torch, is imported

    def stop(*_: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the engine's shutdown short
        sys.exit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)  # as SystemExit: the `finally` below shuts the engine down
    # vLLM forks its engine's processes on CUDA: they would hold this process's socket and a stage's output.
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch_parent, name="parent watch", daemon=True).start()
    with Listener(address, family="AF_UNIX") as listener:
        ready.send("listening")
        ready.close()
        engine = WarmEngine()
        try:
            while True:
                with listener.accept() as connection:
                    answer(connection, engine, devices, Path(address).parent / SERVING)
        finally:
            engine.close()


class Sampler:
    """The flow process's handle on a sampler process: the one of the run, or with pipelines side
    by side, the one on a pipeline's `devices`."""

    def __init__(self, devices: dict[str, str]) -> None:
        self.devices = devices
        self.process: Any = None
        self.folder = ""
        self.lock = threading.RLock()  # stages run in Prefect's task threads; stop() is also the exit's

    def address(self) -> str:
        """The running sampler's socket; a sampler is started if none runs (or it died)."""
        with self.lock:
            if self.process is not None and self.process.is_alive():
                return str(Path(self.folder) / "socket")
            self.stop()
            self.folder = tempfile.mkdtemp(prefix="posttrain-sampler-")  # this user's only
            address = str(Path(self.folder) / "socket")
            context = multiprocessing.get_context("spawn")  # vLLM starts processes: not from a forked copy of the flow
            receiver, sender = context.Pipe(duplex=False)
            self.process = context.Process(target=serve, args=(address, os.getpid(), sender, self.devices),
                                           name="posttrain-sampler")
            self.process.start()
            sender.close()
            try:
                receiver.recv()  # listening
            except EOFError:
                raise RuntimeError(f"the vLLM sampler's process ended at its start (exit code "
                                   f"{self.process.exitcode}); its output is above") from None
            finally:
                receiver.close()
            return address

    def serving(self) -> str | None:
        """The stage (its SAMPLER_CLIENT_ENV) whose request the sampler is answering; None: none."""
        with suppress(OSError):
            return (Path(self.folder) / SERVING).read_text() if self.folder else None
        return None

    def stop(self) -> None:
        with self.lock:
            if self.process is not None:
                stop_process(self.process, grace_s=30.0)
                self.process = None
            if self.folder:
                shutil.rmtree(self.folder, ignore_errors=True)
                self.folder = ""


SAMPLERS: dict[str, Sampler] = {}  # by the devices they sample on
_SAMPLERS_LOCK = threading.Lock()


def sampler_for(devices: dict[str, str]) -> Sampler:
    with _SAMPLERS_LOCK:
        return SAMPLERS.setdefault(json.dumps(devices, sort_keys=True), Sampler(devices))


def stop_sampler(devices: dict[str, str], client: str) -> None:
    """Stop the sampler on these devices if it is answering `client`'s request: that stage ran
    past its time, and an engine that may hang in the request is not trusted with the next (a new
    one starts for it). A request still queued behind another pipeline's leaves it running."""
    with _SAMPLERS_LOCK:
        sampler = SAMPLERS.get(json.dumps(devices, sort_keys=True))
    if sampler is not None and sampler.serving() == client:
        sampler.stop()


@atexit.register
def stop_samplers() -> None:
    for sampler in list(SAMPLERS.values()):
        sampler.stop()


def sampler_env(sampling: SamplingConfig, devices: dict[str, str] | None = None, client: str = "") -> dict[str, str]:
    """The environment of a stage that samples with these settings on `devices` (its pipeline's,
    beside others; None: the machine's): the address of the sampler on those devices where the warm
    engine is used (vLLM, one engine, `sampling.warm_engine`), and the stage as its `client`;
    else nothing."""
    warm = sampling.warm_engine and sampling.data_parallel_size == 1 and sampling.chosen_backend() == "vllm"
    return {SAMPLER_ENV: sampler_for(devices or {}).address(), SAMPLER_CLIENT_ENV: client} if warm else {}
