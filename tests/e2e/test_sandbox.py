"""Each test runs a real attack through the sandbox (bubblewrap) and checks, from outside, the
verdict and that nothing was reached or outlived the run. docs/robustness.md's sandbox table
lists each attack with its test."""

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.config.schema import DataSource
from pipeline.data.sources import CODE_FIELDS, read_jsonl, reference
from pipeline.evaluation.verifiers import code_program, get_verifier
from pipeline.sandbox import isolation
from pipeline.sandbox.isolation import SandboxUnavailable, run_untrusted

SLACK_S = 3.0
REPO = Path(__file__).resolve().parents[2]
DOUBLE = {"prompt": "", "test": "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(5) == 10\n",
          "entry_point": "double"}
verify = get_verifier("code", allow_untrusted_code=True)
EXIT_CHEATS = [
    "import sys\nsys.exit(0)",  # at top level, before any test ran
    "import os\ndef double(x):\n    os._exit(0)",
    "def double(x):\n    raise SystemExit(0)",
    "import atexit, os\natexit.register(lambda: os._exit(0))\ndef double(x):\n    return x",
    "import sys, os\nsys.excepthook = lambda *a: os._exit(0)\ndef double(x):\n    return x",
    # run everything again with the asserts stripped
    "import os, sys\nif sys.flags.optimize == 0:\n    os.execv(sys.executable, [sys.executable, '-O', *sys.argv])\n"
    "def double(x):\n    return x",
    "import os\nos.execv('/bin/true', ['true'])",
]
COMPARISON_CHEATS = [
    ("class Anything:\n    def __eq__(self, other):\n        return True\n"
     "def double(x):\n    return Anything()", DOUBLE),
    ("class Int(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
     "def double(x):\n    return [Int(0)]", DOUBLE | {"test": "def check(candidate):\n    assert candidate(2) == [4]\n"}),
    ("import builtins\nbuiltins.abs = lambda x: 0\ndef double(x):\n    return 0.0",
     DOUBLE | {"test": "def check(candidate):\n    assert abs(candidate(2) - 4.0) < 1e-6\n"}),
    ("import math\nmath.isclose = lambda *a, **k: True\ndef double(x):\n    return 0.0",
     DOUBLE | {"test": "import math\ndef check(candidate):\n    assert math.isclose(candidate(2), 4.0)\n"}),
    # read the expected answers back from the program's own file, argv or stdin
    ("import re, sys\ntext = ''\nfor path in (sys.argv[0], '/proc/self/cmdline', '/dev/stdin', '/proc/self/fd/0'):\n"
     "    try:\n        text += open(path, errors='replace').read()\n    except OSError:\n        pass\n"
     "found = dict(re.findall(r'candidate\\((\\d+)\\) == (\\d+)', text))\n"
     "def double(x):\n    return int(found.get(str(x), -1))", DOUBLE),
    # a class whose own equality (its metaclass's) makes it pass for a plain type
    ("class M(type):\n    def __eq__(cls, other):\n        return True\n    __hash__ = type.__hash__\n"
     "class Anything(metaclass=M):\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
     "def double(x):\n    return Anything()", DOUBLE),
    # a global of the solution's that shadows the built-in, or the prompt's helper, the tests call
    ("def abs(x):\n    return 0\ndef double(x):\n    return 0.0",
     DOUBLE | {"test": "def check(candidate):\n    assert abs(candidate(2) - 4.0) < 1e-6\n"}),
    ("def twice(x):\n    return 0\ndef double(x):\n    return 1",
     {"prompt": "def twice(x):\n    return 2 * x\n\n\ndef double(x):\n    \"\"\"Twice x.\"\"\"\n",
      "test": "def check(candidate):\n    assert candidate(3) == twice(3)\n", "entry_point": "double"}),
    # a stand-in for a module, whose __dict__ is the real one's
    ("import sys, math as real\nclass Fake:\n    __dict__ = property(lambda self: real.__dict__)\n"
     "    def __getattr__(self, name):\n        return getattr(real, name)\n    isclose = staticmethod(lambda *a, **k: True)\n"
     "sys.modules['math'] = Fake()\ndef double(x):\n    return 0.0",
     DOUBLE | {"test": "import math\ndef check(candidate):\n    assert math.isclose(candidate(2), 4.0)\n"}),
    # the nonce from the caller's frame, or from the harness's memory, environment or descriptors
    ("import os, sys, re\nnonce = None\ntry:\n    nonce = sys._getframe(1).f_locals.get('nonce')\nexcept ValueError:\n"
     "    pass\nfor name in ('mem', 'environ', 'cmdline', 'fd/0', 'fd/1'):\n    try:\n"
     "        data = open(f'/proc/{os.getppid()}/{name}', 'rb').read(1 << 20)\n"
     "        nonce = nonce or (re.findall(rb'[0-9a-f]{32}', data) or [b''])[0].decode() or None\n"
     "    except OSError:\n        pass\nif nonce:\n    os.write(1, f'\\n{nonce} passed\\n'.encode())\n    os._exit(0)\n"
     "def double(x):\n    return x", DOUBLE),
]


