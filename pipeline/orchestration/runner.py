"""The runtime a flow calls for each stage: its key, whether its result can be reused (here,
or from the results store), its MLflow run, and its own process.

A stage's key digests its declared settings (pipeline.runtime.contract.Stage), the content digests of
the inputs it is handed and of the data sets it reads: so a key follows what an upstream stage
produced. A forced stage that makes the same bytes again leaves its downstream results valid;
one that makes new ones (a GPU's training is not bit-reproducible) makes them stale.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config.schema import DataSource, PipelineConfig, dotted
from pipeline.data.sources import source_digest
from pipeline.results.manifest import MANIFEST, DamagedResult, Manifest, atomic_write_text, stage_key
from pipeline.runtime.contract import Input, Stage
from pipeline.runtime.process import StageError, raise_if_stopped, run_in_process
from pipeline.runtime.progress import STAGE_ENV
from pipeline.sampling.sampler import SAMPLER_ENV
from pipeline.sampling.warm import sampler_env, stop_sampler


@dataclass
class Planned:
    """A stage of this pipeline with its inputs, settings and key: what runs, or is reused."""

    name: str  # the pipeline's name for it: evaluate_sft runs stage `evaluate`
    stage: Stage
    cfg: PipelineConfig  # the effective config (the demo's data filled in)
    inputs: dict[str, Input]
    data: dict[str, DataSource]  # the data sets it reads, by context
    settings: dict[str, Any]
    digests: dict[str, str]  # what the key digests besides settings: input name or data.<context> -> digest
    key: str
    samples_key: str | None  # the key of its samples alone (Stage.samples_settings), if it samples
    out: Path

    @property
    def upstream(self) -> dict[str, Manifest]:
        return {name: i.made_by for name, i in self.inputs.items() if i.made_by is not None}


@dataclass
class StageResult:
    name: str
    manifest: Manifest
    cached: bool
    run_id: str  # the stage's MLflow run in this pipeline (a cached result's producer is manifest.run_id)
    seconds: float  # wall time in this pipeline, MLflow logging and the stage's process included
    link: str  # the stage's run in the MLflow UI
    began: float  # when this pipeline took the stage up (epoch seconds)

    def phases(self) -> tuple[float, float, float] | None:
        """A stage run here, in seconds: its start-up (until the stage function starts: the process,
        imports, MLflow run), its work (the function) and its bookkeeping (the manifest's digests,
        MLflow's logging, the process's end). None for a reused result."""
        if self.cached or self.manifest.started_at is None:
            return None
        startup = self.manifest.started_at - self.began
        return startup, self.manifest.seconds, self.seconds - startup - self.manifest.seconds


@dataclass
class StageStatus:
    name: str
    # done: a result under the current key; changed: its files are not what its manifest recorded;
    # damaged: its manifest cannot be read; stale: a result only under an older key; missing;
    # waiting: an upstream stage is not built, so its key cannot be known yet
    status: str
    key: str
    manifest: Manifest | None  # the result under the current key, if done
    reason: str = ""  # for stale: what changed since its latest result; for waiting: on which stage


class NotBuilt(Exception):
    """Raised in a dry run (`posttrain status`) by a stage that has no result under its key."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def what_changed(old: Manifest, planned: Planned) -> str:
    """Why the latest result of a stage is not the one its key asks for now: the settings and inputs that differ."""
    if not old.settings:
        return "its latest result was made before stages recorded their settings (an older posttrain): it runs again"
    before, now = dotted(old.settings), dotted(planned.settings)
    changes = [f"{k}: {before.get(k, '(unset)')} -> {now.get(k, '(unset)')}"
               for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)]
    changes += [f"{k} changed" for k in sorted(old.inputs.keys() | planned.digests.keys())
                if old.inputs.get(k) != planned.digests.get(k)]
    return "; ".join(changes) or "its key recipe changed"


