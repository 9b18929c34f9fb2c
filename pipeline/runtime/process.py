"""Running a stage in its own process, so its memory (GPU memory too) is returned when it ends.

The parent writes a request (the config, the stage's input paths and what its manifest records
of its key) to the stage folder. A one-process stage is forked from a server that has imported
torch, transformers, TRL and the stages' modules once (`launch.preload`); without it the stage
runs as `python -m stages.<name> request.json`, and a training stage whose config asks for
several processes runs as `accelerate launch ... -m stages.<name> request.json`. A stage's `run`
takes the config and paths and returns a Manifest; under accelerate every process runs it, and
only the first writes the manifest, once all have finished.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import errno
import fcntl
import importlib
import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing import forkserver, reduction
from pathlib import Path
from typing import Any

from pipeline.config.schema import PipelineConfig
from pipeline.results.manifest import Manifest, atomic_write_text
from pipeline.runtime.contract import Stage

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
        self.timed_out = error_type == TimedOut.__name__


class TimedOut(Exception):
    """A stage's process ran past `launch.stage_timeout_s` (it has been stopped)."""


def run_in_process(stage: Stage, cfg: PipelineConfig, out: Path, record: dict[str, Any],
                   env: dict[str, str] | None = None, log_line: Callable[[str], None] | None = None,
                   **paths: Path) -> Manifest:
    """Run `stage.run(cfg, out, **paths)` in a child process with `env` added to its environment;
    `record` (the key's input digests, settings, samples key) goes into the manifest as is. Its
    output goes to this process's, and each line of it to `log_line` if given."""
    out.mkdir(parents=True, exist_ok=True)
    request = {
        "config": cfg.model_dump(mode="json"),
        "out": str(out),
        "record": record,
        "paths": {k: str(v) for k, v in paths.items()},
    }
    atomic_write_text(out / REQUEST, json.dumps(request, indent=2))
    for old in [out / ERROR, *out.glob("traceback*.txt")]:  # an earlier attempt's
        old.unlink(missing_ok=True)
    command = stage_command(stage, cfg, out / REQUEST)
    # Output that is forwarded (through a pipe) is flushed line by line, as on a terminal.
    env = os.environ | (env or {}) | ({"PYTHONUNBUFFERED": "1"} if log_line else {})
    limit = cfg.launch.stage_timeout_s
    try:
        with stage_output(log_line) as output:
            if command is None:
                start_fork_server(_preload or [stage], env.get("MLFLOW_TRACKING_URI"))  # a no-op once a stage started it
                exit_code = run_forked(stage.module, out / REQUEST, env, output, limit)
            else:
                exit_code = run_launched(command, env, output, limit)
    except TimedOut:
        shown = int(limit) if limit == int(limit) else limit
        raise StageError(f"stage '{stage.name}' ran past launch.stage_timeout_s ({shown} s) and was stopped (a hung "
                         "engine or collective, or a limit too short for the stage): raise the limit, or run again; "
                         "a training resumes from its last checkpoint", error_type=TimedOut.__name__) from None
    if exit_code != 0:
        if not (out / ERROR).is_file():  # killed: by the run's stop, which a thread may hear after the stage ended
            wait_or_stop(time.sleep)
        reason = (out / ERROR).read_text().strip() if (out / ERROR).is_file() else ""
        launched = command is not None and "accelerate.commands.launch" in command
        others = " (the other processes': traceback-rank<N>.txt)" if launched else ""
        if (out / "traceback.txt").is_file():
            where = f"  full traceback: {out / 'traceback.txt'}{others}"
        else:  # killed before it could say why: no traceback was written
            by = f" by {signal.Signals(-exit_code).name}" if exit_code < 0 else ""
            where = (f"  the process was killed{by} before it recorded an error (out of memory? the kernel log "
                     "says); run again to resume")
        raise StageError(f"stage '{stage.name}' failed (exit code {exit_code}): {reason or 'no error recorded'}\n{where}",
                         error_type=re.sub(r"^rank \d+ ", "", reason).split(":", 1)[0])
    return Manifest.read(out)


