"""Prefect flows: the whole pipeline, and one flow per stage.

Only wiring. Each stage is a method that first asks for its upstream stages, so asking for
one stage builds just what it needs. A stage's key is a digest of its effective settings
and of its inputs' keys or digests; a stage whose folder holds a manifest under that key
is reused, not run again (Prefect's own cache keys include the flow run, so the pipeline
keeps its own). Every stage runs as a Prefect task that starts the stage's own process.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipeline.config import EVAL_SUITES, ConfigError, DataConfig, DataSource, PipelineConfig, load_config
from pipeline.data import check_data, source_digest
from pipeline.manifest import MANIFEST, DamagedResult, Manifest, atomic_write_text, digest, results_lock, stage_key
from pipeline.progress import STAGE_ENV
from pipeline.stage import StageError, run_in_process, start_fork_server, stop_on_signals
from pipeline.storage import open_store
from pipeline.tracking import Tracker, TrackingUnavailable, dataset_input

STAGES = ("demo_data", "pretrain", "evaluate_base", "reference", "sft", "evaluate_sft", "sample", "pairs", "dpo", "evaluate_dpo")
DEMO_STAGES = ("demo_data", "pretrain")
ON_POLICY_STAGES = ("sample", "pairs")  # not run when the config gives data.preference
# SFTConfig keys that change the tokens or the loss mask of an SFT row
TOKENIZATION_KEYS = {"max_length", "truncation_mode", "packing", "packing_strategy", "padding_free",
                     "completion_only_loss", "assistant_only_loss", "chat_template_path", "dataset_text_field",
                     "eos_token", "pad_token", "dataset_kwargs"}


def _transient(task, task_run, state) -> bool:
    """Retry only failures marked transient (an engine that failed to start), never bad input."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, StageError) and error.transient


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=_transient, cache_policy=NO_CACHE)
def execute_stage(module: str, cfg: PipelineConfig, out: Path, inputs: dict[str, str], env: dict[str, str],
                  paths: dict[str, Path]) -> Manifest:
    return run_in_process(module, cfg, out, inputs, env, **paths)


@dataclass
class StageResult:
    name: str
    manifest: Manifest
    cached: bool
    run_id: str  # the stage's MLflow run in this pipeline (a cached result's producer is manifest.run_id)
    seconds: float  # wall time in this pipeline, MLflow logging and the stage's process included
    link: str  # the stage's run in the MLflow UI


@dataclass
class StageStatus:
    name: str
    # done: a result under the current key; changed: its files are not what its manifest recorded;
    # damaged: its manifest cannot be read; stale: a result only under an older key; missing
    status: str
    key: str
    manifest: Manifest | None  # the result under the current key, if done


class NotBuilt(Exception):
    """Raised in a dry run (`posttrain status`) by a stage that has no result under its key."""


