"""The `posttrain` command."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console, RenderableType

# Prefect's temporary server would try to send usage data: with no internet it logs an error.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

app = typer.Typer(
    help="Post-training pipeline: forgetting-aware SFT, sampling and Pass@K evaluation, with "
    "stage-level resume (Prefect) and lineage (MLflow).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

CONFIG = typer.Argument(..., help="the pipeline's YAML file, e.g. configs/demo.yaml")
OVERRIDES = typer.Argument(None, metavar="[KEY=VALUE]...", show_default=False,
                           help="settings over the YAML's, by dotted key: sft.trainer.learning_rate=1e-5 seed=1")
USER_ERRORS = ("ConfigError", "DataError", "StageError", "ResultsBusy", "TrackingUnavailable", "StoreError",
               "DamagedResult")


def _fail(error: BaseException, debug: bool) -> None:
    """A user's mistake reads as one line of advice; anything else keeps its traceback."""
    if isinstance(error, KeyboardInterrupt) and not debug:
        from pipeline.runtime.process import STOP_ADVICE

        typer.echo(f"{error or 'interrupted'}: {STOP_ADVICE}", err=True)
        raise typer.Exit(128 + getattr(error, "signum", signal.SIGINT))
    if debug or type(error).__name__ not in USER_ERRORS:
        raise error
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)


STOP_GRACE_S = 10.0  # stopped by SIGTERM or SIGINT, a run ends within this even if Prefect's server is gone


def _stop_within(seconds: float) -> None:
    """The command line owns its process, so it may end it: see pipeline.runtime.process.stop_on_signals."""
    from pipeline.runtime import process as stage

    stage.stop_grace_s = seconds


class _RunErrorsWithoutTraceback(logging.Formatter):
    """Prefect logs a failed flow's or task's traceback to the console; our own last line says
    what was wrong and what to do. The traceback stays in the record (the Prefect server's log
    has it) and in every other log."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if not record.exc_info or not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return self.inner.format(record)
        kept = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = kept


def _quiet_prefect_tracebacks(debug: bool) -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        quiet = isinstance(handler.formatter, _RunErrorsWithoutTraceback)
        if isinstance(handler, PrefectConsoleHandler) and quiet == debug:  # on without --debug, once
            handler.setFormatter(_RunErrorsWithoutTraceback(handler.formatter) if not debug else handler.formatter.inner)


def _print(table: RenderableType) -> None:
    """Rich wraps to 80 columns when the output is not a terminal (a CI log, a pipe): wider there."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=220)
    console.print(table)


# Prefect's own default port: a server the user started with `prefect server start` is used too.
PREFECT_PORT = int(os.environ.get("POSTTRAIN_PREFECT_PORT", "4200"))


@contextmanager
def _prefect_api():
    """The Prefect API the command's flows report to: the configured one (PREFECT_API_URL), else a
    local Prefect server kept running between commands (started in the background by the first,
    `prefect server stop` stops it), so that a command does not wait for Prefect's temporary
    server to start and stop each time, and the runs stay in the server's UI afterwards.
    POSTTRAIN_PREFECT_SERVER=temporary (or a port taken by something else) keeps Prefect's
    temporary server per command; POSTTRAIN_PREFECT_PORT moves the kept one."""
    import requests
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value() or os.environ.get("POSTTRAIN_PREFECT_SERVER", "keep") == "temporary":
        yield
        return
    url = f"http://127.0.0.1:{PREFECT_PORT}/api"

    def healthy() -> bool:
        try:
            return requests.get(f"{url}/health", timeout=1).ok
        except requests.RequestException:
            return False

    if not healthy():
        if _start_kept_server():
            deadline = time.monotonic() + 60
            while not healthy() and time.monotonic() < deadline:
                time.sleep(0.5)
        if not healthy():
            typer.echo(f"no Prefect server answers on port {PREFECT_PORT}: this run uses a temporary one", err=True)
            yield
            return
        typer.echo(f"a Prefect server now runs at {url.removesuffix('/api')} (its UI lists the runs), kept for the "
                   "next commands: `prefect server stop` stops it", err=True)
    with temporary_settings({PREFECT_API_URL: url}):
        yield


