"""One vLLM engine for all the stages of a run, and of a `compare`, that sample with vLLM:
started by the first of them, then given each stage's model by loading its weights into the
running engine.

Starting an engine takes about a minute on a CPU (tens of seconds on a GPU: loading, memory
profiling, torch.compile, CUDA graphs); a stage samples for seconds. The stages are processes
that end, so the engine lives in a process of its own, the sampler, which the flow's process
starts when the first such stage runs (`sampler_env`) and stops when it exits. A stage's process
sends it the request (`sampler.sample_warm`) with its stdout and stderr, where the sampling's
progress goes, and gets the completions back.

Written here because neither server does it: `vllm serve` serves one model for its life, and
TRL's `trl vllm-serve` takes new weights over NCCL from a trainer of the same job; a stage hands
over a folder. vLLM's engine loads a checkpoint in place (the workers' `reload_weights`), and
`engine_identity` says when it may: a model whose architecture, generation defaults, tokenizer
and engine settings are the running engine's differs from it in its weights only; any other gets
a new engine. The completions are a fresh engine's (tests/e2e/test_sampling.py): vLLM seeds each
prompt, and the prefix cache, the one state a request leaves, is emptied with each new model.

On a GPU the engine sleeps between requests (vLLM's sleep mode, level 2: weights and KV cache
dropped), so that the training stages in between get the GPU's memory back.
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
from pipeline.sampling.engines import stop_process
from pipeline.sampling.sampler import SAMPLER_ENV, generate_vllm, shutdown_engine, start_engine, vllm_engine_args

if TYPE_CHECKING:
    from vllm import LLM

# Files of a model folder that are weights: everything else in the tokenizer's folder may be the tokenizer's.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
MODEL_FILES = ("config.json", "generation_config.json")  # digested as settings, not as files
VOLATILE = ("_name_or_path", "transformers_version")  # differ between saves of one architecture


class CheckpointLoader:
    """Mixed into vLLM's workers (the engine's `worker_extension_cls`), called through
    `collective_rpc("load_checkpoint", ...)`: the checkpoint's weights, loaded in place."""

    def load_checkpoint(self, path: str) -> None:
        import torch

        self.reload_weights(weights_path=path)
        # A tied LM head loads nothing of its own, so vLLM's reload leaves it as processed from the
        # old weights: on a CPU, a oneDNN copy packed at start, stale though the shared tensor is
        # new. Process every layer whose weight another layer shares again, from the new values.
        sharing: dict[int, list[torch.nn.Module]] = {}
        for module in self.model_runner.get_model().modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.numel() and not weight.is_meta:
                sharing.setdefault(weight.data_ptr(), []).append(module)
        for modules in sharing.values():
            for module in modules if len(modules) > 1 else ():
                if (method := getattr(module, "quant_method", None)) is not None:
                    method.process_weights_after_loading(module)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_file(folder: Path, name: str) -> dict[str, Any]:
    """A model folder's JSON file but for what differs between saves of the same thing."""
    path = folder / name
    content = json.loads(path.read_text()) if path.is_file() else {}
    return {k: v for k, v in content.items() if k not in VOLATILE}


def engine_identity(model_dir: Path, settings: SamplingConfig, tokenizer_dir: str | Path | None = None,
                    trust_remote_code: bool = False) -> str:
    """What an engine is built from but the weights: the model's config (its architecture), its
    generation config (vLLM reads its stop tokens at start), the tokenizer's files and the engine
    settings. Not the seed: every request carries its prompts' own (sampler.prompt_seeds)."""
    tokenizer = Path(tokenizer_dir or model_dir)
    if tokenizer.is_dir():
        files = {f.name: file_digest(f) for f in sorted(tokenizer.iterdir())
                 if f.is_file() and f.name not in MODEL_FILES and not f.name.endswith(WEIGHT_SUFFIXES)}
    else:  # a hub id: the engine downloads it by name
        files = {"hub": str(tokenizer_dir)}
    identity = {"config": model_file(Path(model_dir), "config.json"),
                "generation": model_file(Path(model_dir), "generation_config.json"),
                "tokenizer": files, "engine": vllm_engine_args(settings), "trust_remote_code": trust_remote_code}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


