"""Stage manifests, content digests and stage keys.

A stage's result lives in `results_dir/<stage>/<key>/`; its `manifest.json` is written
last and atomically, so a folder without one is never mistaken for a finished stage.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class DamagedResult(ValueError):
    """A stage result on disk that cannot be read; the message names the file."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); results are shared like any file the user writes.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResultsBusy(RuntimeError):
    """Another `posttrain run` is using the results folder."""


_HELD: set[Path] = set()  # results folders this process holds


@contextmanager
def results_lock(results_dir: Path) -> Iterator[None]:
    """Hold the results folder for one `posttrain run` at a time; a second one is refused with
    the holder's pid and host. The kernel drops the lock when its process dies, even by
    SIGKILL, so a lost run never leaves it behind. (`flock` is per machine: on shared storage
    across machines it depends on the file system.) Re-entrant within a process: `posttrain
    compare` holds it while each of its pipelines takes it again."""
    results_dir = results_dir.resolve()
    if results_dir in _HELD:  # the outer holder releases it
        yield
        return
    results_dir.mkdir(parents=True, exist_ok=True)
    with open(results_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise ResultsBusy(
                f"{results_dir} is in use by another `posttrain run` ({f.read().strip() or 'unknown'}): "
                "wait for it to finish, or give this config another results_dir"
            ) from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        _HELD.add(results_dir)
        try:
            yield
        finally:
            _HELD.discard(results_dir)


def digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, sorted)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        h.update(str(file.relative_to(path)).encode() if file != path else b"")
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def file_stats(path: Path) -> str:
    """A digest of the relative names, sizes and modification times of a file or a folder's files:
    it changes when a file is rewritten, truncated or added, at the cost of one stat per file."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stats = [(str(f.relative_to(path)), (st := f.stat()).st_size, st.st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def stage_key(stage: str, settings: Any, inputs: dict[str, str]) -> str:
    """Key of a stage's result: a digest of its effective settings and of its inputs' content digests."""
    payload = json.dumps({"stage": stage, "settings": settings, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class Manifest:
    stage: str
    key: str
    outputs: dict[str, str]  # name -> path relative to the stage folder
    digests: dict[str, str] = field(default_factory=dict)  # name -> content digest
    stats: dict[str, str] = field(default_factory=dict)  # name -> file_stats: what reuse checks first
    inputs: dict[str, str] = field(default_factory=dict)  # what its key digests: input or data.<context> -> digest
    settings: dict[str, Any] = field(default_factory=dict)  # the settings its key digests (to say what changed)
    samples_key: str | None = None  # the key of its samples alone, for a stage that samples and scores
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None  # the MLflow run that produced it
    seconds: float | None = None  # the stage function's own time, without its process's start and imports
    started_at: float | None = None  # when the stage function started (epoch seconds): the end of its start-up
    folder: Path | None = field(default=None, compare=False)

    def path(self, name: str) -> Path:
        assert self.folder is not None, "manifest not yet written or read"
        return self.folder / self.outputs[name]

    def write(self, folder: Path, started: tuple[float, float] | None = None) -> Manifest:
        """Digest the outputs, then write the manifest atomically: the stage is done after this.
        `started`: when the stage function started, as (time.time(), time.perf_counter()), to
        record it and the function's `seconds` (by the monotonic clock)."""
        self.folder = folder
        self.digests = {name: digest(self.path(name)) for name in self.outputs}
        self.stats = {name: file_stats(self.path(name)) for name in self.outputs}
        if started is not None:
            self.started_at, self.seconds = started[0], time.perf_counter() - started[1]
        self._write_body()
        return self

    def _write_body(self) -> None:
        body = {k: v for k, v in asdict(self).items() if k != "folder"}
        atomic_write_text(self.folder / MANIFEST, json.dumps(body, indent=2, sort_keys=True))

    def changed(self, full: bool = False) -> list[str]:
        """The outputs whose files are not what the manifest recorded: missing, or of another
        content digest. Only an output whose names, sizes or mtimes changed is digested again,
        unless `full` (which also catches a rewrite that kept them). Outputs whose stats changed
        but not their content (copied, downloaded, made before stats were kept) get their new
        stats recorded, so the next check is cheap again."""
        changed, restat = [], {}
        for name in self.outputs:
            path = self.path(name)
            if not path.exists():
                changed.append(name)
                continue
            stats = file_stats(path)
            if full or self.stats.get(name) != stats:
                if digest(path) != self.digests.get(name):
                    changed.append(name)
                elif self.stats.get(name) != stats:
                    restat[name] = stats
        if restat and not changed:
            self.stats |= restat
            self._write_body()
        return changed

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        try:
            manifest = cls(**json.loads(path.read_bytes()), folder=folder)
        except (ValueError, TypeError) as error:  # cut off, not JSON, not UTF-8, `{}`, unknown fields
            raise DamagedResult(f"{path} is damaged ({str(error).splitlines()[0][:120]})") from None
        if not all(isinstance(m, dict) for m in (manifest.outputs, manifest.digests, manifest.stats, manifest.inputs,
                                                 manifest.settings)):
            raise DamagedResult(f"{path} is damaged (its outputs, digests, stats, inputs or settings are not a mapping)")
        return manifest

    @classmethod
    def find(cls, folder: Path) -> Manifest | None:
        return cls.read(folder) if (folder / MANIFEST).is_file() else None
