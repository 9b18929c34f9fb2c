"""The `posttrain` command."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="Post-training pipeline: forgetting-aware SFT, sampling and Pass@K evaluation, with resume.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

USER_ERRORS = ("ConfigError", "DataError", "StageError")


def _fail(error: Exception, debug: bool) -> None:
    if debug or type(error).__name__ not in USER_ERRORS:
        raise error
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)


@app.command()
def run(
    config: Path = typer.Argument(..., help="the pipeline's YAML file, e.g. configs/demo.yaml"),
    stage: str = typer.Option(None, "--stage", help="run only this stage, building the upstream results it needs"),
    force: list[str] = typer.Option([], "--force", help="re-run this stage even if its result is cached (repeatable)"),
    debug: bool = typer.Option(False, "--debug", help="show full tracebacks"),
) -> None:
    """Run the pipeline the config describes; stages whose result is cached are skipped.

    Stages: demo_data, pretrain (demo world only), evaluate_base, sft, evaluate_sft."""
    from flows.pipeline import run_pipeline
    from pipeline.config import load_config

    try:
        results = run_pipeline(load_config(config), set(force), stage)
    except Exception as error:  # noqa: BLE001 - user errors become one readable line
        _fail(error, debug)
        return
    typer.echo(f"\n{'stage':<15} {'status':<7} {'key':<17} metrics")
    for r in results:
        metrics = "  ".join(f"{k}={v:.3f}" for k, v in r.manifest.metrics.items()
                            if "pass@" in k or "retention" in k or k == "train_loss")
        typer.echo(f"{r.name:<15} {'cached' if r.cached else 'ran':<7} {r.manifest.key:<17} {metrics}")


@app.command()
def validate(config: Path = typer.Argument(..., help="the pipeline's YAML file")) -> None:
    """Check a config (keys, types, files, trainer options) without running anything."""
    from pipeline.config import ConfigError, load_config

    try:
        cfg = load_config(config)
    except ConfigError as error:
        _fail(error, debug=False)
        return
    typer.echo(f"{config}: valid ({'demo world' if cfg.is_demo else cfg.model.path}, sft loss {cfg.sft.loss.name})")