class WarmEngine:
    """The sampler's engine, kept between requests: its weights replaced where the identity
    allows, else a new engine."""

    def __init__(self) -> None:
        self.llm: LLM | None = None
        self.identity = ""
        self.asleep = False

    def ready_for(self, model_dir: Path, settings: SamplingConfig, tokenizer_dir: str | Path | None,
                  trust_remote_code: bool) -> str:
        """The engine, holding this model's weights; says how it got them."""
        from vllm.platforms import current_platform

        identity = engine_identity(model_dir, settings, tokenizer_dir, trust_remote_code)
        began = time.perf_counter()
        if self.llm is not None and identity != self.identity:
            self.close()
        if self.llm is None:
            sleeps = {"enable_sleep_mode": True} if current_platform.is_sleep_mode_available() else {}
            self.llm = start_engine(model_dir, settings, tokenizer_dir, trust_remote_code,
                                    worker_extension_cls=f"{__name__}.{CheckpointLoader.__qualname__}", **sleeps)
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
        """Between requests: on a GPU, give its memory back to the stages that train."""
        from vllm.platforms import current_platform

        if self.llm is not None and current_platform.is_sleep_mode_available():
            self.llm.sleep(level=2)
            self.asleep = True

    def close(self) -> None:
        if self.llm is not None:
            llm, self.llm, self.asleep = self.llm, None, False
            shutdown_engine(llm)


@contextmanager
def output_to(stdout: int, stderr: int) -> Iterator[None]:
    """This process's stdout and stderr sent to a stage's for the duration. (The engine's own
    processes keep the sampler's: they outlive the stage.)"""
    saved = os.dup(1), os.dup(2)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original in zip((1, 2), saved):
            os.dup2(original, fd)
            os.close(original)


def answer(connection: Connection, engine: WarmEngine) -> None:
    """One stage's request: the completions, or the error, sent back."""
    try:
        request = connection.recv()
        stdout, stderr = recv_handle(connection), recv_handle(connection)
    except (EOFError, OSError):
        return  # the stage ended (was stopped) before its request was in
    try:
        settings = SamplingConfig.model_validate(request["settings"])
        how = engine.ready_for(Path(request["model_dir"]), settings, request["tokenizer_dir"],
                               request["trust_remote_code"])
        os.environ[STAGE_ENV] = request["stage"]  # names the progress bar
        with output_to(stdout, stderr):
            print(f"sampling {request['model_dir']} with {how}", flush=True)
            completions = generate_vllm(engine.llm, request["prompts"], settings, request["seeds"])
        engine.rest()
        reply = ("ok", completions)
    except Exception as error:
        engine.close()  # an engine that failed in a request is not trusted with the next
        reply = ("error", type(error).__name__, str(error), traceback.format_exc())
    finally:
        os.close(stdout)
        os.close(stderr)
    with suppress(OSError):  # a stage stopped meanwhile: the next is answered all the same
        connection.send(reply)


def serve(address: str, parent: int, ready: Connection) -> None:
    """The sampler's process: answer requests one at a time until stopped, or until the flow's
    process that started it is gone."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # shuts the engine down

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch_parent, name="parent watch", daemon=True).start()
    engine = WarmEngine()
    try:
        with Listener(address, family="AF_UNIX") as listener:
            ready.send(os.getpid())
            ready.close()
            while True:
                with listener.accept() as connection:
                    answer(connection, engine)
    finally:
        engine.close()


class Sampler:
    """The flow process's handle on its sampler process."""

    def __init__(self) -> None:
        self.process: Any = None
        self.folder = ""
        self.lock = threading.Lock()  # stages of pipelines run side by side ask from several threads

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
            self.process = context.Process(target=serve, args=(address, os.getpid(), sender), name="posttrain-sampler")
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

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace_s=30.0)
            self.process = None
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = ""


SAMPLER = Sampler()
atexit.register(SAMPLER.stop)


def sampler_env(sampling: SamplingConfig) -> dict[str, str]:
    """The environment of a stage that samples with these settings: the sampler's address where
    the warm engine is used (vLLM, one engine, `sampling.warm_engine`), else nothing."""
    warm = sampling.warm_engine and sampling.data_parallel_size == 1 and sampling.chosen_backend() == "vllm"
    return {SAMPLER_ENV: SAMPLER.address()} if warm else {}