def solution(code: str, problem: dict = DOUBLE) -> bool:
    """The verdict on a chat model's answer holding ``code``."""
    return verify(f"Here you go:\n```python\n{code}\n```\n", problem)


def live_cmdlines() -> list[str]:
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue  # exited while we looked
    return lines


# --- the verdict ------------------------------------------------------------------------------

def test_correct_solution_passes_and_wrong_ones_fail():
    assert solution("def double(x):\n    return 2 * x")
    assert not solution("def double(x):\n    return x + 2")  # right at 2, wrong at 5
    assert not solution("def double(x) return")  # syntax error
    assert not verify("", DOUBLE)
    # A base model continues the prompt (HumanEval's convention): the prompt holds the signature.
    problem = DOUBLE | {"prompt": "def double(x):\n    \"\"\"Twice x.\"\"\"\n"}
    assert verify("    return x * 2\n", problem)
    assert not verify("    return x\n", problem)
    assert code_program("    return x * 2\n", problem) == problem["prompt"] + "    return x * 2\n"
    # a continuation ends where the function does (HumanEval's stop sequences); a main guard is not run
    assert verify("    return x * 2\n\ndef main():\n    syntax error\n", problem)
    assert verify("    return x * 2\n", problem | {"prompt": "if __name__ == '__main__':\n    input()\n" + problem["prompt"]})


@pytest.mark.parametrize("cheat", EXIT_CHEATS)
def test_exiting_or_execing_before_the_tests_return_is_not_a_pass(cheat):
    assert not solution(cheat)


@pytest.mark.parametrize("cheat, problem", COMPARISON_CHEATS)
def test_cheating_the_comparison_is_not_a_pass(cheat, problem):
    assert not solution(cheat, problem)


def test_humaneval_canonical_solutions_pass_and_broken_ones_fail():
    rows = read_jsonl(DataSource(suite="humaneval", verifier="code").file, CODE_FIELDS)
    assert len(rows) == 164
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        canonical = list(pool.map(lambda r: verify(r["canonical_solution"], reference(r)), rows))
        broken = list(pool.map(lambda r: verify("    return None\n", reference(r)), rows))  # runs, answers nothing
    assert [r["task_id"] for r, ok in zip(rows, canonical) if not ok] == []
    assert [r["task_id"] for r, ok in zip(rows, broken) if ok] == []


# --- containment ------------------------------------------------------------------------------

def test_infinite_loop_times_out():
    start = time.monotonic()
    result = run_untrusted("while True:\n    pass\n", timeout_s=1.0)
    assert result.timed_out and result.killed_reason == "timeout"
    assert time.monotonic() - start < 1.0 + SLACK_S


def test_memory_bomb_fails_and_parent_is_fine():
    result = run_untrusted("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))\n", memory_mb=256)
    assert result.returncode != 0 and not result.timed_out and "MemoryError" in result.stderr
    assert run_untrusted("print('still fine')").stdout == "still fine\n"


