"""Stage results mirrored to an object store (`results_store`), so stages can run on different
machines. The store is a real fsspec file system that other processes (and machines, on a
shared mount) see: a `file://` URL to a temporary folder acting as the bucket. Each "machine"
is a fresh, empty results_dir with the same results_store."""

import json
import shutil
from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem
from transformers import AutoModelForCausalLM

from flows.pipeline_flow import run_pipeline
from flows.wiring import pipeline_status
from pipeline.config.schema import ConfigError, parse_config
from pipeline.orchestration import runner
from pipeline.results.manifest import MANIFEST, Manifest
from pipeline.results.store import DOWNLOAD_PREFIX, ResultStore, StoreError
from tests.e2e.test_stages import TINY


def machine(root: Path, store: Path):
    """The tiny demo pipeline's config on one machine: its own results_dir, the shared store."""
    return parse_config({"name": "tiny", "results_dir": str(root / "results"), "results_store": store.as_uri(), **TINY})


def store_files(store: Path) -> set[str]:
    return {p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file()}


@pytest.fixture
def stage_processes(monkeypatch):
    """The stage modules whose process the pipeline starts, in order."""
    started = []
    real = runner.run_in_process

    def spy(stage, *args, **kwargs):
        started.append(stage.name)
        return real(stage, *args, **kwargs)

    monkeypatch.setattr(runner, "run_in_process", spy)
    return started


@pytest.fixture(scope="module")
def first_machine(tmp_path_factory):
    """demo_data and pretrain computed on a first machine, with the store set: (its root, the
    bucket, its results). The store already holds what an earlier upload of demo_data left when
    it was killed before its manifest: some files, one of them cut off."""
    root = tmp_path_factory.mktemp("first")
    bucket = root / "bucket"
    cfg = machine(root, bucket)
    killed = bucket / "demo_data" / pipeline_status(cfg)[0].key  # its key, computed without running anything
    (killed / "tokenizer").mkdir(parents=True)
    (killed / "tokenizer" / "left-over.bin").write_bytes(b"from the killed upload")
    (killed / "sft_train.jsonl").write_text("cut off mid-fi")
    return root, bucket, run_pipeline(cfg, stage="pretrain")


def copy_bucket(first_machine, tmp_path: Path) -> Path:
    """A copy of the first machine's bucket, for a test that damages it."""
    bucket = tmp_path / "bucket"
    shutil.copytree(first_machine[1], bucket)
    return bucket


def test_a_finished_stage_is_uploaded_with_what_its_manifest_lists(first_machine):
    root, bucket, results = first_machine
    assert [(r.name, r.cached) for r in results] == [("demo_data", False), ("pretrain", False)]
    uploaded = store_files(bucket)
    for r in results:
        folder = r.manifest.folder
        prefix = f"{folder.parent.name}/{folder.name}/"
        local = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        listed = {rel for rel in local if any(rel == o or rel.startswith(o + "/") for o in r.manifest.outputs.values())}
        assert {f[len(prefix):] for f in uploaded if f.startswith(prefix)} == listed | {MANIFEST}
        assert (bucket / prefix / MANIFEST).read_bytes() == (folder / MANIFEST).read_bytes()
    pretrain = results[1].manifest.folder
    assert (pretrain / "checkpoints").is_dir()  # kept on this machine to resume, not uploaded
    assert not any("checkpoints" in f or f.endswith("request.json") for f in uploaded)
    assert "model/model.safetensors" in {f.split("/", 2)[2] for f in uploaded if f.startswith("pretrain/")}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'results' / 'mlflow.db'}")
    for r in results:
        expected = f"{bucket.as_uri()}/{r.manifest.folder.parent.name}/{r.manifest.key}"
        assert client.get_run(r.run_id).data.tags["posttrain.store"] == expected


