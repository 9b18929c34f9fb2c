"""Prefect flows: the whole pipeline, and one flow per stage.

Only wiring: which result feeds which input of which stage. Each stage is a method that
first asks for its upstream stages, so asking for one stage builds just what it needs. Keys,
reuse, the results store, MLflow and the stage's process are the runtime's (pipeline.runner);
what a stage's key depends on is its own module's (`STAGE` in stages/<name>.py). Every stage,
run or reused, is a Prefect task run, a reused one in state Cached. (Prefect's own cache keys
include the flow run, so the pipeline keeps its own.)
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from prefect import flow, task
from prefect.context import tags as prefect_tags_context
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from pipeline.config import ConfigError, DataConfig, DataSource, PipelineConfig, load_config
from pipeline.contract import Input
from pipeline.data import check_inputs
from pipeline.manifest import Manifest, results_lock
from pipeline.process import StageError, start_fork_server, stop_on_signals
from pipeline.runner import NotBuilt, StageResult, StageRunner, StageStatus
from pipeline.tracking import Tracker, pipeline_run_name
from stages import demo_data, dpo, evaluate, pairs, pretrain, reference, sample, sft

STAGES = ("demo_data", "pretrain", "evaluate_base", "reference", "sft", "evaluate_sft", "sample", "pairs", "dpo", "evaluate_dpo")
DEMO_STAGES = ("demo_data", "pretrain")
ON_POLICY_STAGES = ("sample", "pairs")  # not run when the config gives data.preference
MODULES = (demo_data, pretrain, evaluate, reference, sft, sample, pairs, dpo)


def _transient(task, task_run, state) -> bool:
    """Retry only failures marked transient (an engine that failed to start), never bad input."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, StageError) and error.transient


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=_transient, cache_policy=NO_CACHE)
def stage_task(runner: StageRunner, planned) -> StageResult:
    result = runner.run(planned)
    # A reused result's task run says so in Prefect's UI, as Prefect's own cache hits do.
    return Completed(name="Cached", data=result, message=f"reused {result.manifest.folder}") if result.cached else result


class PipelineRun:
    """The stages of one pipeline, wired: each property is a stage's result (a Manifest)."""

    def __init__(self, cfg: PipelineConfig, runner: StageRunner):
        self.cfg, self.runner = cfg, runner

    def stage(self, name: str, module, inputs: dict[str, Input], cfg: PipelineConfig | None = None) -> Manifest:
        planned = self.runner.plan(name, module.STAGE, cfg or self.stage_cfg, inputs)
        if self.runner.tracker is None:
            return self.runner.check(planned)
        run = stage_task.with_options(name=name, task_run_name=name, tags=[f"key:{planned.key}"])
        return run(self.runner, planned, return_state=True).result().manifest  # the state: Cached or Completed

    @cached_property
    def demo_data(self) -> Manifest:
        return self.stage("demo_data", demo_data, {}, self.cfg)

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
        world = self.demo_data
        return self.stage("pretrain", pretrain, {"tokenizer": Input.output(world, "tokenizer"),
                                                 "train": Input.output(world, "general_train")}, self.cfg)

    @cached_property
    def base_model(self) -> Input:
        """The starting model: the demo's pretrained one, or the config's folder or hub id."""
        return Input.output(self.pretrain, "model") if self.cfg.is_demo else Input.model(self.cfg.model.path)

    @cached_property
    def reference(self) -> Manifest:
        return self.stage("reference", reference, {"model": self.base_model})

    @cached_property
    def sft(self) -> Manifest:
        cached = {"reference": Input.output(self.reference, "topk")} if self.cfg.sft.cached_reference() else {}
        return self.stage("sft", sft, {"model": self.base_model, **cached})

    @cached_property
    def evaluate_base(self) -> Manifest:
        return self.stage("evaluate_base", evaluate, {"model": self.base_model})

    @cached_property
    def evaluate_sft(self) -> Manifest:
        return self.stage("evaluate_sft", evaluate, {"model": Input.output(self.sft, "model"),
                                                     "baseline": Input.metrics(self.evaluate_base)})

    @cached_property
    def sample(self) -> Manifest:
        return self.stage("sample", sample, {"model": Input.output(self.sft, "model")})

    @cached_property
    def pairs(self) -> Manifest:
        return self.stage("pairs", pairs, {"samples": Input.output(self.sample, "samples")})

    @cached_property
    def dpo(self) -> Manifest:
        on_policy = {"pairs": Input.output(self.pairs, "pairs")} if self.data.preference is None else {}
        return self.stage("dpo", dpo, {"model": Input.output(self.sft, "model"), **on_policy})

    @cached_property
    def evaluate_dpo(self) -> Manifest:
        return self.stage("evaluate_dpo", evaluate, {"model": Input.output(self.dpo, "model"),
                                                     "baseline": Input.metrics(self.evaluate_base)})


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
    """Each stage: done, stale (and what changed), missing, or waiting on the upstream stage that
    is not built (a key follows its inputs' content, so it is known once they are)."""
    runner = StageRunner(cfg, tracker=None)
    run = PipelineRun(cfg, runner)
    waiting = {}
    for name in pipeline_stages(cfg):
        try:
            getattr(run, name)
        except NotBuilt as error:
            waiting[name] = error.name
    return [runner.statuses.get(name) or StageStatus(name, "waiting", "(not yet known)", None, f"on {waiting[name]}")
            for name in pipeline_stages(cfg)]


