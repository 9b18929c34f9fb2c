"""The `posttrain` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer

app = typer.Typer(
    help="Post-training pipeline: forgetting-aware SFT, sampling and Pass@K evaluation, with "
    "stage-level resume (Prefect) and lineage (MLflow).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

CONFIG = typer.Argument(..., help="the pipeline's YAML file, e.g. configs/demo.yaml")
USER_ERRORS = ("ConfigError", "DataError", "StageError", "ResultsBusy", "TrackingUnavailable")


def _fail(error: Exception, debug: bool) -> None:
    """A user's mistake reads as one line of advice; anything else keeps its traceback."""
    if debug or type(error).__name__ not in USER_ERRORS:
        raise error
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)


def _load(config: Path, debug: bool = False):
    from pipeline.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as error:
        _fail(error, debug)


@app.command()
def run(
    config: Path = CONFIG,
    stage: str = typer.Option(None, "--stage", help="run only this stage, building the upstream results it needs"),
    force: list[str] = typer.Option([], "--force", help="re-run this stage even if its result is cached (repeatable)"),
    debug: bool = typer.Option(False, "--debug", help="show full tracebacks"),
) -> None:
    """Run the pipeline the config describes; stages whose result is cached are skipped.

    Stages: demo_data, pretrain (demo world only), evaluate_base, sft, evaluate_sft, sample,
    pairs (on-policy pairs only), dpo, evaluate_dpo."""
    from flows.pipeline import STAGE_FLOWS, pipeline_stages, run_pipeline

    cfg = _load(config, debug)
    try:
        pipeline_stages(cfg, *([stage] if stage else []), *force)
        results = STAGE_FLOWS[stage](cfg, set(force)) if stage else run_pipeline(cfg, set(force))
    except Exception as error:  # noqa: BLE001 - user errors become one readable line
        _fail(error, debug)
        return
    typer.echo(f"\n{'stage':<14} {'status':<7} {'key':<17} {'MLflow run':<33}")
    for r in results:
        typer.echo(f"{r.name:<14} {'cached' if r.cached else 'ran':<7} {r.manifest.key:<17} {r.manifest.run_id or '-'}")
    evaluations = [r for r in results if r.name.startswith("evaluate")]
    if evaluations:
        names = sorted({k for r in evaluations for k in r.manifest.metrics if "pass_at" in k or "retention" in k})
        typer.echo(f"\n{'metric':<32}" + "".join(f"{r.name:>15}" for r in evaluations))
        for name in names:
            values = [r.manifest.metrics.get(name) for r in evaluations]
            typer.echo(f"{name:<32}" + "".join(f"{v:>15.3f}" if v is not None else f"{'':>15}" for v in values))


@app.command()
def compare(
    config: Path = CONFIG,
    debug: bool = typer.Option(False, "--debug", help="show full tracebacks"),
) -> None:
    """Run the pipeline once per arm (SFT loss) and seed of the config's `compare` section,
    sharing the stages they have in common, and write the comparison report (Markdown, HTML,
    JSON, plots; also logged to MLflow)."""
    from flows.compare import run_compare

    cfg = _load(config, debug)
    try:
        folder = run_compare(cfg)
    except Exception as error:  # noqa: BLE001 - user errors become one readable line
        _fail(error, debug)
        return
    typer.echo((folder / "report.md").read_text())
    typer.echo(f"report: {folder / 'report.md'} and {folder / 'report.html'}")


@app.command()
def status(config: Path = CONFIG) -> None:
    """List each stage as done, stale (its result is for an older config) or missing, with its key."""
    from flows.pipeline import pipeline_status

    typer.echo(f"{'stage':<14} {'status':<8} {'key':<21} MLflow run")
    for s in pipeline_status(_load(config)):
        typer.echo(f"{s.name:<14} {s.status:<8} {s.key:<21} {s.run_id or '-'}")


@app.command()
def ui(config: Path = CONFIG, port: int = typer.Option(5000, help="the port to serve on")) -> None:
    """Open the MLflow UI on the pipeline's tracking store, to compare runs and their lineage."""
    from pipeline.tracking import tracking_uri

    uri = tracking_uri(_load(config))
    typer.echo(f"MLflow UI for {uri} on http://127.0.0.1:{port}")
    subprocess.run([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--port", str(port)],
                   env=os.environ.copy())


@app.command()
def validate(config: Path = CONFIG) -> None:
    """Check a config (keys, types, files, trainer options) without running anything."""
    cfg = _load(config)
    typer.echo(f"{config}: valid ({'demo world' if cfg.is_demo else cfg.model.path}, sft loss {cfg.sft.loss.name})")


if __name__ == "__main__":
    app()