def test_another_machine_downloads_the_results_and_starts_no_stage(first_machine, tmp_path, stage_processes):
    _, bucket, first = first_machine
    results = run_pipeline(machine(tmp_path, bucket), stage="pretrain")
    assert [(r.name, r.cached) for r in results] == [("demo_data", True), ("pretrain", True)]
    assert stage_processes == []
    for mine, theirs in zip(results, first):
        assert mine.manifest.folder == tmp_path / "results" / mine.manifest.folder.parent.name / theirs.manifest.key
        assert mine.manifest.digests == theirs.manifest.digests and mine.manifest.run_id == theirs.manifest.run_id
    model = AutoModelForCausalLM.from_pretrained(results[1].manifest.path("model"))
    assert model.config.hidden_size == TINY["demo"]["hidden_size"]
    assert not list((tmp_path / "results").rglob(f"{DOWNLOAD_PREFIX}*"))
    # The next run on this machine finds them locally: nothing downloaded, nothing started.
    again = run_pipeline(machine(tmp_path, bucket), stage="pretrain")
    assert all(r.cached for r in again) and stage_processes == []


def test_a_store_folder_without_its_manifest_is_not_reused_and_is_uploaded_again(first_machine):
    _, bucket, results = first_machine
    demo_data = results[0].manifest
    assert not results[0].cached  # the killed upload's folder was not taken for a result: the stage ran
    folder = bucket / "demo_data" / demo_data.key
    assert Manifest.read(folder).digests == demo_data.digests  # uploaded again, whole...
    assert (folder / "sft_train.jsonl").read_bytes() == demo_data.path("sft_train").read_bytes()
    assert not (folder / "tokenizer" / "left-over.bin").exists()  # ...and nothing of the killed upload is left


def test_a_corrupted_file_in_the_store_is_refused_naming_it(first_machine, tmp_path, stage_processes):
    bucket = copy_bucket(first_machine, tmp_path)
    pretrain = first_machine[2][1].manifest
    folder = bucket / "pretrain" / pretrain.key
    with open(folder / "log_history.json", "a") as f:
        f.write(" ")
    cfg = machine(tmp_path, bucket)
    with pytest.raises(StoreError, match=r"does not match its manifest's digests: \S+/pretrain/\w+/log_history\.json"
                                         r"\. It was changed"):
        run_pipeline(cfg, stage="pretrain")
    assert stage_processes == []
    assert (tmp_path / "results" / "demo_data" / first_machine[2][0].manifest.key / MANIFEST).is_file()
    assert not (tmp_path / "results" / "pretrain" / pretrain.key).exists()
    assert not list((tmp_path / "results").rglob(f"{DOWNLOAD_PREFIX}*"))
    # A file inside the model folder: the error names the folder, the one output whose digest it breaks.
    shutil.copy(first_machine[1] / "pretrain" / pretrain.key / "log_history.json", folder / "log_history.json")
    (folder / "model" / "config.json").write_text("{}")
    with pytest.raises(StoreError, match=r"\S+/pretrain/\w+/model/ \(one of its files\)\. It was"):
        run_pipeline(cfg, stage="pretrain")
    (folder / "model" / "config.json").unlink()
    with pytest.raises(StoreError, match=r"\S+/pretrain/\w+/model/ \(one of its files\)\. It was"):
        run_pipeline(cfg, stage="pretrain")
    assert stage_processes == []


@pytest.fixture
def result(tmp_path) -> Path:
    """A finished stage folder: two outputs (a file, a folder of files), and the rest of a
    training stage's folder (a checkpoint, the request) that is not part of the result."""
    folder = tmp_path / "results" / "train" / "0123456789abcdef"
    for name, data in {"log.json": b"[1]", "model/weights.bin": b"w" * 1000, "model/sub/config.json": b"{}",
                       "model/tokenizer.json": b"t", "checkpoints/checkpoint-3/optimizer.pt": b"o",
                       "request.json": b"{}"}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    Manifest("train", folder.name, {"log": "log.json", "model": "model"}).write(folder)
    return folder