OUTPUT_DRAIN_S = 5.0  # after a stage's process ends, how long its last output may take to come through
STOPPED_DRAIN_S = 0.5  # the same for a stage that failed to start or was stopped: the run's stop grace is short


def output_channel(target: int) -> tuple[int, int]:
    """A (read, write) pair that carries a stage's output to `target`: where `target` is a
    terminal, a pseudo-terminal of its size, so that the stage's progress bars and colours show
    as they would on it; else a pipe."""
    if not os.isatty(target):
        return os.pipe()
    read, write = os.openpty()
    with contextlib.suppress(OSError):  # a terminal that does not say its size: the pty's default
        fcntl.ioctl(write, termios.TIOCSWINSZ, fcntl.ioctl(target, termios.TIOCGWINSZ, bytes(8)))
    return read, write


def chunks(source: int) -> Iterator[bytes]:
    """What a stage writes to the other end of `source`, until every writer has closed it (a
    pseudo-terminal says so with EIO)."""
    try:
        while True:
            try:
                chunk = os.read(source, 1 << 16)
            except OSError as error:
                if error.errno != errno.EIO:
                    raise
                return
            if not chunk:
                return
            yield chunk
    finally:
        os.close(source)


def shown(line: bytes) -> str:
    """A line as a terminal shows it once drawn: what follows its last carriage return (a
    progress bar's last state), trailing ones ending the line."""
    return line.rstrip(b"\r").rsplit(b"\r", 1)[-1].decode(errors="replace").rstrip()


def log_lines(lines: list[bytes], log_line: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """Hand each line, as shown, to `log_line`; None once it has failed, and from then on: a
    failing log must not hold up the stage's output."""
    for line in lines if log_line else ():
        if text := shown(line):
            try:
                log_line(text)
            except Exception:  # noqa: BLE001 - see above
                return None
    return log_line


def forward(source: int, target: int, log_line: Callable[[str], None]) -> None:
    """Copy a stage's output from `source` to `target` as it comes (progress bars redraw as they
    did), and hand each line, as it is shown, to `log_line`."""
    pending = b""
    for chunk in chunks(source):
        view = memoryview(chunk)
        while view:
            view = view[os.write(target, view):]
        *lines, pending = (pending + chunk).split(b"\n")
        # A bar that only redraws never ends its line: keep its latest state, not every one.
        pending = pending[pending.rstrip(b"\r").rfind(b"\r") + 1:]
        log_line = log_lines(lines, log_line)
    log_lines([pending], log_line)


@contextlib.contextmanager
def stage_output(log_line: Callable[[str], None] | None) -> Iterator[tuple[int, int]]:
    """The stdout and stderr to give a stage's process: this process's own, or, with `log_line`
    (the flow's: the Prefect task run's log), channels forwarded to them and to `log_line`."""
    if log_line is None:
        yield 1, 2
        return
    channels = [output_channel(1), output_channel(2)]
    # The threads run in the caller's context: the log sink may read it (Prefect's API and run).
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(forward, read, target, log_line),
                                name=f"stage output {target}", daemon=True)
               for (read, _), target in zip(channels, (1, 2))]
    for thread in threads:
        thread.start()
    drain = STOPPED_DRAIN_S
    try:
        yield channels[0][1], channels[1][1]
        drain = OUTPUT_DRAIN_S
    finally:
        for _, write in channels:  # the process holds its own copies: the channel ends once it (and its children) do
            os.close(write)
        for thread in threads:
            thread.join(drain)


