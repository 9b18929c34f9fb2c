"""Prefect flows: the whole pipeline, and one flow per stage, over the wiring of
flows/wiring.py. Every stage, run or reused, is a Prefect task run, a reused one in state
Cached (Prefect's own cache keys include the flow run, so the pipeline keeps its own); what a
stage's process writes is in its task run's log.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging.handlers import APILogHandler
from prefect.states import Completed

from flows.wiring import MODULES, PipelineRun, pipeline_stages
from pipeline.config.schema import PipelineConfig, load_config
from pipeline.orchestration.checks import check_inputs
from pipeline.orchestration.runner import Planned, StageResult, StageRunner
from pipeline.results.manifest import Manifest, results_lock
from pipeline.runtime.process import StageError, preload_for, stop_on_signals
from pipeline.tracking.tracker import Tracker, pipeline_run_name


def _transient(task, task_run, state) -> bool:
    """Retry only failures marked transient (an engine that failed to start), never bad input."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, StageError) and error.transient


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=_transient, cache_policy=NO_CACHE)
def stage_task(runner: StageRunner, planned) -> StageResult:
    result = runner.run(planned)
    # A reused result's task run says so in Prefect's UI, as Prefect's own cache hits do; the
    # state's message gives the key (not a tag: Prefect reads task tags as concurrency limits and
    # asks its server for each new set of them, 0.4 s a stage).
    done = "reused" if result.cached else "made"
    return Completed(name="Cached" if result.cached else "Completed", data=result,
                     message=f"key {result.manifest.key}: {done} {result.manifest.folder}")


# The lines stage processes write: to Prefect's API only, since the console has them already.
STAGE_OUTPUT = logging.getLogger("posttrain.stage")
STAGE_OUTPUT.addHandler(APILogHandler())
STAGE_OUTPUT.setLevel(logging.INFO)
STAGE_OUTPUT.propagate = False


def log_stage_line(text: str) -> None:
    """A line a stage's process wrote, into its Prefect task run's log (the calling thread runs in
    the task's context)."""
    STAGE_OUTPUT.info(text)


def submit_stage(runner: StageRunner):
    """Each stage as a Prefect task run named after it."""

    def submit(name: str, planned: Planned) -> Manifest:
        run = stage_task.with_options(name=name, task_run_name=name)
        return run(runner, planned, return_state=True).result().manifest  # the state: Cached or Completed

    return submit


def flow_run_name() -> str:
    """The MLflow parent run's name: one name for a pipeline run in both UIs."""
    from prefect.runtime import flow_run

    return pipeline_run_name(flow_run.parameters["cfg"], flow_run.parameters.get("tags"))


def tag_flow_run(cfg: PipelineConfig, run_tags: dict[str, str] | None) -> None:
    """Tag the pipeline's flow run (it exists already) with the config's name, SFT loss and seed
    (and a compare arm's learning rate). Its task runs are left untagged: Prefect reads task
    tags as concurrency limits and asks its server for a slot on them before every task."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    found = {f"config:{cfg.name}", f"loss:{cfg.sft.loss.name}", f"seed:{cfg.seed}"}
    found |= {f"{k.removeprefix('posttrain.')}:{v}" for k, v in (run_tags or {}).items()}
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=sorted(found | set(flow_run.tags)))


def stage_rows(results: list[StageResult], metrics: bool = True) -> list[dict[str, Any]]:
    """One plain (JSON-able) row per stage."""
    return [{"stage": r.name, "cached": r.cached, "key": r.manifest.key, "folder": str(r.manifest.folder),
             "run_id": r.run_id, "link": r.link, "seconds": round(r.seconds, 1)}
            | ({"metrics": r.manifest.metrics} if metrics else {}) for r in results]


@flow(name="posttrain", flow_run_name=flow_run_name)
def run_pipeline(cfg: PipelineConfig, force: set[str] = frozenset(), stage: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 devices: dict[str, str] | None = None) -> list[StageResult]:
    """Run the whole pipeline, or only `stage` and what it needs; `force` re-runs stages by name.
    Its MLflow run is nested under `parent_run_id` if given, with `tags` added; `devices`: its
    GPUs beside other pipelines (a `compare`'s, pipeline.orchestration.devices). In Prefect the
    flow run is named after the config and tagged with its loss and seed, and its table
    artifact lists the stages with their MLflow links."""
    stages = pipeline_stages(cfg, *([stage] if stage else []), *force)
    check_inputs(cfg)
    if cfg.launch.preload:
        preload_for([module.STAGE for module in MODULES])
    tag_flow_run(cfg, tags)
    with results_lock(cfg.results_dir), stop_on_signals():
        tracker = Tracker(cfg, parent_run_id, tags=tags)
        runner = StageRunner(cfg, tracker, set(force), log_line=log_stage_line, devices=devices or {})
        run = PipelineRun(cfg, runner, submit_stage(runner))
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


@functools.cache
def stage_flow(name: str):
    """A flow that runs one stage (and builds the upstream results it needs). Made when first
    asked for: making a flow derives its parameters' schema from PipelineConfig, a fifth of a
    second each."""

    @flow(name=f"posttrain-{name}", flow_run_name=flow_run_name)
    def run_one(cfg: PipelineConfig, force: set[str] = frozenset()) -> list[StageResult]:
        return run_pipeline(cfg, force, name)

    return run_one


@flow(name="posttrain-config")
def run_config(config: str, stage: str | None = None, force: list[str] | None = None,
               overrides: list[str] | None = None) -> list[dict[str, Any]]:
    """The deployable entry point (`prefect.yaml`): what a user types in Prefect's UI or in
    `prefect deployment run --param`. `config` is the pipeline's YAML file, a relative path
    being relative to the flow run's working directory (the deployment's pull step sets it);
    `stage` runs only that stage and what it needs, `force` re-runs stages by name, `overrides`
    sets `dotted.key=value` settings over the file's, as on the command line. Returns one
    plain (JSON-able) row per stage; the pipeline's flow run shows them as its table artifact."""
    cfg = load_config(config, overrides or [])
    forced = set(force or [])
    pipeline_stages(cfg, *([stage] if stage else []), *forced)  # a wrong name fails before any work
    results = stage_flow(stage)(cfg, forced) if stage else run_pipeline(cfg, forced)
    return stage_rows(results)