@dataclass
class KeyTurn:
    """Whose turn it is at one stage key's result folder, among the pipelines of this process, and
    how the last turn ended: an error, for those that waited on it."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    failed: str | None = None


_KEY_TURNS: dict[Path, KeyTurn] = {}
_KEY_TURNS_LOCK = threading.Lock()


@contextmanager
def key_turn(name: str, out: Path) -> Iterator[KeyTurn]:
    """Hold the stage key's folder. Pipelines side by side (a `compare`) share stages: the first
    to take one runs it, the others wait and then reuse its result, or, if it failed for good,
    fail with its error rather than run it again (after a transient failure they run it, as the
    retry would); a stopped run starts nothing more."""
    with _KEY_TURNS_LOCK:
        turn = _KEY_TURNS.setdefault(out.resolve(), KeyTurn())
    waited = not turn.lock.acquire(blocking=False)
    if waited:
        turn.lock.acquire()
    try:
        raise_if_stopped()
        if waited and turn.failed is not None:
            raise StageError(f"stage '{name}' failed in another pipeline that shares it: {turn.failed}")
        try:
            yield turn
        except Exception as error:
            turn.failed = None if getattr(error, "transient", False) else str(error)
            raise
        turn.failed = None
    finally:
        turn.lock.release()


@dataclass
class StageRunner:
    cfg: PipelineConfig
    tracker: Any | None  # pipeline.tracking.tracker.Tracker; None: a dry run, which computes keys and runs nothing
    force: set[str] = field(default_factory=set)
    results: list[StageResult] = field(default_factory=list)
    cleared: set[str] = field(default_factory=set)  # forced stages whose old result this run removed
    statuses: dict[str, StageStatus] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    log_line: Callable[[str], None] | None = None  # where each line a stage's process writes goes too (the flow's log)
    devices: dict[str, str] = field(default_factory=dict)  # this pipeline's GPUs beside others (orchestration.devices)

    def digest_of(self, source: DataSource) -> str:
        """A data source's digest, computed once per run (a user's data set can be large)."""
        name = source.model_dump_json()
        if name not in self.digests:
            self.digests[name] = source_digest(source)
        return self.digests[name]

    def plan(self, name: str, stage: Stage, cfg: PipelineConfig, inputs: dict[str, Input]) -> Planned:
        stage.check_inputs(inputs)
        settings = stage.settings(cfg)
        if stage.trains and cfg.launch.num_processes > 1:  # the number of processes multiplies the global batch
            settings["processes"] = cfg.launch.num_processes
        data = {context: source for context, source in stage.data(cfg).items() if source is not None}
        digests = {n: i.digest for n, i in inputs.items()} | {f"data.{c}": self.digest_of(s) for c, s in data.items()}
        samples_key = None
        if stage.samples_settings is not None:
            sampled = {k: v for k, v in digests.items() if k not in stage.scoring_inputs}
            samples_key = stage_key(f"{stage.name}/v{stage.version}/samples", stage.samples_settings(cfg), sampled)
        key = stage_key(f"{stage.name}/v{stage.version}", settings, digests)
        return Planned(name, stage, cfg, inputs, data, settings, digests, key, samples_key,
                       self.cfg.results_dir / stage.name / key)

    def latest(self, name: str) -> Path:
        """Where the key of the stage's latest result is kept, to tell stale from missing."""
        return self.cfg.results_dir / "latest" / name

    def latest_manifest(self, planned: Planned) -> Manifest | None:
        pointer = self.latest(planned.name)
        if not pointer.is_file() or pointer.read_text() == planned.key:
            return None
        try:
            return Manifest.find(self.cfg.results_dir / planned.stage.name / pointer.read_text())
        except DamagedResult:
            return None

    def check(self, planned: Planned) -> Manifest:
        """A dry run's step: the stage's status; raises NotBuilt where it has no result to build on."""
        reason = ""
        try:
            manifest = Manifest.find(planned.out)
        except DamagedResult:
            manifest, status = None, "damaged"
        else:
            if manifest is not None:
                status = "changed" if manifest.changed() else "done"
            elif (old := self.latest_manifest(planned)) is not None:
                status, reason = "stale", what_changed(old, planned)
            else:
                status = "missing"
        self.statuses[planned.name] = StageStatus(planned.name, status, planned.key,
                                                  manifest if status == "done" else None, reason)
        if status != "done":
            raise NotBuilt(planned.name)
        return manifest

    def reusable(self, planned: Planned) -> Manifest | None:
        """The result under the stage's key, if it may be reused: not forced, and its files still
        what its manifest recorded (else it runs again, saying what changed)."""
        name = planned.name
        if name in self.force:
            return None
        try:
            manifest = Manifest.find(planned.out)
        except DamagedResult as error:
            raise DamagedResult(f"[{name}] {error}: run again with --force {name} to make it anew") from None
        if manifest is not None and (changed := manifest.changed(full=self.cfg.verify_reuse == "full")):
            print(f"[{name}] {', '.join(str(manifest.path(c)) for c in changed)} changed since the stage made it "
                  "(not the digest its manifest recorded): running the stage again", flush=True)
            return None
        return manifest

    def saved_samples(self, planned: Planned) -> Path | None:
        """An earlier result of the stage with the same samples (other scoring settings): its folder."""
        if planned.samples_key is None or planned.name in self.force:
            return None
        for manifest_file in sorted((self.cfg.results_dir / planned.stage.name).glob(f"*/{MANIFEST}")):
            try:
                manifest = Manifest.read(manifest_file.parent)
            except DamagedResult:
                continue
            if manifest.samples_key == planned.samples_key and not manifest.changed():
                return manifest.folder
        return None

    def run(self, planned: Planned) -> StageResult:
        """Run one stage in its own process, in a child run in MLflow, or reuse its result if its
        key matches: the pipeline's run then links the run that made it."""
        began, start = time.time(), time.perf_counter()
        with key_turn(planned.name, planned.out):
            return self._run(planned, began, start)

    def _run(self, planned: Planned, began: float, start: float) -> StageResult:
        from mlflow.exceptions import MlflowException

        from pipeline.results.store import open_store
        from pipeline.tracking.tracker import TrackingUnavailable, dataset_input

        name, key, out, tracker = planned.name, planned.key, planned.out, self.tracker
        manifest = self.reusable(planned)
        store = open_store(self.cfg.results_store)  # results shared with other machines (docs/storage.md)
        if manifest is None and store is not None and name not in self.force:
            manifest = store.download(planned.stage.name, key, out)  # None: not in the store either
            if manifest is not None:
                print(f"[{name}] downloaded: {store.uri(planned.stage.name, key)}", flush=True)
        cached = manifest is not None
        producer = tracker.reuse(name, manifest, planned.settings) if cached else None  # None: not in this store
        run_id = producer or tracker.start_stage(name, key, planned.digests, planned.upstream, planned.settings)
        try:
            if cached:
                print(f"[{name}] cached: {out} (made by MLflow run {manifest.run_id or 'unknown'})", flush=True)
            else:
                manifest = self.execute(planned, run_id)
            if store is not None:  # a cached result too, if an earlier upload of it was cut off
                if store.upload(out, replace=name in self.force):
                    print(f"[{name}] uploaded: {store.uri(planned.stage.name, key)}", flush=True)
                if producer is None:
                    tracker.client.set_tag(run_id, "posttrain.store", store.uri(planned.stage.name, key))
        except BaseException as error:
            if producer is None:
                tracker.fail_stage(run_id, error)
            raise
        used = [dataset_input(source, planned.digests[f"data.{c}"], c) for c, source in planned.data.items()]
        used += [dataset_input(DataSource(path=str(planned.inputs[name].path)), planned.inputs[name].digest, context)
                 for name, context in planned.stage.input_data.items() if name in planned.inputs]
        model = planned.inputs.get("model")
        try:
            if producer is None:
                tracker.finish_stage(run_id, manifest, used, cached, model.path if model else None)
        except MlflowException as error:
            raise TrackingUnavailable(
                f"stage '{name}' is done and its result kept in {out}, but the MLflow store {tracker.uri} "
                f"stopped answering ({error.message[:200]}): run again once it answers; the result is reused and "
                "logged then"
            ) from error
        atomic_write_text(self.latest(name), key)
        result = StageResult(name, manifest, cached, run_id, time.perf_counter() - start, tracker.link(run_id), began)
        self.results.append(result)
        return result

    def execute(self, planned: Planned, run_id: str) -> Manifest:
        """Run the stage's process: forced, changed or damaged results go first (a fresh start,
        not from their checkpoints); a stale one's reason is said."""
        name, out = planned.name, planned.out
        # Once per run: a retried (transient) failure resumes from the checkpoints the first try saved.
        if out.exists() and ((name in self.force and name not in self.cleared) or (out / MANIFEST).exists()):
            shutil.rmtree(out)
        self.cleared |= {name} & self.force
        old = self.latest_manifest(planned)
        print(f"[{name}] running: {out}" + (f" ({what_changed(old, planned)})" if old else ""), flush=True)
        paths = {n: i.path for n, i in planned.inputs.items()}
        if (samples := self.saved_samples(planned)) is not None:
            print(f"[{name}] re-scoring the samples of {samples} (only its scoring settings changed)", flush=True)
            paths["samples"] = samples
        record = {"inputs": planned.digests, "settings": planned.settings, "samples_key": planned.samples_key}
        env = self.tracker.stage_env(run_id) | {STAGE_ENV: name} | self.devices
        if planned.cfg.launch.cpu_threads:
            env["OMP_NUM_THREADS"] = str(planned.cfg.launch.cpu_threads)
        if planned.stage.samples and "samples" not in paths:  # not to re-score saved samples
            env |= sampler_env(planned.cfg.sampling, self.devices, client=str(out))
        try:
            return run_in_process(planned.stage, planned.cfg, out, record, env, self.log_line, **paths)
        except StageError as error:
            if error.timed_out and SAMPLER_ENV in env:
                stop_sampler(self.devices, client=str(out))
            raise