def run_launched(command: list[str], env: dict[str, str], output: tuple[int, int],
                 limit_s: float | None = None) -> int:
    """Run a stage's command (`python -m`, or `accelerate launch` and its workers) in a process
    group of its own. Interrupted, or running past `limit_s`, the group is stopped, and every
    process it started: torchrun starts each worker in a session of its own, out of the group's
    reach, and SIGKILL to the launcher would leave a worker that ignores its SIGTERM running."""
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=output[0], stderr=output[1])
    try:
        wait_for(lambda: process.poll() is not None, process.wait, limit_s)
        return process.returncode
    except BaseException:
        started = descendants(process.pid) if process.poll() is None else []  # an ended one's pid may be another's now
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        kill_all(started)
        raise


def stage_command(stage: Stage, cfg: PipelineConfig, request: Path) -> list[str] | None:
    """`python -m stages.<stage> request.json`, through `accelerate launch` for a training stage
    that the config gives more than one process; None: forked from the preloaded server."""
    module = ["-m", stage.module, str(request)]
    launch = cfg.launch
    if not stage.trains or launch.num_processes == 1:
        return None if launch.preload else [sys.executable, *module]
    # Without a file: plain DDP (on a machine without GPUs torchrun's processes meet over gloo),
    # with the defaults accelerate would otherwise warn it assumed.
    where = ["--config_file", launch.accelerate_config] if launch.accelerate_config else [
        "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    # One machine: a free port, so two pipelines on it do not meet; several machines agree on the file's.
    port = [] if "main_process_port" in launch.accelerate_settings() else ["--main_process_port", str(free_port())]
    return [sys.executable, "-m", "accelerate.commands.launch", *where, "--num_processes", str(launch.num_processes),
            *port, *module]


STOP_ADVICE = ("every finished stage is kept, and a training stage resumes from its last checkpoint: run the same "
               "command again to go on")
# After SIGTERM or SIGINT, how long the run may take to stop in order before its process is ended.
# Set only by the command line, which owns the process; None: the caller handles the interrupt.
stop_grace_s: float | None = None


class Stopped(KeyboardInterrupt):
    """The run was stopped from outside, by ``signum``."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


# The signal that stopped the run, for the stages that other threads wait on (a `compare`'s
# pipelines side by side): only the main thread gets signals.
stopping: list[int] = []
STOP_POLL_S = 0.2


def raise_if_stopped() -> None:
    """Stopped, once the run is stopped: for the threads the signal does not interrupt."""
    if stopping:
        raise Stopped(stopping[0])


def wait_or_stop(wait: Callable[[float], Any]) -> None:
    """`wait(timeout)` for a stage's process a moment; raises Stopped once the run is stopped."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        wait(STOP_POLL_S)
    raise_if_stopped()


def wait_for(ended: Callable[[], bool], wait: Callable[[float], Any], limit_s: float | None) -> None:
    """Wait until a stage's process has `ended`, by `wait_or_stop`; raises TimedOut once it has
    run `limit_s` (from now) and still runs."""
    deadline = time.monotonic() + limit_s if limit_s else None
    while not ended():
        wait_or_stop(wait)
        if deadline is not None and time.monotonic() > deadline and not ended():
            raise TimedOut


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM (a scheduler, `kill`) and SIGINT (Ctrl-C) stop the run as an interrupt: the stage
    process is stopped, the MLflow runs end KILLED, finished stages and checkpoints stay.
    Installed inside the flow, over Prefect's handler, which would only mark the flow Crashed. A
    signal sent to the process group also ends the temporary Prefect server, which Prefect's
    clients would retry for minutes: `stop_grace_s` later the process ends, whatever still waits."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return

    def stop(signum: int, frame) -> None:
        for sig in previous:  # a second signal must not break off the cleanup the first one started
            signal.signal(sig, signal.SIG_IGN)
        stopping.append(signum)
        if stop_grace_s is not None:
            watchdog = threading.Timer(stop_grace_s, exit_stopped, (signum,))
            watchdog.daemon = True  # fires even while the interpreter's exit hangs on a lost server
            watchdog.start()
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    stopping.clear()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_stopped(signum: int) -> None:
    print(f"error: {Stopped(signum)}: {STOP_ADVICE}", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_rank() -> tuple[int, int]:
    """This process's rank and the number of processes (torchrun's variables; 0 and 1 alone)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ------------------------------------------------------------------ the preloaded server
# A fresh `python -m stages.<name>` spends 10-15 s of a small CPU importing torch, transformers
# and TRL; forking it from multiprocessing's fork server, which imported them once, takes a
# fraction of a second. The server only imports: it never initialises CUDA (a test checks), so
# each stage still sets up its own devices and gives all its memory back when it exits.


# MLflow's stores for a database URI (SQLite, PostgreSQL, MySQL, SQL Server): SQLAlchemy and alembic.
SQL_TRACKING = ("sqlite", "postgresql", "mysql", "mssql")


def preloaded_modules(stages: list[Stage], tracking_uri: str | None = None) -> list[str]:
    """What the fork server imports: the stages' modules, what their `run`s import (torch,
    transformers, TRL, datasets through them), and MLflow, which every stage logs with: with its
    system metrics' monitor where a stage records them, and its SQL store where the runs are kept
    in a database (each stage opens it: 1-2 s of imports, once per stage if not preloaded)."""
    mlflow = ["mlflow"]
    if any(stage.system_metrics for stage in stages):
        mlflow.append("mlflow.system_metrics.system_metrics_monitor")
    if tracking_uri and tracking_uri.split(":", 1)[0].split("+", 1)[0] in SQL_TRACKING:
        mlflow.append("mlflow.store.tracking.sqlalchemy_store")
    return sorted({*mlflow, *(m for stage in stages for m in (stage.module, *stage.preload))})


_preload: list[Stage] = []  # the stages the fork server preloads for when the first of them runs


def preload_for(stages: list[Stage]) -> None:
    """Have the fork server, once the first stage starts it, import what all these stages need.
    Not started here: a run whose stages are all reused must not pay for (or share the CPU
    with) imports of torch and TRL that nothing uses."""
    _preload[:] = stages


def start_fork_server(stages: list[Stage], tracking_uri: str | None = None) -> None:
    """Start the fork server now, preloading for `stages` (logging to `tracking_uri`); a no-op once it runs."""
    forkserver.set_forkserver_preload(preloaded_modules(stages, tracking_uri))
    forkserver.ensure_running()


class ParentFd:
    """One of the parent's file descriptors, handed to a child of the fork server: pickling it
    while the child starts registers the descriptor to be sent along (as multiprocessing does
    for its own connections); the child unpickles it as its copy's number."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return received_fd, (reduction.DupFd(self.fd),)


def received_fd(duplicate) -> int:
    return duplicate.detach()


def run_forked(module: str, request: Path, env: dict[str, str], output: tuple[int, int] = (1, 2),
               limit_s: float | None = None) -> int:
    """Run a stage module's request in a child of the fork server, with `env` as its environment
    and `output` (this process's file descriptors) as its stdout and stderr; its exit code
    (negative: killed by that signal). Running past `limit_s` (from its start) it is stopped."""
    sys.stdout.flush()
    sys.stderr.flush()
    child = multiprocessing.get_context("forkserver").Process(
        target=forked_stage, args=(module, request, env, *map(ParentFd, output)), name=module)
    try:
        forkserver.ensure_running()  # preloaded where run_in_process started it (start_fork_server)
        child.start()
    except (OSError, EOFError) as error:  # the server died (an import failed) or an fd is closed
        raise StageError(f"{module}: the fork server could not start it ({type(error).__name__}: {error}); "
                         "launch.preload: false starts stages as `python -m`") from error
    try:
        wait_for(lambda: child.exitcode is not None, child.join, limit_s)
    except BaseException:  # interrupted or timed out: the stage (and what it started) must not outlive its pipeline
        stop_process(child, grace_s=5.0)
        raise
    exit_code = child.exitcode
    child.close()
    return exit_code


def stop_process(process: Any, grace_s: float) -> None:
    """SIGTERM to a multiprocessing child, then, after `grace_s`, SIGKILL to what is left of it
    and of the processes it started (a vLLM engine's, a data loader's workers)."""
    started = descendants(process.pid) if process.is_alive() else []  # an ended one's pid may be another's now
    if process.is_alive():
        process.terminate()
        process.join(grace_s)
    if process.is_alive():
        process.kill()
        process.join()
    kill_all(started)


def descendants(pid: int) -> list:
    """The processes `pid` started, and theirs (psutil.Process objects), while it runs: once it
    ends they are orphans that nothing names."""
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_all(processes: list, wait_s: float = 10.0) -> None:
    """SIGKILL to each (psutil.Process: one whose pid went to another process is left alone), and
    wait until they are gone, so that the memory they held (a GPU's) is free on return."""
    import psutil

    def running(process) -> bool:  # a zombie holds no memory: its parent (an orphan's: init) has yet to reap it
        with contextlib.suppress(psutil.NoSuchProcess):
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        return False

    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    deadline = time.monotonic() + wait_s
    while any(map(running, processes)) and time.monotonic() < deadline:
        time.sleep(0.05)


def forked_stage(module: str, request: Path, env: dict[str, str], stdout: int, stderr: int) -> None:
    """In the child: what a fresh `python -m <module> request.json` would have (its environment,
    output, arguments, start method, thread count, random state), then the stage as `stage_main`
    runs it, and the exit steps an interpreter takes."""
    import numpy as np
    import torch

    os.environ.clear()
    os.environ.update(env)
    for received, fd in ((stdout, 1), (stderr, 2)):
        os.dup2(received, fd)
        os.close(received)
    sys.stdout.reconfigure(line_buffering=True)  # the server's, whatever its own stdout was: as PYTHONUNBUFFERED
    sys.argv = [module, str(request)]
    multiprocessing.set_start_method(None, force=True)  # the platform's default again, not forkserver
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))  # torch read the server's at import
    np.random.seed()  # from the OS, as at a process start, not the server's state
    try:
        run_request(importlib.import_module(module).STAGE, request)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # multiprocessing ends its children with os._exit, skipping an interpreter's exit steps:
        # join the threads (MLflow's async logging), then what the stage registered to run at exit
        # (MLflow ends and flushes its run there).
        threading._shutdown()
        atexit._run_exitfuncs()


