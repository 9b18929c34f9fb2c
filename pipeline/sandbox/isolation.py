"""Run untrusted (model-written) Python in bubblewrap. Linux only.

UNSAFE BY NATURE. bubblewrap is not a VM: the code runs on the host kernel, so a kernel bug is a
way out. Use it only for code you are prepared to run on this machine.

The isolation is bubblewrap's (`bwrap`, Debian's `bubblewrap`; `make sandbox` installs it), a
maintained tool rather than hand-made namespaces. The program runs in new user, pid, ipc,
network, mount, uts and cgroup namespaces:

* a root that holds only /usr (and the interpreter's own prefix when it lives elsewhere),
  remounted read-only with /dev; a private size-capped tmpfs at /tmp as its working folder; a
  /proc of its own pid namespace: no host process is visible or can be signalled, and no home,
  results folder, `mlflow.db`, host socket or FIFO is there to open;
* no network (an empty network namespace, not even the host's 127.0.0.1), no SysV IPC object of
  the host's, and its own IPC objects go with its namespace;
* no capabilities, `no_new_privs`, no inherited file descriptors beyond stdin, stdout and stderr;
* when the program's first process ends, the kernel kills every process left in its pid
  namespace: nothing outlives the run, not even one that called `setsid`;
* limits that hold for the whole process tree: at most `max_processes` processes (RLIMIT_NPROC,
  which the kernel counts in the sandbox's own user namespace), each with an address space of
  `memory_mb / max_processes`, so the tree stays within `memory_mb`; CPU time, file size and open
  files capped; no core dumps; a wall-clock timeout and an output cap, enforced from outside.
* Started as root, the program runs as a fresh, unassigned uid: the kernel exempts root's own
  processes from RLIMIT_NPROC, and a way out of the namespaces would land as nobody in particular.

Where bubblewrap is missing or cannot create its namespaces (e.g. under Docker's default seccomp
profile), `run_untrusted` refuses with `SandboxUnavailable`, saying what to install, unless the
caller passes `unsafe=True`: then only the limits, the timeout and (as root) the fresh uid apply;
not root, there is no process limit either; the program can read and write what its user can
and reach the network.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

BWRAP = "bwrap"
INSTALL_HINT = "install bubblewrap (`apt install bubblewrap`, or `make sandbox`)"
# Above systemd's container uid ranges (up to 1879048191), below 2**31 so no tool sees a negative uid.
_UID_RANGE = (2_000_000_000, 2_100_000_000)
_INSIDE_UID = 1000  # the uid the program sees; outside it is the caller's or the fresh one
_MAX_OPEN_FILES = 64
_MIN_PROCESS_MB = 32  # an interpreter needs about 20 MB of address space to start


class SandboxUnavailable(RuntimeError):
    """bubblewrap cannot isolate programs on this machine; the message says what to do."""


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # negative: killed by that signal. Not a verdict: the program chooses it
    stdout: str  # truncated to max_output_bytes
    stderr: str  # truncated to max_output_bytes
    timed_out: bool
    killed_reason: str | None  # "timeout", "output_limit" or None
    duration_s: float
    isolated: bool  # bubblewrap's namespaces were in force (False only with unsafe=True)
    host_uid: int  # the uid the program ran as, outside its namespace


@functools.cache  # one trial per process: `validate`, each stage and each verdict ask
def sandbox_problem() -> str | None:
    """None when bubblewrap can isolate a program here; else why not and what to do."""
    if shutil.which(BWRAP) is None:
        return f"bubblewrap (bwrap) is not installed: {INSTALL_HINT}"
    uid = _fresh_uid()
    trial = subprocess.run(_bwrap_args(disk_mb=1) + ["--", "/usr/bin/true"], capture_output=True, text=True,
                           timeout=30, **_as_user(uid))
    if trial.returncode != 0:
        return (f"bubblewrap cannot create its namespaces here ({trial.stderr.strip() or trial.returncode}): "
                "allow unprivileged user namespaces, or run where they are allowed")
    return None


def require_isolation() -> None:
    """Raise SandboxUnavailable, saying what to do, where bubblewrap cannot isolate programs."""
    if problem := sandbox_problem():
        raise SandboxUnavailable(f"{problem}; or, knowing that model-written code then runs unisolated, "
                                 "set evaluate.code_isolation: none")


def run_untrusted(
    code: str,
    *,
    stdin: bytes = b"",
    timeout_s: float = 5.0,
    memory_mb: int = 1024,
    max_processes: int = 8,
    max_output_bytes: int = 64_000,
    max_file_mb: int = 16,
    disk_mb: int = 64,
    unsafe: bool = False,
) -> SandboxResult:
    """Run ``code`` as a Python script (fed ``stdin``) under the isolation and limits of the module
    docstring. ``unsafe``: run without isolation where bubblewrap cannot (never silently)."""
    if memory_mb // max_processes < _MIN_PROCESS_MB:
        raise ValueError(f"memory_mb / max_processes = {memory_mb // max_processes} MB per process; a Python "
                         f"process needs {_MIN_PROCESS_MB}: raise memory_mb or lower max_processes")
    if not unsafe:
        require_isolation()
    isolated = sandbox_problem() is None
    uid = _fresh_uid()
    interpreter = _interpreter(uid)
    base = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    try:
        script, feed = os.path.join(base, "main.py"), os.path.join(base, "stdin")
        with open(script, "w", encoding="utf-8") as f:
            f.write(code)
        with open(feed, "wb") as f:
            f.write(stdin)
        for path in (base, script):  # bwrap, running as that uid, must reach the script to mount it
            os.chown(path, uid, uid)
        cpu_s = math.ceil(timeout_s) + 1  # backstop for the wall clock: SIGXCPU, then SIGKILL at the hard limit
        limits = [f"--as={(memory_mb // max_processes) << 20}", f"--cpu={cpu_s}:{cpu_s + 1}",
                  f"--fsize={max_file_mb << 20}", f"--nofile={_MAX_OPEN_FILES}", "--core=0"]
        if isolated or uid != os.geteuid():
            # +1: bubblewrap's reaper (pid 1) counts too. Unisolated and not root, the count would
            # include every other process of the caller's uid.
            limits.append(f"--nproc={max_processes + 1}")
        program = ["prlimit", *limits, "--", interpreter, "-I"]
        if isolated:
            prefix = os.path.dirname(os.path.dirname(os.path.realpath(interpreter)))
            command = _bwrap_args(disk_mb, prefix, script) + ["--", *program, "/sandbox/main.py"]
            env, cwd = None, None
        else:
            command = [*program, script]
            env, cwd = {"PATH": "/usr/bin:/bin", "HOME": base, "TMPDIR": base, "LANG": "C.UTF-8"}, base
        start = time.monotonic()
        with open(feed, "rb") as stdin_file:
            os.unlink(feed)  # unisolated, the program's folder is `base`: stdin (a nonce) is in no file there
            proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=stdin_file, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True, close_fds=True, **_as_user(uid))
        with proc:  # closes the pipes and reaps the child on the way out
            try:
                stdout, stderr, killed_reason = _supervise(proc, timeout_s, max_output_bytes)
            finally:
                _kill_all(proc, uid)  # what is left, or everything if supervising was interrupted
        return SandboxResult(
            returncode=proc.returncode,
            stdout=stdout.decode("utf-8", "replace"),
            stderr=stderr.decode("utf-8", "replace"),
            timed_out=killed_reason == "timeout",
            killed_reason=killed_reason,
            duration_s=time.monotonic() - start,
            isolated=isolated,
            host_uid=uid,
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _bwrap_args(disk_mb: int, prefix: str = "/usr", script: str | None = None) -> list[str]:
    args = [BWRAP, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--hostname", "sandbox", "--uid", str(_INSIDE_UID), "--gid", str(_INSIDE_UID),
            "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
            "--setenv", "TMPDIR", "/tmp", "--setenv", "LANG", "C.UTF-8", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):  # merged /usr: links; else mounts
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    if prefix != "/usr" and not prefix.startswith("/usr/"):
        args += ["--ro-bind", prefix, prefix]
    if script is not None:
        args += ["--ro-bind", script, "/sandbox/main.py"]
    # bwrap's root and /dev are tmpfs mounts of their own, writable and outside every limit until
    # remounted read-only, last: /tmp (size-capped) is the one place to write.
    return args + ["--proc", "/proc", "--dev", "/dev", "--size", str(disk_mb << 20), "--tmpfs", "/tmp",
                   "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp"]


def _as_user(uid: int) -> dict:
    """Popen's arguments to run as ``uid`` (set in C between fork and exec: safe from threads,
    unlike a preexec_fn; the verdicts run on threads)."""
    return {} if uid == os.geteuid() else {"user": uid, "group": uid, "extra_groups": []}


def _supervise(proc: subprocess.Popen, timeout_s: float, cap: int) -> tuple[bytes, bytes, str | None]:
    """Read both pipes with a byte cap until EOF, the deadline or the cap."""
    deadline = time.monotonic() + timeout_s
    out = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    killed_reason, exited = None, False
    with selectors.DefaultSelector() as selector:
        for fd in out:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map() and killed_reason is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                killed_reason = "timeout"
                break
            for key, _ in selector.select(min(remaining, 0.1)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                out[key.fd] += chunk
                if len(out[key.fd]) > cap:
                    killed_reason = "output_limit"
            if not exited and proc.poll() is not None:
                # Unisolated, leftover background processes may hold the pipes open: end them.
                exited = True
                _kill_all(proc, None)
    return bytes(out[proc.stdout.fileno()][:cap]), bytes(out[proc.stderr.fileno()][:cap]), killed_reason


def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
    # bwrap's group; with it goes the sandbox's pid 1 (--die-with-parent), and with that every
    # process in the sandbox's pid namespace.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if uid is None or uid == os.geteuid():
        return
    # Unisolated, processes that called setsid() escaped the group. kill(-1) from a process of the
    # fresh uid reaches exactly that uid's processes (never the caller), atomically.
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _fresh_uid() -> int:
    return random.randrange(*_UID_RANGE) if os.geteuid() == 0 else os.geteuid()


def _interpreter(uid: int) -> str:
    """The base interpreter (no virtual environment: the sandbox gets the standard library only),
    or the system's where the sandbox uid may not execute it (e.g. a pyenv under /root)."""
    candidates = (getattr(sys, "_base_executable", sys.executable), "/usr/bin/python3", "/usr/local/bin/python3")
    for candidate in candidates:
        if os.path.exists(candidate) and (uid == os.geteuid() or _others_can_execute(candidate)):
            return candidate
    raise SandboxUnavailable(f"no Python interpreter that uid {uid} may execute: install python3 under /usr")


def _others_can_execute(path: str) -> bool:
    real = os.path.realpath(path)
    dirs = {d for p in (os.path.abspath(path), real) for d in _ancestors(p)}
    try:
        return all(os.stat(p).st_mode & stat.S_IXOTH for p in (*dirs, real))
    except OSError:
        return False


def _ancestors(path: str) -> list[str]:
    parents = []
    while (parent := os.path.dirname(path)) != path:
        parents.append(parent)
        path = parent
    return parents