@dataclass
class PipelineRun:
    cfg: PipelineConfig
    tracker: Tracker | None  # None: a dry run, which computes keys and runs nothing
    force: set[str] = field(default_factory=set)
    results: list[StageResult] = field(default_factory=list)
    statuses: dict[str, StageStatus] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)

    def digest_of(self, source: DataSource) -> str:
        """A data source's digest, computed once per run (a user's data set can be large)."""
        name = source.name if source.file else f"{source.hub}:{source.split}"
        if name not in self.digests:
            self.digests[name] = source_digest(source)
        return self.digests[name]

    def latest(self, name: str) -> Path:
        """Where the key of the stage's latest result is kept, to tell stale from missing."""
        return self.cfg.results_dir / "latest" / name

    def check_stage(self, name: str, key: str, out: Path) -> Manifest:
        latest = self.latest(name).read_text() if self.latest(name).is_file() else None
        try:
            manifest = Manifest.find(out)
        except DamagedResult:
            manifest, status = None, "damaged"
        else:
            if manifest is not None:
                status = "changed" if manifest.changed() else "done"
            else:
                status = "stale" if latest and latest != key else "missing"
        self.statuses[name] = StageStatus(name, status, key, manifest if status == "done" else None)
        if status != "done":
            raise NotBuilt(name)
        return manifest

    def reusable(self, name: str, out: Path) -> Manifest | None:
        """The result under the stage's key, if it may be reused: not forced, and its files still
        what its manifest recorded (else it runs again, saying what changed)."""
        if name in self.force:
            return None
        try:
            manifest = Manifest.find(out)
        except DamagedResult as error:
            raise DamagedResult(f"[{name}] {error}: run again with --force {name} to make it anew") from None
        if manifest is not None and (changed := manifest.changed(full=self.cfg.verify_reuse == "full")):
            print(f"[{name}] {', '.join(str(manifest.path(c)) for c in changed)} changed since the stage made it "
                  "(not the digest its manifest recorded): running the stage again", flush=True)
            return None
        return manifest

    def run_stage(self, name: str, module: str, cfg: PipelineConfig, settings: Any, upstream: dict[str, Manifest],
                  inputs: dict[str, str], datasets: dict[str, DataSource], **paths: Path) -> Manifest:
        """Run one stage in its own process, in a child run in MLflow, or reuse its result if its
        key matches: the pipeline's run then links the run that made it."""
        start = time.perf_counter()
        inputs = {k: m.key for k, m in upstream.items()} | inputs
        key = stage_key(module, settings, inputs)
        out = self.cfg.results_dir / module / key
        if self.tracker is None:
            return self.check_stage(name, key, out)
        manifest = self.reusable(name, out)
        store = open_store(self.cfg.results_store)  # results shared with other machines (docs/storage.md)
        if manifest is None and store is not None and name not in self.force:
            manifest = store.download(module, key, out)  # None: not in the store either
            if manifest is not None:
                print(f"[{name}] downloaded: {store.uri(module, key)}", flush=True)
        cached = manifest is not None
        producer = self.tracker.reuse(name, manifest, settings) if cached else None  # None: not in this store
        run_id = producer or self.tracker.start_stage(name, key, inputs, upstream, settings)
        try:
            if cached:
                print(f"[{name}] cached: {out} (made by MLflow run {manifest.run_id or 'unknown'})", flush=True)
            else:
                # forced, changed or damaged: from scratch, not from its checkpoints
                if out.exists() and (name in self.force or (out / MANIFEST).exists()):
                    shutil.rmtree(out)
                print(f"[{name}] running: {out}", flush=True)
                env = self.tracker.stage_env(run_id) | {STAGE_ENV: name}
                manifest = execute_stage.with_options(name=name)(module, cfg, out, inputs, env, paths)
            if store is not None:  # a cached result too, if an earlier upload of it was cut off
                if store.upload(out, replace=name in self.force):
                    print(f"[{name}] uploaded: {store.uri(module, key)}", flush=True)
                if producer is None:
                    self.tracker.client.set_tag(run_id, "posttrain.store", store.uri(module, key))
        except BaseException as error:
            if producer is None:
                self.tracker.fail_stage(run_id, error)
            raise
        used = [dataset_input(source, self.digest_of(source), context) for context, source in datasets.items()]
        try:
            if producer is None:
                self.tracker.finish_stage(run_id, manifest, used, cached, paths.get("model"))
        except MlflowException as error:
            raise TrackingUnavailable(
                f"stage '{name}' is done and its result kept in {out}, but the MLflow store {self.tracker.uri} "
                f"stopped answering ({error.message[:200]}): run again once it answers; the result is reused and "
                "logged then"
            ) from error
        atomic_write_text(self.latest(name), key)
        self.results.append(StageResult(name, manifest, cached, run_id, time.perf_counter() - start,
                                        self.tracker.link(run_id)))
        return manifest

    @cached_property
    def processes(self) -> dict[str, int]:
        """For a training stage's key: the number of processes multiplies the global batch. (Absent
        for one process, so that results made before `launch` existed keep their keys.)"""
        n = self.cfg.launch.num_processes
        return {"processes": n} if n > 1 else {}

    @cached_property
    def demo_data(self) -> Manifest:
        settings = {"seed": self.cfg.seed, "demo": self.cfg.demo.world_settings()}
        return self.run_stage("demo_data", "demo_data", self.cfg, settings, {}, {}, {})

    @cached_property
    def data(self) -> DataConfig:
        """The data sets, with the demo world's generated ones where the user gave none."""
        if not self.cfg.is_demo:
            return self.cfg.data
        world = self.demo_data
        generated = {
            "sft": DataSource(path=str(world.path("sft_train"))),
            "target_eval": DataSource(path=str(world.path("domain_test"))),
            "general_eval": DataSource(path=str(world.path("general_test"))),
        }
        if self.cfg.demo.val_examples:
            generated |= {"target_val": DataSource(path=str(world.path("domain_val"))),
                          "general_val": DataSource(path=str(world.path("general_val")))}
        return self.cfg.data.model_copy(update={k: getattr(self.cfg.data, k) or v for k, v in generated.items()})

    @cached_property
    def stage_cfg(self) -> PipelineConfig:
        """The effective config the stages see: the data filled in. (The demo's tokenizer
        needs no filling: the pretrained model's folder holds it.)"""
        return self.cfg.model_copy(update={"data": self.data})

    @cached_property
    def pretrain(self) -> Manifest:
        # the world's manifest is an input; of `demo`, only the model's own settings and its seed
        model = self.cfg.demo.model_dump(include=self.cfg.demo.MODEL_FIELDS - {"model_seed"})
        settings = {"seed": self.cfg.model_seed, "demo": model, "trainer": self.cfg.pretrain.trainer, **self.processes}
        world = self.demo_data
        general = DataSource(path=str(world.path("general_train")))
        return self.run_stage("pretrain", "pretrain", self.cfg, settings, {"data": world}, {}, {"train": general},
                              data=world.folder)

    @cached_property
    def base_model(self) -> tuple[Path, dict[str, Manifest], dict[str, str]]:
        """The starting model's folder, and its identity as upstream manifest or digest."""
        if self.cfg.is_demo:
            return self.pretrain.path("model"), {"model": self.pretrain}, {}
        path = Path(self.cfg.model.path)
        return path, {}, {"model": digest(path) if path.exists() else f"hub:{self.cfg.model.path}"}

    @cached_property
    def reference(self) -> Manifest:
        model, upstream, inputs = self.base_model
        # The trainer keys that decide the tokens and the loss mask; rows are looked up by their
        # tokens, so the order (seed, steps) does not matter, and SFT checks every row it gets.
        tokenization = {k: v for k, v in self.cfg.sft.trainer.items() if k in TOKENIZATION_KEYS}
        settings = {"topk": self.cfg.sft.reference_topk, "trainer": tokenization,
                    "data": self.digest_of(self.data.sft), "tokenizer": str(self.cfg.model.tokenizer)}
        return self.run_stage("reference", "reference", self.stage_cfg, settings, upstream, inputs,
                              {"train": self.data.sft}, model=model)

    @cached_property
    def sft(self) -> Manifest:
        model, upstream, inputs = self.base_model
        # The chunked and full-logits paths give the same loss and gradients (to float tolerance),
        # and the reference settings matter only when the reference is cached.
        sft = self.cfg.sft.model_dump(exclude={"chunked_loss", "reference", "reference_topk"})
        sft["loss"] = self.cfg.sft.loss.resolved()  # a loss's changed default changes the key
        if self.cfg.sft.cached_reference():
            sft["reference_topk"] = self.cfg.sft.reference_topk
        settings = {"seed": self.cfg.seed, "sft": sft, "data": self.digest_of(self.data.sft),
                    "tokenizer": str(self.cfg.model.tokenizer), **self.processes}
        paths = {}
        if self.cfg.sft.cached_reference():
            upstream, paths = upstream | {"reference": self.reference}, {"reference": self.reference.folder}
        return self.run_stage("sft", "sft", self.stage_cfg, settings, upstream, inputs, {"train": self.data.sft},
                              model=model, **paths)

    def evaluate(self, name: str, model: Path, upstream: dict[str, Manifest], inputs: dict[str, str]) -> Manifest:
        datasets = {suite: getattr(self.data, key) for suite, key in EVAL_SUITES.items()
                    if getattr(self.data, key) is not None}
        settings = {
            "sampling": self.cfg.sampling.key_settings(),
            "evaluate": self.cfg.evaluate.key_settings(code=any(s.verifier == "code" for s in datasets.values())),
            "tokenizer": str(self.cfg.model.tokenizer),
            "measures": 2,  # 2: the answer tokens' entropy too (entropy.json); results without it are redone
        }
        settings |= {suite: self.digest_of(source) for suite, source in datasets.items()}
        paths = {"baseline": upstream["baseline"].folder} if "baseline" in upstream else {}
        return self.run_stage(name, "evaluate", self.stage_cfg, settings, upstream, inputs, datasets,
                              model=model, **paths)

    @cached_property
    def evaluate_base(self) -> Manifest:
        return self.evaluate("evaluate_base", *self.base_model)

    @cached_property
    def evaluate_sft(self) -> Manifest:
        upstream = {"model": self.sft, "baseline": self.evaluate_base}
        return self.evaluate("evaluate_sft", self.sft.path("model"), upstream, {})

    @cached_property
    def sample(self) -> Manifest:
        prompts = self.stage_cfg.pair_prompts
        settings = {"sampling": self.cfg.pairs.sampling(self.cfg.sampling).key_settings(),
                    "max_prompts": self.cfg.pairs.max_prompts, "prompts": self.digest_of(prompts),
                    "tokenizer": str(self.cfg.model.tokenizer)}
        return self.run_stage("sample", "sample", self.stage_cfg, settings, {"model": self.sft}, {},
                              {"prompts": prompts}, model=self.sft.path("model"))

    @cached_property
    def pairs(self) -> Manifest:
        settings = {"seed": self.cfg.seed, "pairs_per_prompt": self.cfg.pairs.pairs_per_prompt,
                    "verifier": self.stage_cfg.pair_prompts.verifier}
        if self.cfg.pairs.reference_chosen:  # absent when off, so that results made before it keep their keys
            settings["reference_chosen"] = True
        return self.run_stage("pairs", "pairs", self.stage_cfg, settings, {"samples": self.sample}, {}, {},
                              samples=self.sample.folder)

    @cached_property
    def dpo(self) -> Manifest:
        settings = {"seed": self.cfg.seed, "dpo": self.cfg.dpo.model_dump(), "tokenizer": str(self.cfg.model.tokenizer),
                    **self.processes}
        upstream: dict[str, Manifest] = {"model": self.sft}
        if self.data.preference is None:
            upstream["pairs"] = self.pairs
            preference, paths = DataSource(path=str(self.pairs.path("pairs"))), {"pairs": self.pairs.path("pairs")}
        else:
            preference, paths = self.data.preference, {}
            settings["preference"] = self.digest_of(preference)
        return self.run_stage("dpo", "dpo", self.stage_cfg, settings, upstream, {}, {"train": preference},
                              model=self.sft.path("model"), **paths)

    @cached_property
    def evaluate_dpo(self) -> Manifest:
        upstream = {"model": self.dpo, "baseline": self.evaluate_base}
        return self.evaluate("evaluate_dpo", self.dpo.path("model"), upstream, {})


