"""The `posttrain compare` flow: the pipeline once per arm (an SFT loss) and seed, then the report.

Only wiring. The arms share every stage whose key they share (the data, the base model and
its evaluation), so those run once; a stage that failed or was killed resumes like any
other. MLflow gets one run for the comparison, with each arm-seed's pipeline run nested
under it and the report logged as its artifacts and metrics.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.pipeline import run_pipeline
from pipeline.config import ConfigError, PipelineConfig
from pipeline.manifest import results_lock
from pipeline.report import ArmRun, write_report
from pipeline.tracking import Tracker


def report_dir(cfg: PipelineConfig) -> Path:
    return cfg.compare.report_dir or cfg.results_dir / "compare" / cfg.name


@flow(name="posttrain-compare")
def run_compare(cfg: PipelineConfig) -> Path:
    """Run every arm at every seed (seed by seed, so the first seed's arms finish first), then
    write the report; returns the report's folder."""
    if cfg.compare is None:
        raise ConfigError("the config has no `compare` section (arms and seeds); see configs/claim.yaml")
    with results_lock(cfg.results_dir):
        tracker = Tracker(cfg, kind="compare")
        try:
            runs = []
            for seed in cfg.compare.seeds:
                for arm in cfg.compare.arms:
                    stages = run_pipeline(cfg.arm(arm, seed), parent_run_id=tracker.parent_id,
                                          tags={"posttrain.arm": arm, "posttrain.seed": str(seed)})
                    pipeline_run = tracker.client.get_run(stages[-1].run_id).data.tags["mlflow.parentRunId"]
                    runs.append(ArmRun(arm, seed, pipeline_run, {s.name: s.manifest for s in stages},
                                       {s.name: s.run_id for s in stages}))
            base = runs[0].manifests["evaluate_base"]
            files = write_report(cfg, runs, base, report_dir(cfg))
            tracker.log_report(files)
        except BaseException:
            tracker.finish(failed=True)
            raise
        tracker.finish(failed=False)
    return report_dir(cfg)