def test_an_upload_cut_off_part_way_leaves_no_manifest_and_the_next_one_completes(result, tmp_path, monkeypatch):
    store = ResultStore((tmp_path / "bucket").as_uri())
    real, calls, dying = LocalFileSystem.put_file, [], [True]

    def dies_at_the_third_file(self, lpath, rpath, **kwargs):
        calls.append(rpath)
        if len(calls) == 3 and dying:
            raise ConnectionError("connection reset")
        return real(self, lpath, rpath, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "put_file", dies_at_the_third_file)
    with pytest.raises(StoreError, match=r"complete and kept, but uploading it to file://\S+/train/0123456789abcdef "
                                         r"failed \(ConnectionError: connection reset\): run again"):
        store.upload(result)
    assert len(store_files(tmp_path / "bucket")) == 2 and not store.has("train", result.name)
    assert store.download("train", result.name, tmp_path / "elsewhere" / "train" / result.name) is None
    calls.clear(), dying.clear()
    assert store.upload(result) and store.has("train", result.name)  # the third put succeeds this time
    assert store_files(tmp_path / "bucket") == {f"train/{result.name}/{f}" for f in (
        "log.json", "model/weights.bin", "model/sub/config.json", "model/tokenizer.json", MANIFEST)}
    assert len(calls) == 5 and calls[-1].endswith(f"/{MANIFEST}")  # the manifest is the last object put
    assert not store.upload(result)  # the store has it: kept


def test_a_download_cut_off_part_way_never_looks_done(result, tmp_path, monkeypatch):
    store = ResultStore((tmp_path / "bucket").as_uri())
    store.upload(result)
    dest = tmp_path / "elsewhere" / "train" / result.name
    real, calls = LocalFileSystem.get_file, []

    def dies_at_the_second_file(self, rpath, lpath, **kwargs):
        calls.append(rpath)
        if len(calls) == 2:
            raise ConnectionError("connection reset")
        return real(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "get_file", dies_at_the_second_file)
    with pytest.raises(StoreError, match=r"downloading file://\S+ failed \(ConnectionError: connection reset\)"):
        store.download("train", result.name, dest)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    monkeypatch.setattr(LocalFileSystem, "get_file", real)
    # A download killed outright (SIGKILL) leaves its temporary folder: never taken for the result, and cleared.
    killed = dest.parent / f"{DOWNLOAD_PREFIX}{result.name}-{__import__('socket').gethostname()}-x1"
    (killed / "model").mkdir(parents=True)
    (dest / "checkpoints").mkdir(parents=True)  # a local attempt that did not finish: replaced
    assert Manifest.find(dest) is None
    manifest = store.download("train", result.name, dest)
    assert manifest.folder == dest and manifest.digests == Manifest.read(result).digests
    assert sorted(p.name for p in dest.parent.iterdir()) == [result.name]
    assert {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} == {
        "log.json", "model/weights.bin", "model/sub/config.json", "model/tokenizer.json", MANIFEST}
    assert json.loads((dest / MANIFEST).read_text()) == json.loads((result / MANIFEST).read_text())


def test_a_forced_rerun_replaces_the_stores_result(result, tmp_path):
    store = ResultStore((tmp_path / "bucket").as_uri())
    store.upload(result)
    (result / "model" / "weights.bin").write_bytes(b"retrained")
    (result / "model" / "sub" / "config.json").unlink()
    Manifest("train", result.name, {"log": "log.json", "model": "model"}).write(result)
    assert not store.upload(result)  # another machine's result under the same key is kept...
    assert store.upload(result, replace=True)  # ...unless the stage was forced
    remote = tmp_path / "bucket" / "train" / result.name
    assert (remote / "model" / "weights.bin").read_bytes() == b"retrained"
    assert not (remote / "model" / "sub").exists()  # nothing of the replaced result lingers
    assert (remote / MANIFEST).read_bytes() == (result / MANIFEST).read_bytes()


@pytest.mark.parametrize("url, package", [("s3://bucket/prefix", "s3fs"), ("gs://bucket", "gcsfs"),
                                          ("az://container/x", "adlfs")])
def test_a_store_whose_backend_is_not_installed_is_a_config_error(url, package):
    pytest.importorskip("fsspec")
    try:
        __import__(package)
        pytest.skip(f"{package} is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=rf"results_store: '{url}' needs fsspec's \w+:// backend, which is not "
                                          rf"installed \(.*\): pip install {package}"):
        parse_config({"name": "x", "results_store": url})


def test_the_store_url_is_checked_and_normalised(tmp_path):
    with pytest.raises(ConfigError, match=r"results_store: 'nosuch://b': fsspec knows no protocol 'nosuch'"):
        parse_config({"name": "x", "results_store": "nosuch://b"})
    assert parse_config({"name": "x", "results_store": f"{tmp_path.as_uri()}/"}).results_store == tmp_path.as_uri()
    assert parse_config({"name": "x"}).results_store is None
