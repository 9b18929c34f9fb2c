"""What `posttrain ui` costs to start: `mlflow ui` as MLflow starts it (its default workers and
GenAI job runner) against the command `posttrain ui` runs (one web worker, no job runner).

    python bench/mlflow_ui.py [STORE]    # STORE: an MLflow store URI; default: results/mlflow.db

Each is started on a free port, timed from the start to the first answer of its /health page
(then of the experiments search the UI's first page asks for), and measured by the peak
resident memory of its whole process tree while it runs for a few seconds more; then stopped.
One after the other, in one run, so the ratios compare like with like.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.runtime.process import free_port  # noqa: E402
from pipeline.tracking.tracker import ui_command  # noqa: E402


def measure(command: list[str], env: dict[str, str], port: int, settle_s: float = 10.0) -> tuple[float, float]:
    """Seconds to the first answer, and peak memory (GB) of the process tree."""
    start = time.perf_counter()
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    peak = 0.0

    def sample() -> None:
        nonlocal peak
        try:
            tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()) / 1e9)
        except psutil.NoSuchProcess:
            pass

    try:
        while True:
            sample()
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok and requests.post(
                        f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search",
                        json={"max_results": 10}, timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            if time.perf_counter() - start > 300:
                raise RuntimeError(f"{command} did not answer within 300 s")
            time.sleep(0.2)
        answered = time.perf_counter() - start
        until = time.perf_counter() + settle_s
        while time.perf_counter() < until:
            sample()
            time.sleep(0.5)
        return answered, peak
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def main() -> None:
    store = sys.argv[1] if len(sys.argv) > 1 else f"sqlite:///{Path('results/mlflow.db').resolve()}"
    plain = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store]
    results = {}
    port = free_port()
    results["mlflow ui (MLflow's defaults)"] = measure([*plain, "--port", str(port)], os.environ.copy(), port)
    port = free_port()
    command, env = ui_command(store, port)
    results["posttrain ui"] = measure(command, os.environ | env, port)
    for name, (seconds, memory) in results.items():
        print(f"{name:32s} answers after {seconds:6.1f} s, peak memory {memory:5.2f} GB")
    (base_s, base_gb), (ours_s, ours_gb) = results.values()
    print(f"posttrain ui / mlflow ui: {ours_s / base_s:.2f}x the time, {ours_gb / base_gb:.2f}x the memory")


if __name__ == "__main__":
    main()