def test_children_share_one_memory_budget():
    code = ("import os\nkids = []\nfor _ in range(8):\n    pid = os.fork()\n    if pid == 0:\n"
            "        try:\n            block = bytearray(400 * 2**20)\n            print('ALLOCATED', flush=True)\n"
            "        except MemoryError:\n            print('refused', flush=True)\n        os._exit(0)\n"
            "    kids.append(pid)\nfor pid in kids:\n    os.waitpid(pid, 0)\n")
    result = run_untrusted(code, memory_mb=512, max_processes=9, timeout_s=20)  # the parent and its 8
    assert result.stdout.count("refused") == 8 and "ALLOCATED" not in result.stdout


def test_fork_bomb_is_capped_and_nothing_outlives_the_run():
    marker = f"bomb-{uuid.uuid4().hex}"
    bomb = (
        "import os, time, subprocess\n"
        f"subprocess.Popen(['sleep', '600', '{marker}'], start_new_session=True)  # a detached survivor\n"
        "forks = 0\n"
        "for _ in range(500):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.setsid()  # leave the process group that gets killed\n"
        "            forks = 0  # count only this process's own children\n"
        "        else:\n"
        "            forks += 1\n"
        "    except OSError:\n"
        "        pass\n"
        "print('forks', forks, flush=True)\n"
        "time.sleep(600)\n"
    )
    start = time.monotonic()
    result = run_untrusted(bomb, timeout_s=3.0, max_processes=16)
    assert result.timed_out and time.monotonic() - start < 3.0 + SLACK_S
    assert 0 < sum(int(line.split()[1]) for line in result.stdout.splitlines()) < 16  # capped by RLIMIT_NPROC
    time.sleep(0.5)  # the kernel tears the pid namespace down asynchronously
    assert not [line for line in live_cmdlines() if marker in line]


def test_ipc_objects_do_not_outlive_the_run():
    keys = [random.randrange(1 << 20, 1 << 30) for _ in range(3)]
    code = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nIPC_CREAT = 0o1000\n"
        f"shm = [libc.shmget({keys[0]} + i, ctypes.c_size_t(256 << 20), IPC_CREAT | 0o666) for i in range(4)]\n"
        f"msg = libc.msgget({keys[1]}, IPC_CREAT | 0o666)\n"
        f"sem = libc.semget({keys[2]}, 1, IPC_CREAT | 0o666)\n"
        "print('created', min(shm) >= 0 and msg >= 0 and sem >= 0)\n"
    )
    result = run_untrusted(code)
    assert result.stdout == "created True\n"
    host = {kind: Path(f"/proc/sysvipc/{kind}").read_text().split("\n")[1:] for kind in ("shm", "msg", "sem")}
    host_keys = {int(line.split()[0]) for lines in host.values() for line in lines if line.strip()}
    assert not host_keys & {keys[0], keys[0] + 1, keys[0] + 2, keys[0] + 3, keys[1], keys[2]}


def test_host_sockets_fifos_and_network_are_out_of_reach(tmp_path):
    shared = Path(tempfile.mkdtemp(prefix="sandbox-ipc-"))
    shared.chmod(0o777)
    fifo, path = shared / "fifo", shared / "socket"
    os.mkfifo(fifo, 0o666)
    abstract = f"\0posttrain-test-{uuid.uuid4().hex}"
    servers = [socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX), socket.socket()]
    try:
        servers[0].bind(str(path))
        path.chmod(0o777)
        servers[1].bind(abstract)
        servers[2].bind(("127.0.0.1", 0))
        for server in servers:
            server.listen()
            server.settimeout(0.3)
        code = (
            "import os, socket\n"
            f"for family, where in [(socket.AF_UNIX, {str(path)!r}), (socket.AF_UNIX, {abstract!r}),\n"
            f"                      (socket.AF_INET, ('127.0.0.1', {servers[2].getsockname()[1]}))]:\n"
            "    try:\n"
            "        s = socket.socket(family)\n        s.settimeout(2)\n        s.connect(where)\n"
            "        s.sendall(b'leak')\n        print('CONNECTED', where)\n"
            "    except OSError as e:\n        print('blocked', type(e).__name__)\n"
            "try:\n"
            f"    fd = os.open({str(fifo)!r}, os.O_WRONLY | os.O_NONBLOCK)\n    os.write(fd, b'leak')\n"
            "    print('WROTE fifo')\n"
            "except OSError as e:\n    print('blocked', type(e).__name__)\n"
        )
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that a writer would not fail for want of one
        result = run_untrusted(code)
        assert result.stdout.count("blocked") == 4 and "CONNECTED" not in result.stdout, result.stdout
        assert os.read(reader, 100) == b""
        os.close(reader)
        for server in servers:
            with pytest.raises(TimeoutError):
                server.accept()
    finally:
        for server in servers:
            server.close()
        fifo.unlink()
        path.unlink(missing_ok=True)
        shared.rmdir()


