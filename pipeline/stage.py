"""Running a stage in its own process, so its memory (GPU memory too) is returned when it ends.

The parent writes a request (the config and the stage's path arguments) to the stage
folder and runs `python -m stages.<name> request.json`; a training stage whose config asks
for several processes runs as `accelerate launch ... -m stages.<name> request.json` instead.
A stage function takes the config and paths and returns a Manifest; under accelerate every
process runs it, and only the first writes the manifest, once all have finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.manifest import Manifest, atomic_write_text

REQUEST = "request.json"
ERROR = "error.txt"
# The stages that train: with `launch.num_processes` > 1 they start through `accelerate launch`.
LAUNCHED_STAGES = ("pretrain", "sft", "dpo")


class TransientError(RuntimeError):
    """A failure worth retrying as is (an engine that did not start, a lost connection); not bad input."""


TRANSIENT = {TransientError.__name__, TimeoutError.__name__, ConnectionError.__name__}


class StageError(RuntimeError):
    """A stage failed; the message says which and why, and where the full traceback is."""

    def __init__(self, message: str, error_type: str = ""):
        super().__init__(message)
        self.transient = error_type in TRANSIENT


def run_in_process(stage: str, cfg: PipelineConfig, out: Path, inputs: dict[str, str],
                   env: dict[str, str] | None = None, **paths: Path) -> Manifest:
    """Run `stages.<stage>.run(cfg, out, **paths)` in a child process with `env` added to its
    environment; `inputs` (upstream keys and digests) are recorded in the manifest for lineage."""
    out.mkdir(parents=True, exist_ok=True)
    request = {
        "config": cfg.model_dump(mode="json"),
        "out": str(out),
        "inputs": inputs,
        "paths": {k: str(v) for k, v in paths.items()},
    }
    atomic_write_text(out / REQUEST, json.dumps(request, indent=2))
    for old in [out / ERROR, *out.glob("traceback*.txt")]:  # an earlier attempt's
        old.unlink(missing_ok=True)
    command = stage_command(stage, cfg, out / REQUEST)
    result = subprocess.run(command, env=os.environ | (env or {}))
    if result.returncode != 0:
        reason = (out / ERROR).read_text().strip() if (out / ERROR).is_file() else ""
        others = " (the other processes': traceback-rank<N>.txt)" if "accelerate.commands.launch" in command else ""
        raise StageError(
            f"stage '{stage}' failed (exit code {result.returncode}): {reason or 'no error recorded'}\n"
            f"  full traceback: {out / 'traceback.txt'}{others}",
            error_type=re.sub(r"^rank \d+ ", "", reason).split(":", 1)[0],
        )
    return Manifest.read(out)


def stage_command(stage: str, cfg: PipelineConfig, request: Path) -> list[str]:
    """`python -m stages.<stage> request.json`, through `accelerate launch` for a training stage
    that the config gives more than one process."""
    module = ["-m", f"stages.{stage}", str(request)]
    launch = cfg.launch
    if stage not in LAUNCHED_STAGES or launch.num_processes == 1:
        return [sys.executable, *module]
    # Without a file: plain DDP (on a machine without GPUs torchrun's processes meet over gloo),
    # with the defaults accelerate would otherwise warn it assumed.
    where = ["--config_file", launch.accelerate_config] if launch.accelerate_config else [
        "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    # One machine: a free port, so two pipelines on it do not meet; several machines agree on the file's.
    port = [] if "main_process_port" in launch.accelerate_settings() else ["--main_process_port", str(free_port())]
    return [sys.executable, "-m", "accelerate.commands.launch", *where, "--num_processes", str(launch.num_processes),
            *port, *module]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_rank() -> tuple[int, int]:
    """This process's rank and the number of processes (torchrun's variables; 0 and 1 alone)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def stage_main(run: Callable[..., Manifest]) -> None:
    """Entry point of a stage module: `python -m stages.<name> request.json`. Writes the
    returned manifest last, so the stage counts as done only once all its outputs exist."""
    request = json.loads(Path(sys.argv[1]).read_text())
    out = Path(request["out"])
    run_id = os.environ.get("MLFLOW_RUN_ID")  # read now: MLflow's end_run() unsets it
    rank, processes = process_rank()
    try:
        cfg = PipelineConfig.model_validate(request["config"])
        start = time.perf_counter()
        manifest = run(cfg, out, **{k: Path(v) for k, v in request["paths"].items()})
        if processes > 1:
            import torch.distributed as dist

            if dist.is_initialized():  # the first process writes the manifest once every process is done
                dist.barrier()
        if rank == 0:
            manifest.inputs = request["inputs"]
            manifest.run_id = run_id
            manifest.write(out, started=start)
    except Exception as error:
        where = f"rank {rank} " if processes > 1 else ""
        (out / ("traceback.txt" if rank == 0 else f"traceback-rank{rank}.txt")).write_text(traceback.format_exc())
        # The first failing process's error is the cause: the others then fail on the lost connection.
        with contextlib.suppress(FileExistsError), open(out / ERROR, "x") as first:
            first.write(f"{where}{type(error).__name__}: {error}\n")
        print(f"error: {where}{error}", file=sys.stderr)
        sys.exit(1)
