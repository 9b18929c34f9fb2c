"""Stage results mirrored to an object store (S3, GCS, Azure Blob, any fsspec URL), so that the
stages of one pipeline can run on different machines.

The store holds the same layout as a results folder: `<results_store>/<stage>/<key>/`, with
the outputs the stage's manifest lists and `manifest.json`. Every object PUT is atomic, and
the manifest is uploaded last, so a store folder counts as done only once its manifest is
there: an upload cut off part-way leaves no manifest, and the next run uploads again. A
download goes to a temporary folder next to the result's own, has its digests checked
against the manifest, gets its manifest last and is then renamed into place, so a download
cut off part-way never looks done either. See docs/storage.md.

Every file system operation is fsspec's (`url_to_fs`, `put`, `get`, `find`, `exists`, `rm`);
the backends (s3fs, gcsfs, adlfs) are installed by whoever uses them, not by this package.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import socket
import tempfile
from pathlib import Path

import fsspec
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import known_implementations

from pipeline.results.manifest import MANIFEST, Manifest, atomic_write_text, digest

DOWNLOAD_PREFIX = ".download-"  # a download in progress, or cut off: never a result


class StoreError(RuntimeError):
    """The results store refused a result (digests that do not match) or failed to take one."""


def check_store_url(url: str) -> str:
    """The config's check of `results_store`, without any I/O: fsspec knows each protocol of
    the URL (chained ones too, `simplecache::s3://...`) and its backend package is installed.
    Returns the URL without a trailing slash."""
    url = url.strip()
    if not url:
        raise ValueError("empty: give an fsspec URL such as s3://bucket/prefix, or null for no store")
    for part in url.split("::"):
        protocol = split_protocol(part)[0] or "file"
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as error:
            module = known_implementations.get(protocol, {}).get("class", "").split(".")[0]
            install = f": pip install {module}" if module and module != "fsspec" else ""
            raise ValueError(
                f"{url!r} needs fsspec's {protocol}:// backend, which is not installed ({error}){install}"
            ) from None
        except ValueError:
            raise ValueError(
                f"{url!r}: fsspec knows no protocol {protocol!r} (s3://, gs://, az://, file://, ... are known)"
            ) from None
    return url.rstrip("/")


def open_store(url: str | None) -> ResultStore | None:
    """The config's `results_store`, or None when there is none."""
    return ResultStore(url) if url else None


def _output_files(manifest: Manifest) -> list[Path]:
    """The files of the outputs the manifest lists, as `digest` reads them (a folder's files,
    recursively). The rest of a stage folder (a training stage's checkpoints, request.json,
    logs of a failed attempt) is what resuming on this machine needs, not a result."""
    files: dict[Path, None] = {}
    for name in manifest.outputs:
        path = manifest.path(name)
        found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        files.update(dict.fromkeys(found))
    return list(files)