def _start_kept_server() -> bool:
    """Start the kept Prefect server in the background; False if Prefect refused. A server
    that ended without `prefect server stop` (a reboot, a kill) leaves its PID file behind, and
    Prefect then refuses to start another: a file whose process is not a Prefect server is
    removed, and the start tried again."""
    import psutil
    from prefect.cli._server_utils import SERVER_PID_FILE_NAME
    from prefect.settings import PREFECT_HOME

    prefect = str(Path(sys.executable).parent / "prefect")
    start = [prefect, "server", "start", "--background", "--host", "127.0.0.1", "--port", str(PREFECT_PORT)]
    if subprocess.run(start, capture_output=True).returncode == 0:
        return True
    pid_file = Path(PREFECT_HOME.value()) / SERVER_PID_FILE_NAME
    pid = pid_file.read_text().strip() if pid_file.is_file() else ""
    if not pid.isdigit():  # no file, or one a starting server has yet to write
        return False
    try:  # after a reboot the number may well be another program's
        if "prefect" in " ".join(psutil.Process(int(pid)).cmdline()):
            return False  # a server that runs, on another port
    except psutil.Error:
        pass
    pid_file.unlink(missing_ok=True)
    return subprocess.run(start, capture_output=True).returncode == 0


def _load(config: Path, overrides: list[str] | None = None, debug: bool = False):
    from pipeline.config.schema import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as error:
        _fail(error, debug)


@app.command()
def run(
    config: Path = CONFIG,
    overrides: list[str] = OVERRIDES,
    stage: str = typer.Option(None, "--stage", help="run only this stage, building the upstream results it needs"),
    force: list[str] = typer.Option([], "--force", help="re-run this stage even if its result is cached (repeatable)"),
    debug: bool = typer.Option(False, "--debug", help="show full tracebacks"),
) -> None:
    """Run the pipeline the config describes; stages whose result is cached are skipped.

    Stages: demo_data, pretrain (demo world only), evaluate_base, sft, evaluate_sft, sample,
    pairs (on-policy pairs only), dpo, evaluate_dpo."""
    from flows.pipeline_flow import run_pipeline, stage_flow
    from flows.wiring import pipeline_stages
    from pipeline.reporting.summary import evaluation_table, run_summary

    cfg = _load(config, overrides, debug)
    _quiet_prefect_tracebacks(debug)
    _stop_within(STOP_GRACE_S)
    try:
        pipeline_stages(cfg, *([stage] if stage else []), *force)
        with _prefect_api():
            results = stage_flow(stage)(cfg, set(force)) if stage else run_pipeline(cfg, set(force))
    except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 - user errors become one readable line
        _fail(error, debug)
        return
    _print(run_summary(results))
    evaluations = [r for r in results if r.name.startswith("evaluate")]
    if evaluations:
        _print(evaluation_table(evaluations))


@app.command()
def compare(
    config: Path = CONFIG,
    overrides: list[str] = OVERRIDES,
    debug: bool = typer.Option(False, "--debug", help="show full tracebacks"),
) -> None:
    """Run the pipeline once per arm (SFT loss), learning rate and seed of the config's `compare`
    section, sharing the stages they have in common, and write the comparison report (each arm
    at its learning rate chosen on validation, the frontier over learning rates; Markdown, HTML,
    JSON, plots; also logged to MLflow)."""
    from flows.compare import run_compare

    cfg = _load(config, overrides, debug)
    _quiet_prefect_tracebacks(debug)
    _stop_within(STOP_GRACE_S)
    try:
        with _prefect_api():
            folder = run_compare(cfg)
    except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 - user errors become one readable line
        _fail(error, debug)
        return
    typer.echo((folder / "report.md").read_text())
    typer.echo(f"report: {folder / 'report.md'} and {folder / 'report.html'}")