# -------------------------------------------------------------------- a stage's process


def stage_main(stage: Stage) -> None:
    """Entry point of a stage module: `python -m stages.<name> request.json`."""
    run_request(stage, Path(sys.argv[1]))


def run_request(stage: Stage, request_file: Path) -> None:
    """Run a stage's request. Writes the returned manifest last, so the stage counts as done only
    once all its outputs exist; a failure exits with 1 after writing error.txt and the traceback."""
    request = json.loads(request_file.read_text())
    out = Path(request["out"])
    run_id = os.environ.get("MLFLOW_RUN_ID")  # read now: MLflow's end_run() unsets it
    rank, processes = process_rank()
    monitor = None
    if run_id and rank == 0 and stage.system_metrics:
        # MLflow's own system metrics (CPU, memory, disk, network, GPU), every
        # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10 by default), into the stage's run.
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id)
        monitor.start()
    try:
        cfg = PipelineConfig.model_validate(request["config"])
        start = time.time(), time.perf_counter()
        manifest = stage.run(cfg, out, **{k: Path(v) for k, v in request["paths"].items()})
        if processes > 1:
            import torch.distributed as dist

            if dist.is_initialized():  # the first process writes the manifest once every process is done
                dist.barrier()
        if rank == 0:
            for name, value in request["record"].items():  # inputs, settings, samples_key
                setattr(manifest, name, value)
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
    finally:
        if monitor is not None:
            monitor.finish()
