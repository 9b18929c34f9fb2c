"""The `posttrain compare` flow: the pipeline once per arm (an SFT loss), learning rate and
seed, then the report.

Only wiring. The arms share every stage whose key they share (the data, the base model and
its evaluation), so those run once; a stage that failed or was killed resumes like any
other. MLflow gets one run for the comparison, with each arm-lr-seed's pipeline run nested
under it and the report logged as its artifacts and metrics.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.pipeline_flow import run_pipeline
from pipeline.config.schema import EVAL_SUITES, ConfigError, PipelineConfig
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


@flow(name="posttrain-compare")
def run_compare(cfg: PipelineConfig) -> Path:
    """Run every arm at every learning rate and seed (seed by seed, so the first seed's runs
    finish first), then write the report; returns the report's folder."""
    if cfg.compare is None:
        raise ConfigError("the config has no `compare` section (arms and seeds); see configs/claim.yaml")
    # Every pipeline's config first: one that cannot run is refused before any work starts.
    if len(learning_rates(cfg)) > 1:  # with one rate there is nothing to choose
        check_validation_data(cfg)
    plan = [(arm, seed, lr, cfg.arm(arm, seed, lr))
            for seed in cfg.compare.seeds for lr in learning_rates(cfg) for arm in cfg.compare.arms]
    with results_lock(cfg.results_dir), stop_on_signals():
        tracker = Tracker(cfg, kind="compare")
        try:
            runs = []
            for arm, seed, lr, arm_cfg in plan:
                stages = run_pipeline(arm_cfg, parent_run_id=tracker.parent_id, tags=run_tags(cfg, arm, seed, lr))
                pipeline_run = tracker.client.get_run(stages[-1].run_id).data.tags["mlflow.parentRunId"]
                runs.append(ArmRun(arm, seed, lr, pipeline_run, {s.name: s.manifest for s in stages},
                                   {s.name: s.run_id for s in stages}))
            files = write_report(cfg, runs, report_dir(cfg))
            tracker.log_report(files)
        except BaseException as error:
            tracker.finish(error)
            raise
        tracker.finish()
    return report_dir(cfg)
