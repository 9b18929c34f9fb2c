"""Running a stage in its own process, so its memory (GPU memory too) is returned when it ends.

The parent writes a request (the config and the stage's path arguments) to the stage
folder and runs `python -m stages.<name> request.json`; the same module runs under
`accelerate launch -m` on several devices. A stage function takes the config and paths and
returns a Manifest.
"""

from __future__ import annotations

import json
import os
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
    (out / ERROR).unlink(missing_ok=True)
    result = subprocess.run([sys.executable, "-m", f"stages.{stage}", str(out / REQUEST)], env=os.environ | (env or {}))
    if result.returncode != 0:
        reason = (out / ERROR).read_text().strip() if (out / ERROR).is_file() else ""
        raise StageError(
            f"stage '{stage}' failed (exit code {result.returncode}): {reason or 'no error recorded'}\n"
            f"  full traceback: {out / 'traceback.txt'}",
            error_type=reason.split(":", 1)[0],
        )
    return Manifest.read(out)


def stage_main(run: Callable[..., Manifest]) -> None:
    """Entry point of a stage module: `python -m stages.<name> request.json`. Writes the
    returned manifest last, so the stage counts as done only once all its outputs exist."""
    request = json.loads(Path(sys.argv[1]).read_text())
    out = Path(request["out"])
    run_id = os.environ.get("MLFLOW_RUN_ID")  # read now: MLflow's end_run() unsets it
    try:
        cfg = PipelineConfig.model_validate(request["config"])
        start = time.perf_counter()
        manifest = run(cfg, out, **{k: Path(v) for k, v in request["paths"].items()})
        manifest.inputs = request["inputs"]
        manifest.run_id = run_id
        manifest.write(out, started=start)
    except Exception as error:
        (out / "traceback.txt").write_text(traceback.format_exc())
        (out / ERROR).write_text(f"{type(error).__name__}: {error}\n")
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
