"""Run untrusted (model-written) Python in a child process under OS-level limits. Linux only.

UNSAFE BY NATURE. This is not a VM, a container runtime or a seccomp jail: the code runs on the host
kernel, so a kernel bug is a way out. Use it only for code you are prepared to run on this machine.

What it does (each measure degrades gracefully where the OS refuses it; ``SandboxResult.isolation``
records which ones were in force for that run):

* ``user``: when the parent is root, the child switches to a fresh, random, unassigned uid/gid
  (no supplementary groups) before the code starts, so normal file permissions apply to it, it cannot
  signal the parent or other users' processes, and ``RLIMIT_NPROC`` (which counts processes per uid and
  is not enforced for root) caps forks. Every process of that uid is killed when the run ends, including
  ones that left the process group. ``no_new_privs`` is set, so setuid binaries do not grant privileges.
* ``network``: a new, empty network namespace (only a loopback device that is down): no sockets out,
  not even to 127.0.0.1 of the host. Needs root (or CAP_SYS_ADMIN).
* ``filesystem``: a new mount namespace in which every mount is read-only, and the working directory
  is a private, size-capped tmpfs that disappears with the run. Needs root and Linux >= 5.12.
* Always: ``python -I`` (no env vars, no user site), a minimal environment, a throw-away temp
  directory, a new session (so the process group can be killed), wall-clock timeout, output capped
  while reading (the child is killed when over the cap), and rlimits on address space, CPU time,
  processes, file size, open files and core dumps.

What it does NOT guarantee: reads are limited only by file permissions (world-readable files,
``/proc`` of other processes, the interpreter's packages are visible); memory is capped per process
(total is up to ``max_processes`` x ``memory_mb``), not per run (that needs cgroups); there is no
syscall filter; without root the ``user``/``network``/``filesystem`` measures are off, so the code runs
as the calling user with network access and can write wherever that user can. No in-Python guards
(patching ``os.system`` etc.) are used on purpose: they are bypassable and would only look like security.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import random
import resource
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

# Linux constants (see unshare(2), mount(2), mount_setattr(2), prctl(2)).
_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x4000, 1 << 18
_SYS_MOUNT_SETATTR = 442  # same number on every architecture (syscalls added after 5.1 are unified)
_AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
# Above systemd's container uid ranges (up to 1879048191), below 2**31 so no tool sees a negative uid.
_UID_RANGE = (2_000_000_000, 2_100_000_000)
_MAX_OPEN_FILES = 64

_libc = ctypes.CDLL(None, use_errno=True)


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # negative: killed by that signal
    stdout: str  # truncated to max_output_bytes
    stderr: str  # truncated to max_output_bytes
    timed_out: bool
    killed_reason: str | None  # "timeout", "output_limit" or None
    duration_s: float
    isolation: dict[str, bool]  # which of "user", "network", "filesystem" were in force
    sandbox_uid: int | None  # the throw-away uid the code ran as (None when not started as root)

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and self.killed_reason is None


def run_untrusted(
    code: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_output_bytes: int = 64_000,
    max_processes: int = 16,
    max_file_mb: int = 16,
    disk_mb: int = 64,
    python: str | None = None,
) -> SandboxResult:
    """Run ``code`` as a Python script under the limits described in the module docstring."""
    uid = random.randrange(*_UID_RANGE) if os.geteuid() == 0 else None
    interpreter = python or _interpreter(needs_other_access=uid is not None)
    base = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    status_r, status_w = os.pipe()
    try:
        work, script = os.path.join(base, "work"), os.path.join(base, "main.py")
        os.mkdir(work, 0o700)
        with open(script, "w", encoding="utf-8") as f:
            f.write(code)
        if uid is not None:
            for path in (base, work, script):
                os.chown(path, uid, uid)
        cpu_s = math.ceil(timeout_s) + 1  # backstop for the wall clock: SIGXCPU, then SIGKILL at the hard limit
        limits = [
            (resource.RLIMIT_AS, _within_hard(resource.RLIMIT_AS, memory_mb << 20)),
            (resource.RLIMIT_CPU, (cpu_s, cpu_s + 1)),
            (resource.RLIMIT_NPROC, _within_hard(resource.RLIMIT_NPROC, max_processes)),
            (resource.RLIMIT_FSIZE, _within_hard(resource.RLIMIT_FSIZE, max_file_mb << 20)),
            (resource.RLIMIT_NOFILE, _within_hard(resource.RLIMIT_NOFILE, _MAX_OPEN_FILES)),
            (resource.RLIMIT_CORE, (0, 0)),
        ]
        tmpfs_opts = f"size={disk_mb}m,mode=0700,uid={uid or 0},gid={uid or 0}".encode()
        start = time.monotonic()
        proc = subprocess.Popen(
            [interpreter, "-I", script],
            cwd=work,
            env={"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,  # also closes status_w in the child, after preexec wrote to it
            preexec_fn=_child_setup(os.fsencode(work), tmpfs_opts, uid, limits, status_w),
        )
        # preexec ran before exec and Popen returned after exec, so the two status bytes are there.
        network, filesystem = os.read(status_r, 2)
        with proc:  # closes the pipes and reaps the child on the way out
            try:
                stdout, stderr, killed_reason = _supervise(proc, timeout_s, max_output_bytes, uid)
            finally:
                _kill_all(proc, uid)  # what is left, or everything if supervising was interrupted
        return SandboxResult(
            returncode=proc.returncode,
            stdout=stdout.decode("utf-8", "replace"),
            stderr=stderr.decode("utf-8", "replace"),
            timed_out=killed_reason == "timeout",
            killed_reason=killed_reason,
            duration_s=time.monotonic() - start,
            isolation={"user": uid is not None, "network": bool(network), "filesystem": bool(filesystem)},
            sandbox_uid=uid,
        )
    finally:
        os.close(status_r)
        os.close(status_w)
        shutil.rmtree(base, ignore_errors=True)


def _child_setup(
    work: bytes, tmpfs_opts: bytes, uid: int | None, limits: list[tuple[int, tuple[int, int]]], status_w: int
) -> Callable[[], None]:
    """The preexec_fn: runs in the forked child before exec. Everything it needs is prepared by the
    parent, so it does little more than syscalls (in the fork of a threaded parent, locks such as the
    import lock may be held forever)."""
    read_only = _MountAttr(attr_set=_MOUNT_ATTR_RDONLY)

    def setup() -> None:
        # Namespaces first: creating them needs root, which the child gives up below.
        network = _libc.unshare(_CLONE_NEWNET) == 0
        filesystem = _private_filesystem(work, tmpfs_opts, read_only)
        if uid is not None:  # raising here makes Popen fail: never run as root by accident
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        _libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)  # dies if the supervising thread dies
        status = bytes((network, filesystem))
        # Limits last: RLIMIT_AS may be below what the forked copy of the parent already maps.
        for which, value in limits:
            resource.setrlimit(which, value)
        os.write(status_w, status)

    return setup


def _private_filesystem(work: bytes, tmpfs_opts: bytes, read_only: _MountAttr) -> bool:
    """In a new mount namespace: make every mount read-only and put a size-capped tmpfs on ``work``."""
    if _libc.unshare(_CLONE_NEWNS) != 0:
        return False
    # Private first, so that none of the changes below propagate back to the host's mounts.
    if _libc.mount(None, b"/", None, ctypes.c_ulong(_MS_REC | _MS_PRIVATE), None) != 0:
        return False
    long = ctypes.c_long  # syscall(2) is variadic and reads every argument as a long
    if _libc.syscall(
        long(_SYS_MOUNT_SETATTR), long(_AT_FDCWD), b"/", long(_AT_RECURSIVE),
        ctypes.byref(read_only), long(ctypes.sizeof(read_only)),
    ):
        return False
    if _libc.mount(b"tmpfs", work, b"tmpfs", ctypes.c_ulong(_MS_NOSUID | _MS_NODEV), tmpfs_opts) != 0:
        return False
    os.chdir(work)  # the cwd Popen set is the directory underneath the new mount
    return True


def _supervise(
    proc: subprocess.Popen, timeout_s: float, cap: int, uid: int | None
) -> tuple[bytes, bytes, str | None]:
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
                # Leftover background processes may hold the pipes open: the run is over, end them.
                exited = True
                _kill_all(proc, uid)
    return bytes(out[proc.stdout.fileno()][:cap]), bytes(out[proc.stderr.fileno()][:cap]), killed_reason


def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if uid is None:
        return
    # Processes that called setsid() escaped the group. kill(-1) from a process running as the
    # sandbox uid reaches exactly the processes of that uid (never the caller itself), atomically.
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _within_hard(which: int, value: int) -> tuple[int, int]:
    """(value, value), lowered to the current hard limit: an unprivileged parent cannot raise it."""
    hard = resource.getrlimit(which)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    return value, value


def _interpreter(needs_other_access: bool) -> str:
    """The Python to run: ours, unless the sandbox uid could not execute it (e.g. under /root)."""
    if not needs_other_access:
        return sys.executable
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if _others_can_execute(candidate):
            return candidate
    raise RuntimeError("no Python interpreter that an unprivileged user may execute; pass python=...")


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
