"""Each test runs a real attack in the sandbox and checks, from outside, that it was contained.

Attacks that only an OS measure can stop are skipped (with the reason) where this machine does not
provide that measure, e.g. when the tests do not run as root; see SandboxResult.isolation."""

import os
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from pipeline.sandbox import run_untrusted
from pipeline.verifiers import get_verifier

SLACK_S = 2.0


@pytest.fixture(scope="module")
def isolation() -> dict[str, bool]:
    return run_untrusted("pass").isolation


@pytest.fixture
def needs(isolation):
    def check(*measures: str) -> None:
        missing = [m for m in measures if not isolation[m]]
        if missing:
            pytest.skip(f"sandbox isolation unavailable on this machine: {missing}")

    return check


def processes_of(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is ``uid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue  # exited while we looked
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
                pids.append(int(entry.name))
    return pids


def test_correct_solution_passes_and_wrong_fails():
    verify = get_verifier("code", allow_untrusted_code=True)
    tests = {"tests": "assert add(1, 2) == 3\nassert add(-1, 1) == 0"}
    assert verify("Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.", tests)
    assert not verify("```python\ndef add(a, b):\n    return a - b\n```", tests)
    assert not verify("def add(a, b) return", tests)  # syntax error
    humaneval = {"tests": "def check(candidate):\n    assert candidate(2) == 4\n", "entry_point": "double"}
    assert verify("def double(x):\n    return 2 * x\n", humaneval)
    assert not verify("def double(x):\n    return x\n", humaneval)


def test_infinite_loop_times_out():
    start = time.monotonic()
    result = run_untrusted("while True:\n    pass\n", timeout_s=1.0)
    assert result.timed_out and result.killed_reason == "timeout" and not result.passed
    assert time.monotonic() - start < 1.0 + SLACK_S


def test_memory_bomb_fails_and_parent_is_fine():
    result = run_untrusted("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))\n", memory_mb=256)
    assert not result.passed and not result.timed_out
    assert "MemoryError" in result.stderr
    assert run_untrusted("print('still fine')").stdout == "still fine\n"


def test_fork_bomb_is_contained_and_leaves_nothing(needs):
    needs("user")  # without a uid of its own, RLIMIT_NPROC counts the caller's processes too
    bomb = (
        "import os, time\n"
        "forks = 0\n"
        "for _ in range(500):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.setsid()  # try to escape the process group that gets killed\n"
        "            forks = 0  # count only this process's own children\n"
        "        else:\n"
        "            forks += 1\n"
        "    except OSError:\n"
        "        pass\n"
        "print('forks', forks, flush=True)\n"
        "time.sleep(60)\n"
    )
    start = time.monotonic()
    result = run_untrusted(bomb, timeout_s=2.0, max_processes=16)
    assert result.timed_out and time.monotonic() - start < 2.0 + SLACK_S
    assert 0 < sum(int(line.split()[1]) for line in result.stdout.splitlines()) < 16  # capped by RLIMIT_NPROC
    assert processes_of(result.sandbox_uid) == []


def test_cannot_write_outside_its_directory(needs):
    needs("filesystem")
    token = uuid.uuid4().hex
    targets = [f"/tmp/outside-{token}", os.path.join(os.getcwd(), f"outside-{token}"), f"/dev/shm/outside-{token}"]
    code = (
        f"import os\nfor path in {targets!r} + ['../../outside-{token}']:\n"
        "    try:\n        open(path, 'w').write('x')\n        print('WROTE', path)\n"
        "    except OSError as e:\n        print('blocked', path, e)\n"
        "open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())\n"
    )
    try:
        result = run_untrusted(code)
        assert "WROTE" not in result.stdout and result.stdout.count("blocked") == 4
        assert result.stdout.endswith("ok\n")  # its own directory is writable
        assert not any(os.path.exists(p) for p in [*targets, f"/tmp/outside-{token}"])
    finally:
        for path in targets:
            Path(path).unlink(missing_ok=True)


def test_cannot_read_a_private_file(needs, tmp_path):
    needs("user")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    secret = private / "secret.txt"
    secret.write_text(f"SECRET-{uuid.uuid4().hex}")
    result = run_untrusted(f"print(open({str(secret)!r}).read())")
    assert not result.passed and "PermissionError" in result.stderr
    assert secret.read_text() not in result.stdout


def test_cannot_connect_to_the_host(needs):
    needs("network")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        port = server.getsockname()[1]
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'leak')\nprint('CONNECTED')"
        result = run_untrusted(code)
        assert not result.passed and "CONNECTED" not in result.stdout
        with pytest.raises(TimeoutError):
            server.accept()


def test_shell_runs_but_is_contained(needs):
    needs("user", "filesystem")
    token = uuid.uuid4().hex
    victim = f"/tmp/outside-{token}"
    code = (
        "import os, subprocess\n"
        f"os.system('id -u; touch {victim}; kill -9 {os.getpid()}')\n"
        f"subprocess.run(['sh', '-c', 'echo x > {victim}'])\n"
    )
    try:
        result = run_untrusted(code)
        assert str(result.sandbox_uid) in result.stdout  # the shell really ran, as the sandbox uid
        assert not os.path.exists(victim)
    finally:
        Path(victim).unlink(missing_ok=True)
    os.kill(os.getpid(), 0)  # and we are alive


def test_huge_output_is_truncated_and_killed():
    start = time.monotonic()
    result = run_untrusted("while True:\n    print('x' * 1000)\n", max_output_bytes=10_000, timeout_s=5.0)
    assert result.killed_reason == "output_limit" and not result.passed
    assert 0 < len(result.stdout) <= 10_000
    assert time.monotonic() - start < 2.0


def test_cannot_kill_the_parent(needs):
    needs("user")
    code = (
        "import os, signal\n"
        f"for pid in (os.getppid(), {os.getpid()}):\n"
        "    try:\n        os.kill(pid, signal.SIGKILL)\n        print('KILLED', pid)\n"
        "    except PermissionError:\n        print('denied', pid)\n"
    )
    result = run_untrusted(code)
    assert result.stdout.count("denied") == 2 and "KILLED" not in result.stdout
    os.kill(os.getpid(), 0)


def test_cannot_delete_files_outside(needs):
    needs("filesystem")
    shared = Path(tempfile.mkdtemp(prefix="sandbox-victim-"))
    try:
        shared.chmod(0o777)  # world-writable and not sticky: only the read-only mount protects it
        victim = shared / "victim.txt"
        victim.write_text("keep me")
        victim.chmod(0o666)
        code = f"import os, shutil\nos.remove({str(victim)!r})\nshutil.rmtree({str(shared)!r})\n"
        result = run_untrusted(code)
        assert not result.passed and "Read-only file system" in result.stderr
        assert victim.read_text() == "keep me"
    finally:
        victim.unlink(missing_ok=True)
        shared.rmdir()
