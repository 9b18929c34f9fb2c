"""The `posttrain compare` flow: the pipeline once per arm (an SFT loss), learning rate and
seed, then the report.

Only wiring. The arms share every stage whose key they share (the data, the base model and
its evaluation), so those run once; a stage that failed or was killed resumes like any
other. `compare.parallel` pipelines run side by side as tasks of Prefect's thread pool task
runner, each on devices of its own (pipeline.orchestration.devices); a stage they share is run
by the first to reach it while the others wait to reuse it. MLflow gets one run for the
comparison, with each arm-lr-seed's pipeline run nested under it and the report logged as its
artifacts and metrics.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from flows.pipeline_flow import run_pipeline
from pipeline.config.schema import EVAL_SUITES, ConfigError, PipelineConfig
from pipeline.orchestration.devices import pipeline_devices
from pipeline.orchestration.runner import StageResult
from pipeline.reporting.report import SELECT, ArmRun, write_report
from pipeline.results.manifest import results_lock
from pipeline.runtime.process import stop_on_signals
from pipeline.tracking.tracker import Tracker


def report_dir(cfg: PipelineConfig) -> Path:
    return cfg.compare.report_dir or cfg.results_dir / "compare" / cfg.name


def learning_rates(cfg: PipelineConfig) -> list[float]:
    """The SFT learning rates to run, ascending: `compare.learning_rates`, else the config's own."""
    if cfg.compare.learning_rates:
        return sorted(cfg.compare.learning_rates)
    from trl import SFTConfig

    return [cfg.sft.trainer.get("learning_rate", SFTConfig.learning_rate)]


def check_validation_data(cfg: PipelineConfig) -> None:
    """Refuse, before any run, a comparison whose learning-rate choice would find no validation
    metrics (the report needs them, and would fail only after every pipeline ran)."""
    suites = sorted({metric.split("/")[0] for metric in SELECT[cfg.compare.select]})  # val_target, val_general
    generated = cfg.is_demo and cfg.demo.val_examples > 0
    missing = [f"data.{EVAL_SUITES[s]}" for s in suites if getattr(cfg.data, EVAL_SUITES[s]) is None and not generated]
    if missing:
        raise ConfigError(f"compare.select: {cfg.compare.select} is scored on validation prompts: give "
                          f"{', '.join(missing)}" + (" (or demo.val_examples > 0)" if cfg.is_demo else ""))


def run_tags(cfg: PipelineConfig, arm: str, seed: int, learning_rate: float) -> dict[str, str]:
    tags = {"posttrain.arm": arm, "posttrain.seed": str(seed), "posttrain.learning_rate": f"{learning_rate:g}"}
    if cfg.compare.base_seeds is not None:
        tags["posttrain.base_seed"] = str(cfg.compare.base_seed(seed))
    return tags


def planned_pipelines(cfg: PipelineConfig) -> list[tuple[str, int, float, PipelineConfig]]:
    """(arm, seed, learning rate, its pipeline's config), seed by seed, so the first seed's runs finish first."""
    return [(arm, seed, lr, cfg.arm(arm, seed, lr))
            for seed in cfg.compare.seeds for lr in learning_rates(cfg) for arm in cfg.compare.arms]


@task(cache_policy=NO_CACHE)
def arm_pipeline(cfg: PipelineConfig, parent_run_id: str, tags: dict[str, str], free: queue.Queue,
                 failed: threading.Event) -> list[StageResult] | None:
    """One arm-lr-seed's pipeline on devices taken from `free` (and given back); None: not run,
    as another pipeline failed."""
    if failed.is_set():
        return None
    devices = free.get()
    try:
        return run_pipeline(cfg, parent_run_id=parent_run_id, tags=tags, devices=devices)
    except BaseException:
        failed.set()
        raise
    finally:
        free.put(devices)


def run_compare(cfg: PipelineConfig) -> Path:
    """Run every arm at every learning rate and seed, `compare.parallel` pipelines side by side,
    then write the report; returns the report's folder."""
    if cfg.compare is None:
        raise ConfigError("the config has no `compare` section (arms and seeds); see configs/claim.yaml")
    devices = pipeline_devices(cfg, len(planned_pipelines(cfg)))
    return compare_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=len(devices)))(cfg, devices)


@flow(name="posttrain-compare")
def compare_flow(cfg: PipelineConfig, devices: list[dict[str, str]]) -> Path:
    """The pipelines as Prefect tasks, as many at a time as `devices` lists (each its own), the
    stages they share run once; then the report."""
    # Every pipeline's config first: one that cannot run is refused before any work starts.
    if len(learning_rates(cfg)) > 1:  # with one rate there is nothing to choose
        check_validation_data(cfg)
    plan = planned_pipelines(cfg)
    free, failed = queue.Queue(), threading.Event()
    for slot in devices:
        free.put(slot)
    if len(devices) > 1:
        print(f"[compare] {len(devices)} pipelines side by side"
              + "".join(f"; {', '.join(f'{k}={v}' for k, v in slot.items())}" for slot in devices if slot), flush=True)
    with results_lock(cfg.results_dir), stop_on_signals():
        tracker = Tracker(cfg, kind="compare")
        try:
            futures = [arm_pipeline.with_options(task_run_name=f"{arm}/lr{lr:g}/seed{seed}").submit(
                arm_cfg, tracker.parent_id, run_tags(cfg, arm, seed, lr), free, failed)
                for arm, seed, lr, arm_cfg in plan]
            wait(futures)
            # The first failure in plan order, as one at a time would have met it.
            done = [(arm, seed, lr, future.result()) for (arm, seed, lr, _), future in zip(plan, futures)]
            runs = []
            for arm, seed, lr, stages in done:
                pipeline_run = tracker.client.get_run(stages[-1].run_id).data.tags["mlflow.parentRunId"]
                runs.append(ArmRun(arm, seed, lr, pipeline_run, {s.name: s.manifest for s in stages},
                                   {s.name: s.run_id for s in stages}))
            files = write_report(cfg, runs, report_dir(cfg))
            tracker.log_report(files)
        except BaseException as error:
            # No more pipelines start; a stop reaches the running ones' stages, which end their own
            # runs. Not waited on: after a stop their flows' last calls to the Prefect server, which
            # the signal may have ended, would hang.
            failed.set()
            tracker.finish(error)
            raise
        tracker.finish()
    return report_dir(cfg)
