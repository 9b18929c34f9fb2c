"""A stage process's output on its way to the console and to the flow's log; a stop reaching the
stages other threads wait on (pipeline.runtime.process)."""

import os
import signal
import threading

import psutil
import pytest

from pipeline.runtime import process
from pipeline.runtime.process import Stopped, forward

BAR = b"sft: 10%\rsft: 50%\rsft: 100%\n"


def forwarded(chunks: list[bytes], log_line) -> bytes:
    """What `forward` copies to its target when `chunks` are written to its pipe one after another."""
    source, sink = os.pipe(), os.pipe()
    received = []
    reader = threading.Thread(target=lambda: received.extend(iter(lambda: os.read(sink[0], 1 << 16), b"")))
    reader.start()
    copier = threading.Thread(target=forward, args=(source[0], sink[1], log_line))
    copier.start()
    for chunk in chunks:
        os.write(source[1], chunk)
    os.close(source[1])
    copier.join(10)
    os.close(sink[1])
    reader.join(10)
    os.close(sink[0])
    return b"".join(received)


def test_output_is_copied_as_written_and_each_line_logged_once():
    lines = []
    chunks = [b"loading\n", BAR[:9], BAR[9:], b"a line cut ", b"across writes\n", b"\n", b"ended as on Windows\r\n",
              b"step 1\r", b"step 2\r", b"\rstep 3", b"\n", b"no newline at the end"]
    assert forwarded(chunks, lines.append) == b"".join(chunks)
    # A progress bar's redraws are one line, its last state (drawn before or after its carriage
    # return, across writes); blank lines are not logged.
    assert lines == ["loading", "sft: 100%", "a line cut across writes", "ended as on Windows", "step 3",
                     "no newline at the end"]


def test_a_failing_log_does_not_stop_the_output():
    calls = []

    def broken(text: str) -> None:
        calls.append(text)
        raise ConnectionError("the log's server is gone")

    chunks = [b"first\n", b"second\n" * 1000, BAR]
    assert forwarded(chunks, broken) == b"".join(chunks)
    assert calls == ["first"]  # not called again once it failed


def test_a_terminal_gets_a_pseudo_terminal_of_its_size_whose_end_ends_the_forwarding():
    import fcntl
    import struct
    import termios

    from pipeline.runtime.process import output_channel

    terminal, console = os.openpty()  # `console`: a terminal, as the user's would be
    fcntl.ioctl(console, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 123, 0, 0))
    read, write = output_channel(console)
    assert os.isatty(write)  # the stage's tqdm and colours see a terminal...
    assert struct.unpack("HHHH", fcntl.ioctl(write, termios.TIOCGWINSZ, bytes(8)))[:2] == (40, 123)  # ...this wide
    os.write(write, b"loading\nsft: 50%\rsft: 100%\n")
    os.close(write)  # the stage ended: reading the pseudo-terminal now fails with EIO, which ends the forwarding
    lines = []
    copied = forwarded_from(read, lines.append)
    assert copied == b"loading\r\nsft: 50%\rsft: 100%\r\n"  # the terminal's own line endings
    assert lines == ["loading", "sft: 100%"]
    _, log_file = os.pipe()
    assert not os.isatty(output_channel(log_file)[1])  # not a terminal (a CI log, a file): a pipe


def forwarded_from(source: int, log_line) -> bytes:
    sink = os.pipe()
    forward(source, sink[1], log_line)
    os.close(sink[1])
    with open(sink[0], "rb") as copied:
        return copied.read()


def test_a_stop_ends_the_stage_a_thread_waits_on(monkeypatch):
    """A compare's pipelines side by side wait on their stages in threads, which get no signal:
    the main thread's stop reaches them, and their stages' processes end."""
    monkeypatch.setattr(process, "stopping", [])
    raised, started = [], []

    def pipeline_thread():
        try:
            process.run_launched(["sleep", "60"], dict(os.environ), (1, 2))
        except Stopped as error:
            raised.append(error.signum)

    real_popen = process.subprocess.Popen
    monkeypatch.setattr(process.subprocess, "Popen", lambda *a, **k: started.append(real_popen(*a, **k)) or started[-1])
    thread = threading.Thread(target=pipeline_thread)
    thread.start()
    thread.join(1)
    assert thread.is_alive() and started and started[0].poll() is None  # the stage runs on
    process.stopping.append(signal.SIGTERM)  # what the main thread's handler records
    thread.join(10)
    assert raised == [signal.SIGTERM] and started[0].poll() is not None
    assert not psutil.pid_exists(started[0].pid) or psutil.Process(started[0].pid).status() == psutil.STATUS_ZOMBIE


def test_stop_on_signals_records_the_signal_for_the_other_threads(monkeypatch):
    monkeypatch.setattr(process, "stopping", [signal.SIGINT])  # an earlier run's
    # No exit after the grace the command line sets (a test in this process may have run it).
    monkeypatch.setattr(process, "stop_grace_s", None)
    with pytest.raises(Stopped), process.stop_on_signals():
        assert process.stopping == []  # a new run starts unstopped
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Event().wait(5)
    assert process.stopping == [signal.SIGTERM]


def test_a_launched_stage_past_its_limit_is_stopped_with_the_workers_in_sessions_of_their_own(tmp_path):
    """As torchrun starts them: out of the launcher's process group, and deaf to its SIGTERM
    (a worker hung in a collective)."""
    import sys

    worker = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
    launcher = (f"import subprocess, sys, time; w = subprocess.Popen([sys.executable, '-c', {worker!r}], "
                f"start_new_session=True); open({str(tmp_path / 'pid')!r}, 'w').write(str(w.pid)); time.sleep(120)")
    with pytest.raises(process.TimedOut):
        process.run_launched([sys.executable, "-c", launcher], dict(os.environ), (1, 2), limit_s=2)
    pid = int((tmp_path / "pid").read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    # A process that ends within its limit is not taken for one past it, however close.
    assert process.run_launched([sys.executable, "-c", "pass"], dict(os.environ), (1, 2), limit_s=0.001) == 0