@app.command()
def status(config: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """List each stage as done, stale (its result is for an older config) or missing, with its
    key, what it took and its headline metrics."""
    from flows.wiring import pipeline_status
    from pipeline.reporting.summary import status_table

    _print(status_table(pipeline_status(_load(config, overrides))))


def _store(config: Path | None):
    """The MLflow store of a config (without one: MLFLOW_TRACKING_URI, else results/mlflow.db): the
    config, the store's URI, and a client; None for a SQLite store that is not there, which
    asking would create."""
    from mlflow.tracking import MlflowClient

    from pipeline.config.schema import parse_config
    from pipeline.tracking.tracker import TrackingUnavailable, check_reachable, tracking_uri

    cfg = _load(config) if config else parse_config({"name": "posttrain"})
    uri = tracking_uri(cfg)
    try:
        check_reachable(uri)
    except TrackingUnavailable as error:
        _fail(error, debug=False)
    no_store = uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file()
    return cfg, uri, None if no_store else MlflowClient(uri)


@app.command()
def runs(
    config: Path = typer.Argument(None, help="a pipeline's YAML file, for its MLflow store and experiment; "
                                             "default: MLFLOW_TRACKING_URI, else results/mlflow.db"),
    limit: int = typer.Option(20, min=1, help="how many runs, newest first"),
) -> None:
    """Recent pipeline runs read back from MLflow, with their headline metrics and links."""
    from pipeline.reporting.summary import recent_pipeline_runs, runs_table
    from pipeline.tracking.tracker import run_link

    cfg, uri, client = _store(config)
    experiment = client and client.get_experiment_by_name(cfg.tracking.experiment)
    rows = experiment and recent_pipeline_runs(client, experiment.experiment_id, limit)
    if not rows:
        typer.echo(f"no runs yet: {uri} has no pipeline run in experiment '{cfg.tracking.experiment}' "
                   "(`posttrain run` makes them)")
        return
    _print(runs_table(rows, lambda run_id: run_link(uri, experiment.experiment_id, run_id, cfg.tracking.ui_port)))


@app.command()
def ui(config: Path = CONFIG, port: int = typer.Option(None, help="the port to serve on; default: tracking.ui_port "
                                                              "(5000), where the summaries' links point")) -> None:
    """Open the MLflow UI on the pipeline's tracking store, to compare runs and their lineage."""
    from pipeline.tracking.tracker import ui_command

    cfg, uri, client = _store(config)
    port = port or cfg.tracking.ui_port
    command, env = ui_command(uri, port)
    # The experiment's runs in MLflow's "Model training" view (Runs, Models, the registry), not its
    # landing page, the GenAI overview.
    page = f"http://127.0.0.1:{port}/#/experiments"
    experiment = client and client.get_experiment_by_name(cfg.tracking.experiment)
    page += f"/{experiment.experiment_id}/runs" if experiment else ""
    page += "?workflowType=machine_learning"
    typer.echo(f"MLflow UI for {uri}: {page}")
    subprocess.run(command, env=os.environ | env)


@app.command()
def lineage(
    run_or_model: str = typer.Argument(..., help="a stage run's id, or a LoggedModel's (m-...)"),
    config: Path = typer.Argument(None, help="a pipeline's YAML file, for its MLflow store; default: "
                                             "MLFLOW_TRACKING_URI, else results/mlflow.db"),
) -> None:
    """What a model or a stage run came from: the runs, models and data sets back to the start,
    with their keys, digests and links."""
    from mlflow.exceptions import MlflowException

    from pipeline.reporting.summary import lineage_tree
    from pipeline.tracking.tracker import run_link

    cfg, uri, client = _store(config)
    if client is None:
        typer.echo(f"error: no MLflow store at {uri} (`posttrain run` makes it)", err=True)
        raise typer.Exit(2)
    try:
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        tree = lineage_tree(client, run_or_model, lambda run_id: run_link(
            uri, experiment.experiment_id if experiment else "0", run_id, cfg.tracking.ui_port))
    except MlflowException as error:
        typer.echo(f"error: {run_or_model} is not a run or a model in {uri}: {error.message.splitlines()[0]}", err=True)
        raise typer.Exit(2) from None
    _print(tree)


@app.command()
def init(
    model: str = typer.Option(..., "--model", help="a local model folder or a hub id, e.g. Qwen/Qwen3-0.6B"),
    data: str = typer.Option(..., "--data", help="a local data file (.jsonl, .json, .parquet, .csv) or folder, or a "
                                                 "hub data set, e.g. openai/gsm8k"),
    subset: str = typer.Option(None, "--subset", help="the hub data set's configuration, e.g. main"),
    out: Path = typer.Option(Path("posttrain.yaml"), "--out", help="where the config goes (never over a file)"),
) -> None:
    """Write a commented starter config for a model and a data set: the data set's columns mapped
    to the fields the stages read, its splits to training and evaluation, and what is left to
    fill in."""
    from pipeline.data.starter import write_starter

    try:
        text = write_starter(out, model, data, subset)
    except Exception as error:  # noqa: BLE001 - user errors become one readable line
        _fail(error, debug=False)
    typer.echo(text)
    typer.echo(f"wrote {out}: fill in what its TODO lines say, then `posttrain validate {out}`")


@app.command()
def validate(config: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """Check a config (keys, types, files, trainer options, every row of its local data sets)
    without running anything."""
    from pipeline.orchestration.checks import check_inputs

    cfg = _load(config, overrides)
    try:
        check_inputs(cfg)
    except Exception as error:  # noqa: BLE001 - user errors become one readable line
        _fail(error, debug=False)
    typer.echo(f"{config}: valid ({'demo world' if cfg.is_demo else cfg.model.path}, sft loss {cfg.sft.loss.name})")


if __name__ == "__main__":
    app()
