"""A stage module for tests/e2e/test_stage_launch.py: it reports what its process sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from pipeline.config.schema import PipelineConfig
from pipeline.results.manifest import Manifest
from pipeline.runtime.contract import Stage
from pipeline.runtime.process import stage_main

PRELOADED = "trl" in sys.modules  # at import: in the fork server, after the stages' preloads brought TRL in


def run(cfg: PipelineConfig, out: Path) -> Manifest:
    print("probe says hello on stdout", flush=True)
    print("probe says hello on stderr", file=sys.stderr, flush=True)
    if os.environ.get("PROBE_FAIL"):
        raise ValueError("the probe was told to fail")
    if hang := os.environ.get("PROBE_HANG"):  # as a hung engine: it starts a process, says both pids, then waits
        engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        Path(hang).write_text(f"{os.getpid()} {engine.pid}")
        threading.Event().wait(60)  # then goes on: a broken time limit fails its test rather than hang it
    import multiprocessing

    import numpy as np
    import torch

    seen = {"pid": os.getpid(), "preloaded": PRELOADED, "threads": torch.get_num_threads(), "argv": sys.argv,
            "start_method": multiprocessing.get_start_method(), "numpy_draw": int(np.random.randint(2**31)),
            "env": {k: os.environ.get(k) for k in ("PROBE_VALUE", "PROBE_UNSET")}}
    (out / "seen.json").write_text(json.dumps(seen))
    return Manifest("probe", out.name, {"seen": "seen.json"})


class ProbeStage(Stage):
    @property
    def module(self) -> str:  # this test module, not one of stages/
        return "tests.e2e.stage_probe"


STAGE = ProbeStage("probe", run, lambda cfg: {})

if __name__ == "__main__":  # launch.preload: false runs it as `python -m tests.e2e.stage_probe request.json`
    stage_main(STAGE)