def test_host_processes_results_and_files_are_out_of_sight(tmp_path):
    secret = f"SECRET-{uuid.uuid4().hex}"
    results = tmp_path / "results"
    results.mkdir()
    (results / "domain_test.jsonl").write_text(secret)
    (results / "mlflow.db").write_text(secret)
    tmp_path.chmod(0o755)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"--api-key={secret}"])
    try:
        code = (
            "import os\nfound = []\n"
            "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
            "    try:\n        found.append(open(f'/proc/{pid}/cmdline').read())\n    except OSError:\n        pass\n"
            f"for path in [{str(results / 'domain_test.jsonl')!r}, {str(results / 'mlflow.db')!r}, '/root', '/home',"
            f" {os.getcwd()!r}]:\n"
            "    try:\n        found.append(open(path).read())\n    except OSError as e:\n"
            "        print('hidden', type(e).__name__)\n"
            "print(' '.join(found))\nprint('processes', len([p for p in os.listdir('/proc') if p.isdigit()]))\n"
        )
        result = run_untrusted(code)
        assert secret not in result.stdout and result.stdout.count("hidden") == 5
        assert int(result.stdout.split("processes")[1]) <= 3  # bwrap's pid 1, the program, nothing of the host's
    finally:
        victim.kill()
        victim.wait()


def test_cannot_write_outside_its_private_tmp():
    token = uuid.uuid4().hex
    targets = [f"/tmp/outside-{token}", f"/usr/outside-{token}", f"/outside-{token}", f"/dev/shm/outside-{token}",
               os.path.join(os.getcwd(), f"outside-{token}")]
    code = (
        f"for path in {targets!r}:\n"
        "    try:\n        open(path, 'w').write('x')\n        print('wrote', path)\n"
        "    except OSError as e:\n        print('blocked', type(e).__name__)\n"
    )
    try:
        result = run_untrusted(code)
        # its own /tmp is writable (and private); the rest is read-only (bwrap's root and /dev too) or not there
        assert result.stdout.splitlines()[0] == f"wrote /tmp/outside-{token}" and result.stdout.count("blocked") == 4
        assert not any(os.path.exists(p) for p in targets)
    finally:
        for path in targets:
            Path(path).unlink(missing_ok=True)


def test_cannot_signal_the_parent():
    code = f"import os, signal\ntry:\n    os.kill({os.getpid()}, signal.SIGKILL)\nexcept OSError as e:\n    print(type(e).__name__)\n"
    assert run_untrusted(code).stdout == "ProcessLookupError\n"  # outside its pid namespace: not there


def test_huge_output_is_truncated_and_killed():
    start = time.monotonic()
    result = run_untrusted("while True:\n    print('x' * 1000)\n", max_output_bytes=10_000, timeout_s=5.0)
    assert result.killed_reason == "output_limit" and 0 < len(result.stdout) <= 10_000
    assert time.monotonic() - start < SLACK_S


# --- without bubblewrap -----------------------------------------------------------------------

def test_without_bubblewrap_it_refuses_unless_told_unsafe(monkeypatch):
    monkeypatch.setattr(isolation, "BWRAP", "no-such-bwrap")
    isolation.sandbox_problem.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match=r"apt install bubblewrap.*code_isolation: none"):
            run_untrusted("print(1)")
        with pytest.raises(SandboxUnavailable, match="apt install bubblewrap"):
            get_verifier("code", allow_untrusted_code=True)
        result = run_untrusted("print(1)", unsafe=True)
        assert result.stdout == "1\n" and not result.isolated
        assert get_verifier("code", allow_untrusted_code=True, code_isolation="none")(
            "def double(x):\n    return 2 * x\n", DOUBLE)
    finally:
        isolation.sandbox_problem.cache_clear()