def flow_run_name() -> str:
    """The MLflow parent run's name: one name for a pipeline run in both UIs."""
    from prefect.runtime import flow_run

    return pipeline_run_name(flow_run.parameters["cfg"], flow_run.parameters.get("tags"))


def prefect_tags(cfg: PipelineConfig, run_tags: dict[str, str] | None):
    """The Prefect tags of a pipeline's flow run and its task runs: the config's name, SFT loss
    and seed (and a compare arm's learning rate). The flow run exists already: its tags are
    updated; the task runs get them from the context returned."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    found = {f"config:{cfg.name}", f"loss:{cfg.sft.loss.name}", f"seed:{cfg.seed}"}
    found |= {f"{k.removeprefix('posttrain.')}:{v}" for k, v in (run_tags or {}).items()}
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=sorted(found | set(flow_run.tags)))
    return prefect_tags_context(*sorted(found))


def stage_rows(results: list[StageResult], metrics: bool = True) -> list[dict[str, Any]]:
    """One plain (JSON-able) row per stage."""
    return [{"stage": r.name, "cached": r.cached, "key": r.manifest.key, "folder": str(r.manifest.folder),
             "run_id": r.run_id, "link": r.link, "seconds": round(r.seconds, 1)}
            | ({"metrics": r.manifest.metrics} if metrics else {}) for r in results]


@flow(name="posttrain", flow_run_name=flow_run_name)
def run_pipeline(cfg: PipelineConfig, force: set[str] = frozenset(), stage: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> list[StageResult]:
    """Run the whole pipeline, or only `stage` and what it needs; `force` re-runs stages by name.
    Its MLflow run is nested under `parent_run_id` if given, with `tags` added. In Prefect the
    flow run is named after the config and tagged with its loss and seed, and its table
    artifact lists the stages with their MLflow links."""
    stages = pipeline_stages(cfg, *([stage] if stage else []), *force)
    check_inputs(cfg)
    if cfg.launch.preload:
        start_fork_server([module.STAGE for module in MODULES])  # its imports run while MLflow and Prefect set up
    with results_lock(cfg.results_dir), stop_on_signals(), prefect_tags(cfg, tags):
        tracker = Tracker(cfg, parent_run_id, tags=tags)
        runner = StageRunner(cfg, tracker, set(force))
        run = PipelineRun(cfg, runner)
        try:
            for name in [stage] if stage else stages:
                getattr(run, name)
            if stage is None and (version := tracker.register_final_model()):
                print(f"[registry] {cfg.tracking.registered_model} version {version}: the final model", flush=True)
        except BaseException as error:
            tracker.finish(error)
            raise
        tracker.finish()
    create_table_artifact(stage_rows(runner.results, metrics=False), key="posttrain-stages",
                          description=f"posttrain {pipeline_run_name(cfg, tags)}: its stages and their MLflow runs")
    return runner.results


def stage_flow(name: str):
    """A flow that runs one stage (and builds the upstream results it needs)."""

    @flow(name=f"posttrain-{name}", flow_run_name=flow_run_name)
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
    plain (JSON-able) row per stage; the pipeline's flow run shows them as its table artifact."""
    cfg = load_config(config)
    forced = set(force or [])
    pipeline_stages(cfg, *([stage] if stage else []), *forced)  # a wrong name fails before any work
    results = STAGE_FLOWS[stage](cfg, forced) if stage else run_pipeline(cfg, forced)
    return stage_rows(results)