def pipeline_stages(cfg: PipelineConfig, *named: str) -> tuple[str, ...]:
    """The stages of this pipeline (no demo stages for a real model, no on-policy pairs for
    given preference data); named ones must be among them."""
    left_out = ((() if cfg.is_demo else DEMO_STAGES) + (() if cfg.data.preference is None else ON_POLICY_STAGES)
                + (() if cfg.sft.cached_reference() else ("reference",)))
    stages = tuple(name for name in STAGES if name not in left_out)
    for name in named:
        if name not in stages:
            raise ConfigError(f"unknown stage '{name}'; the stages of this pipeline are: {', '.join(stages)}")
    return stages


def pipeline_status(cfg: PipelineConfig) -> list[StageStatus]:
    """Each stage: done, stale or missing, with its key (computable once its upstream is built)."""
    run = PipelineRun(cfg, tracker=None)
    for name in pipeline_stages(cfg):
        try:
            getattr(run, name)
        except NotBuilt:
            pass
    return [run.statuses.get(name, StageStatus(name, "missing", "(upstream not built)", None))
            for name in pipeline_stages(cfg)]


@flow(name="posttrain")
def run_pipeline(cfg: PipelineConfig, force: set[str] = frozenset(), stage: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> list[StageResult]:
    """Run the whole pipeline, or only `stage` and what it needs; `force` re-runs stages by name.
    Its MLflow run is nested under `parent_run_id` if given, with `tags` added."""
    stages = pipeline_stages(cfg, *([stage] if stage else []), *force)
    check_data(cfg)
    if cfg.launch.preload:
        start_fork_server()  # its imports run while MLflow and Prefect set up
    with results_lock(cfg.results_dir), stop_on_signals():
        tracker = Tracker(cfg, parent_run_id, tags=tags)
        run = PipelineRun(cfg, tracker, set(force))
        try:
            for name in [stage] if stage else stages:
                getattr(run, name)
            if stage is None and (version := tracker.register_final_model()):
                print(f"[registry] {cfg.tracking.registered_model} version {version}: the final model", flush=True)
        except BaseException as error:
            tracker.finish(error)
            raise
        tracker.finish()
    return run.results


def stage_flow(name: str):
    """A flow that runs one stage (and builds the upstream results it needs)."""

    @flow(name=f"posttrain-{name}")
    def run_one(cfg: PipelineConfig, force: set[str] = frozenset()) -> list[StageResult]:
        return run_pipeline(cfg, force, name)

    return run_one


STAGE_FLOWS = {name: stage_flow(name) for name in STAGES}


@flow(name="posttrain-config")
def run_config(config: str, stage: str | None = None, force: list[str] | None = None) -> list[dict[str, Any]]:
    """The deployable entry point (`prefect.yaml`): what a user types in Prefect's UI or in
    `prefect deployment run --param`. `config` is the pipeline's YAML file, a relative path
    being relative to the flow run's working directory (the deployment's pull step sets it);
    `stage` runs only that stage and what it needs, `force` re-runs stages by name. Returns one
    plain (JSON-able) row per stage, also shown in Prefect's UI as the flow run's table artifact."""
    cfg = load_config(config)
    forced = set(force or [])
    pipeline_stages(cfg, *([stage] if stage else []), *forced)  # a wrong name fails before any work
    results = STAGE_FLOWS[stage](cfg, forced) if stage else run_pipeline(cfg, forced)
    rows = [{"stage": r.name, "cached": r.cached, "key": r.manifest.key, "folder": str(r.manifest.folder),
             "run_id": r.run_id, "link": r.link, "seconds": round(r.seconds, 1), "metrics": r.manifest.metrics}
            for r in results]
    create_table_artifact([{k: v for k, v in row.items() if k != "metrics"} for row in rows], key="posttrain-stages",
                          description=f"posttrain {cfg.name}: the stages of this run and their MLflow runs")
    return rows