@pytest.mark.skipif(os.geteuid() != 0, reason="the suite already runs unprivileged: every test here is that case")
def test_an_unprivileged_user_gets_the_same_isolation():
    """As root the sandbox switches to a fresh uid itself; here the caller is unprivileged. It runs
    the system's Python on a copy of the sandbox's modules (standard library only) where that user
    can read them: the checkout may be under /root."""
    home = Path(tempfile.mkdtemp(prefix="sandbox-unprivileged-"))
    for module in ("__init__", "sandbox/__init__", "sandbox/isolation", "sandbox/code_harness", "evaluation/__init__",
                   "evaluation/verifiers"):
        (home / "pipeline" / f"{module}.py").parent.mkdir(parents=True, exist_ok=True)
        (home / "pipeline" / f"{module}.py").write_text((REPO / "pipeline" / f"{module}.py").read_text())
    for path in [home, *home.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    (home / "cheats.json").write_text(json.dumps([[c, DOUBLE] for c in EXIT_CHEATS] + COMPARISON_CHEATS))
    # what only the namespaces stop: a world-writable host folder, a host port, SysV IPC left behind
    shared = home / "shared"
    shared.mkdir()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.3)
    key = random.randrange(1 << 20, 1 << 30)
    (home / "escape.py").write_text(
        "import ctypes, socket\n"
        "try:\n"
        f"    open({str(shared / 'x')!r}, 'w').write('x')\n    print('WROTE')\n"
        "except OSError:\n    print('blocked')\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=2)\n    print('CONNECTED')\n"
        "except OSError:\n    print('blocked')\n"
        f"print('shm', ctypes.CDLL(None).shmget({key}, ctypes.c_size_t(1 << 20), 0o1666) >= 0)\n")
    script = home / "unprivileged.py"
    script.write_text(
        f"import json, sys\nsys.path.insert(0, {str(home)!r})\n"
        "from pipeline.sandbox.isolation import run_untrusted\nfrom pipeline.evaluation.verifiers import get_verifier\n"
        "verify = get_verifier('code', allow_untrusted_code=True)\n"
        f"cheats = json.load(open({str(home / 'cheats.json')!r}))\n"
        "bomb = 'import os\\nn = 0\\nfor _ in range(100):\\n    try:\\n        if os.fork() == 0:\\n            "
        "import time; time.sleep(5); os._exit(0)\\n        n += 1\\n    except OSError:\\n        break\\nprint(n)'\n"
        "print(json.dumps({'pass': verify('def double(x):\\n    return 2 * x\\n', cheats[0][1]),\n"
        "                  'cheats': [verify(f'```python\\n{c}\\n```', p) for c, p in cheats],\n"
        "                  'forks': run_untrusted(bomb, max_processes=8).stdout.strip(),\n"
        "                  'procs': run_untrusted('import os; print(sum(p.isdigit() for p in os.listdir(\"/proc\")))')"
        ".stdout.strip(),\n"
        f"                  'escape': run_untrusted(open({str(home / 'escape.py')!r}).read()).stdout}}))\n"
    )
    for path in [home, *home.rglob("*")]:
        path.chmod(0o777 if path == shared else 0o755 if path.is_dir() else 0o644)
    uid = random.randrange(1_900_000_000, 1_990_000_000)
    result = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "/usr/bin/python3", "-I",
                             str(script)], capture_output=True, text=True, timeout=60, cwd="/")
    try:
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
    written = (shared / "x").exists()
    shutil.rmtree(home)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["escape"] == "blocked\nblocked\nshm True\n" and not written
    assert key not in {int(line.split()[0]) for line in Path("/proc/sysvipc/shm").read_text().split("\n")[1:] if line.strip()}
    assert seen["pass"] and seen["cheats"] == [False] * (len(EXIT_CHEATS) + len(COMPARISON_CHEATS))
    assert 0 < int(seen["forks"]) < 8 and int(seen["procs"]) <= 3