def _inside(root: Path, relative: str) -> Path:
    """`root / relative`, refusing a name from the store that would land outside `root`."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()) or path == root.resolve():
        raise StoreError(f"refusing the store's file name {relative!r}: it points outside the result's folder")
    return path


class ResultStore:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, root = url_to_fs(self.url)
        self.root = root.rstrip("/")

    def uri(self, stage: str, key: str) -> str:
        """Where a stage's result is (or goes) in the store, as a URL."""
        return f"{self.url}/{stage}/{key}"

    def _folder(self, stage: str, key: str) -> str:
        return f"{self.root}/{stage}/{key}"

    def has(self, stage: str, key: str) -> bool:
        """Whether the store holds a finished result: its manifest is there."""
        return self.fs.exists(f"{self._folder(stage, key)}/{MANIFEST}")

    def upload(self, folder: Path, replace: bool = False) -> bool:
        """Upload the finished result in `folder` (results_dir/<stage>/<key>): the outputs its
        manifest lists, then the manifest. A result the store already holds is kept (another
        machine made it under the same key), unless `replace` (a forced re-run). Returns
        whether it uploaded."""
        stage, key = folder.parent.name, folder.name
        uri = self.uri(stage, key)
        try:
            manifest = Manifest.read(folder)
            remote = self._folder(stage, key)
            remote_manifest = f"{remote}/{MANIFEST}"
            if self.fs.exists(remote_manifest):
                if not replace:
                    return False
                self.fs.rm_file(remote_manifest)  # first: the folder stops counting as done before a file changes
            if self.fs.exists(remote):  # a cut-off upload's files, or the replaced result's: none may linger
                self.fs.rm(remote, recursive=True)
            files = _output_files(manifest)
            remote_files = [f"{remote}/{f.relative_to(folder).as_posix()}" for f in files]
            if isinstance(self.fs, LocalFileSystem):  # object stores have no folders to make
                for parent in sorted({posixpath.dirname(r) for r in remote_files} | {remote}):
                    self.fs.makedirs(parent, exist_ok=True)
            if files:
                self.fs.put([str(f) for f in files], remote_files)
            self.fs.put_file(str(folder / MANIFEST), remote_manifest)  # last: the result is done
        except Exception as error:
            raise StoreError(
                f"the result in {folder} is complete and kept, but uploading it to {uri} failed "
                f"({type(error).__name__}: {error}): run again to upload it (the local result is reused)"
            ) from error
        return True

    def download(self, stage: str, key: str, dest: Path) -> Manifest | None:
        """Fetch the store's result of `stage` under `key` into `dest` (results_dir/<stage>/<key>)
        and return its manifest; None if the store holds no finished result. The outputs go to
        a temporary folder beside `dest`, their digests are checked against the manifest, the
        manifest is written last, and the folder is renamed to `dest` (replacing a local attempt
        that did not finish). Call it holding the results folder's lock."""
        try:
            return self._download(stage, key, dest)
        except StoreError:
            raise
        except Exception as error:
            raise StoreError(f"downloading {self.uri(stage, key)} failed ({type(error).__name__}: {error}); nothing "
                             "of it is kept: run again once the store answers") from error

    def _download(self, stage: str, key: str, dest: Path) -> Manifest | None:
        remote = self._folder(stage, key)
        uri = self.uri(stage, key)
        try:
            text = self.fs.cat_file(f"{remote}/{MANIFEST}")
        except FileNotFoundError:
            return None
        manifest = Manifest(**json.loads(text))
        if manifest.key != key:
            raise StoreError(f"{uri}/{MANIFEST} is the manifest of key {manifest.key}, not {key}: it is not used")
        dest.parent.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        for stale in dest.parent.glob(f"{DOWNLOAD_PREFIX}{key}-{host}-*"):  # a download of this machine's, killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f"{DOWNLOAD_PREFIX}{key}-{host}-"))
        try:
            prefix = self.fs._strip_protocol(remote).rstrip("/") + "/"
            names = [p[len(prefix):] for p in self.fs.find(remote) if p.startswith(prefix)]
            outputs = [rel.strip("/") for rel in manifest.outputs.values()]
            wanted = [n for n in names if any(n == o or n.startswith(o + "/") for o in outputs)]
            local = [_inside(tmp, n) for n in wanted]
            for path in local:
                path.parent.mkdir(parents=True, exist_ok=True)
            if wanted:
                self.fs.get([prefix + n for n in wanted], [str(p) for p in local])
            manifest.folder = tmp
            bad = []
            for name, rel in manifest.outputs.items():
                path = manifest.path(name)
                if not path.exists():
                    bad.append(f"{uri}/{rel} (missing)")
                elif digest(path) != manifest.digests.get(name):
                    bad.append(f"{uri}/{rel}" + ("/ (one of its files)" if path.is_dir() else ""))
            if bad:
                raise StoreError(
                    f"the store's result {uri} does not match its manifest's digests: {', '.join(bad)}. It was "
                    "changed or cut off after its upload, and is not used: delete that folder from the store to "
                    "have the stage computed again, or run the stage with --force to compute it and replace it"
                )
            atomic_write_text(tmp / MANIFEST, text.decode())  # last: the folder is a finished result
            if dest.exists():  # a local attempt without a manifest (a killed run): the store's result replaces it
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Manifest.read(dest)
