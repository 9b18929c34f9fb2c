"""MLflow lineage: one parent run per `posttrain run`, one nested child run per stage (and
for `posttrain compare`, one run above the pipelines of all its arms and seeds).

A stage's run carries tags with its key, its inputs' keys and the runs that produced them,
and its outputs' paths and digests, and logs the data sets it read with `log_inputs`, so the
MLflow UI links a model back to the model and data it came from. Models are LoggedModels: the
output of the run that made them, inputs of the runs that read them, with the evaluations'
metrics logged against them. A reused result adds no run: the pipeline's run links its maker. The stage process logs into
its run through the standard `MLFLOW_TRACKING_URI` / `MLFLOW_RUN_ID` variables (the trainers'
MLflow callback does so by itself); the parent logs the manifest once the stage is done.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import warnings
from urllib.parse import urlsplit, urlunsplit
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException
from mlflow.entities import (DatasetInput, InputTag, LoggedModelInput, LoggedModelOutput, LoggedModelStatus, Metric,
                             Param, RunStatus, RunTag)
from mlflow.tracking import MlflowClient

from pipeline.config.schema import DataSource, PipelineConfig, dotted
from pipeline.results.manifest import MANIFEST, Manifest

MAX_PARAM_LENGTH = 250  # MLflow refuses longer parameter values
# The LoggedModel a model-making stage's output is, by stage: the demo's pretrained model is the base.
MODEL_NAMES = {"pretrain": "base", "sft": "sft", "dpo": "dpo"}
# An evaluation's metrics that its pipeline's run carries too (`<stage>/<metric>`), so that two
# pipeline runs compare column by column in the MLflow UI.
PIPELINE_METRICS = re.compile(r"(target|general)/pass_at_\d+|general/(lm_eval/)?retention")


def tracking_uri(cfg: PipelineConfig) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI, else SQLite in the results folder."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(cfg.results_dir / 'mlflow.db').resolve()}"


def run_link(uri: str, experiment_id: str, run_id: str, ui_port: int) -> str:
    """The run's page in the MLflow UI: on the tracking server (without the credentials its URI
    may hold), for a local store (SQLite, files) on `posttrain ui`; elsewhere (Databricks, ...)
    just the run id."""
    parsed = urlsplit(uri)
    if parsed.scheme in ("http", "https"):
        host = parsed.hostname + (f":{parsed.port}" if parsed.port else "")
        base = urlunsplit((parsed.scheme, host, parsed.path.rstrip("/"), "", ""))
    elif parsed.scheme in ("file", "sqlite") or (not parsed.scheme and uri != "databricks"):  # a local path
        base = f"http://127.0.0.1:{ui_port}"
    else:
        return run_id
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def ui_command(uri: str, port: int) -> tuple[list[str], dict[str, str]]:
    """`posttrain ui`'s server and the environment it adds: MLflow's tracking server on the store
    with one web worker and no GenAI job runner. (`mlflow ui` starts four workers and a job
    runner, for evaluation jobs the pipeline does not use: minutes and GBs on a small machine.)"""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    return command, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as `a.b.c` parameters, values cut to MLflow's length limit."""
    return {k: json.dumps(v, default=str)[:MAX_PARAM_LENGTH] for k, v in dotted(data, prefix).items()}


def pipeline_run_name(cfg: PipelineConfig, tags: dict[str, str] | None) -> str:
    """`<name>/<sft loss>/seed<seed> <config digest>`: runs of one config share a name and runs of
    two configs never do, so two pipeline runs tell apart in the UI's runs table and on its compare
    page (whose parameters show what differs). A compare arm's name says its loss, learning rate
    and seed already."""
    if tags and "posttrain.arm" in tags:
        return cfg.name
    # What the user set, not the defaults: a later version's new setting renames no run.
    config = json.dumps(cfg.model_dump(mode="json", exclude_defaults=True), sort_keys=True, default=str)
    return f"{cfg.name}/{cfg.sft.loss.name}/seed{cfg.seed} {hashlib.sha256(config.encode()).hexdigest()[:6]}"


def curve_metrics(log_history: Path, timestamp: int) -> list[Metric]:
    """A training's logged values (the Trainer's log_history.json) as metrics at their steps, named
    as transformers' MLflow callback names them when it logs them live."""
    return [Metric(re.sub(r"[^0-9A-Za-z_\-\.\ :/]", "_", k), float(v), timestamp, int(logs["step"]))
            for logs in json.loads(log_history.read_text()) for k, v in logs.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)]


def dataset_input(source: DataSource, digest: str, context: str) -> DatasetInput:
    with warnings.catch_warnings():
        # MLflow registers its local artifact source twice and warns, for every local file,
        # that the path could be either of them.
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
        origin = (HuggingFaceDatasetSource(path=source.hub, config_name=source.subset, split=source.split) if source.hub
                  else resolve_dataset_source(os.path.abspath(source.file)))
    name = source.hub or source.suite or os.path.basename(source.path)
    dataset = MetaDataset(origin, name=name, digest=digest[:36])
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])


def ended_status(error: BaseException) -> str:
    """KILLED for a run stopped from outside (SIGINT, SIGTERM), FAILED for one that failed."""
    return RunStatus.to_string(RunStatus.KILLED if isinstance(error, KeyboardInterrupt) else RunStatus.FAILED)


@contextmanager
def best_effort() -> Iterator[None]:
    """For recording a failure: if the store is what failed, the original error must not be
    hidden by a second one. A run left RUNNING is ended KILLED by the next run (end_lost_runs)."""
    try:
        yield
    except MlflowException:
        pass


class TrackingUnavailable(RuntimeError):
    """The MLflow store cannot be reached or used; the message says what was run and kept."""


def check_reachable(uri: str) -> None:
    """An MLflow server must answer before a run starts: MLflow's client would retry for minutes
    and fail mid-pipeline. (A local SQLite or file store needs no check.)"""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=10).raise_for_status()
    except requests.RequestException as error:
        raise TrackingUnavailable(
            f"the MLflow tracking server {uri} does not answer ({type(error).__name__}): start it, or set "
            "tracking.uri to another store (null keeps the runs in results_dir/mlflow.db); nothing was run"
        ) from None


class Tracker:
    def __init__(self, cfg: PipelineConfig, parent_id: str | None = None, kind: str = "pipeline",
                 tags: dict[str, str] | None = None):
        """Start a run for a pipeline (or a comparison of pipelines), nested under `parent_id`
        if given. Call it holding the results folder's lock."""
        self.uri = tracking_uri(cfg)
        self.ui_port = cfg.tracking.ui_port
        check_reachable(self.uri)
        cfg.results_dir.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(self.uri)
        try:
            experiment = self.client.get_experiment_by_name(cfg.tracking.experiment)
        except MlflowException as error:  # e.g. a SQLite store another process keeps locked
            raise TrackingUnavailable(
                f"the MLflow store {self.uri} cannot be used ({error.message.splitlines()[0][:200]}): wait for "
                "whatever holds it, or set tracking.uri to another store; nothing was run"
            ) from None
        self.experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(cfg.tracking.experiment)
        )
        self.results_dir = str(cfg.results_dir.resolve())
        if parent_id is None:  # the outermost run: any other RUNNING run on this folder was lost
            self.end_lost_runs()
        self.log_models, self.registered_model = cfg.tracking.log_models, cfg.tracking.registered_model
        self.models: dict[str, str] = {}  # result key -> the id of its LoggedModel
        self.stages: dict[str, tuple] = {}  # stage run id -> its name, key settings, upstream results, inputs
        self.final_model: tuple[str, str] | None = None  # the last model made: LoggedModel id, its stage run
        name = pipeline_run_name(cfg, tags) if kind == "pipeline" else cfg.name
        tags = {"posttrain.kind": kind, "posttrain.results_dir": self.results_dir, **(tags or {})}
        if parent_id is not None:
            tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.parent_id = run.info.run_id
        config = cfg.model_dump(mode="json")
        params = flatten(config) | flatten(cfg.sft.loss.resolved(), "sft.loss.")  # every loss parameter, defaults too
        self.client.log_batch(self.parent_id, params=[Param(k, v) for k, v in params.items()])
        self.client.log_text(self.parent_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")

    def link(self, run_id: str) -> str:
        return run_link(self.uri, self.experiment_id, run_id, self.ui_port)

    def end_lost_runs(self) -> None:
        """A run whose process was killed (or whose machine was lost) stays RUNNING in MLflow.
        Holding the results folder's lock, no other run on it is alive: end those as KILLED."""
        lost = self.client.search_runs(
            [self.experiment_id],
            f"attributes.status = 'RUNNING' and tags.`posttrain.results_dir` = '{self.results_dir}'",
        )
        for run in lost:
            self.client.set_tag(run.info.run_id, "posttrain.error",
                                "its process was lost (killed, or its machine lost) while it ran; ended by a later run")
            self.client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))

    def stage_env(self, run_id: str) -> dict[str, str]:
        """What a stage process needs to log into its run. Its requests give up after a few
        seconds rather than MLflow's minutes: a store that stops answering mid-stage only stops
        the stage's logging (see StageMLflowCallback), never its training."""
        quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
        return {k: os.environ.get(k, v) for k, v in quick.items()} | {"MLFLOW_TRACKING_URI": self.uri,
                                                                       "MLFLOW_RUN_ID": run_id}

    def start_stage(self, name: str, key: str, inputs: dict[str, str], upstream: dict[str, Manifest],
                    settings: dict[str, Any]) -> str:
        """A run for the stage, with its key settings as parameters (`settings.sft.loss.name`, ...)."""
        tags = {
            "mlflow.parentRunId": self.parent_id,
            "posttrain.kind": "stage",
            "posttrain.results_dir": self.results_dir,
            "posttrain.stage": name,
            "posttrain.key": key,
            **{f"posttrain.input.{k}": v for k, v in inputs.items()},
            **{f"posttrain.input_run.{k}": m.run_id for k, m in upstream.items() if m.run_id},
        }
        # Earlier tries at this result that were killed or failed: linked both ways, so that the
        # killed run's page says which run took the stage up (and holds its whole curve).
        tried = self.client.search_runs([self.experiment_id], f"tags.`posttrain.key` = '{key}' and tags."
                                        f"`posttrain.results_dir` = '{self.results_dir}' and attributes.status != "
                                        "'FINISHED' and attributes.status != 'RUNNING'", max_results=10)
        tried = [r for r in tried if "posttrain.taken_up_by" not in r.data.tags]  # not those a run took up already
        if tried:
            tags["posttrain.takes_up"] = ",".join(r.info.run_id for r in tried)
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        for earlier in tried:
            self.client.set_tag(earlier.info.run_id, "posttrain.taken_up_by", run_id)
        # MlflowClient.log_batch splits into MLflow's batch limits (100 parameters, 1,000 metrics) itself
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in flatten(settings, "settings.").items()])
        self.stages[run_id] = (name, settings, upstream, inputs)
        return run_id

    def finish_stage(self, run_id: str, manifest: Manifest, datasets: list[DatasetInput], cached: bool,
                     model_read: Path | None = None) -> None:
        """Log the manifest (metrics, outputs, data sets read) into the stage's run and end it.
        The model it read (`model_read`) is an input of the run, the model it made an output, both
        LoggedModels; an evaluation's metrics are linked to the model it measured."""
        name, settings, upstream, inputs = self.stages.pop(run_id)
        tags = {f"posttrain.output.{n}": str(manifest.path(n)) for n in manifest.outputs}
        tags |= {f"posttrain.output_digest.{n}": d for n, d in manifest.digests.items()}
        if cached:  # the result was made by an earlier run: link it
            tags |= {"posttrain.cached": "true", "posttrain.produced_by_run": manifest.run_id or "unknown"}
        read = None
        if model_read is not None:
            source = upstream.get("model")
            read = self.models[source.key] if source is not None else \
                self.logged_model("base", inputs["model"], model_read, None, {})  # a model the config names
            self.client.log_inputs(run_id, models=[LoggedModelInput(read)])
        if "model" in manifest.outputs:
            self.client.log_outputs(run_id, [LoggedModelOutput(self.made_model(manifest, run_id, settings), 0)])
        measured = read if manifest.stage == "evaluate" else None
        now = int(time.time() * 1000)
        # `final/*` are the last points of the training curves, which the run holds already: as
        # single values they would open the run's charts above the curves.
        metrics = [Metric(k, float(v), now, 0, model_id=measured) for k, v in manifest.metrics.items()
                   if not k.startswith("final/")]
        if "log_history" in manifest.outputs:  # curve points the run lacks: a result made without it, or a store
            # that stopped answering mid-stage and is back
            logged = {m.step for m in self.client.get_metric_history(run_id, "loss")}
            metrics += [m for m in curve_metrics(manifest.path("log_history"), now)
                        if m.step not in logged and m.key not in manifest.metrics]
        self.log_pipeline_metrics(name, manifest)
        self.client.log_batch(run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.log_artifact(run_id, str(manifest.folder / MANIFEST))
        for name in manifest.outputs:  # samples, training logs, plots; models stay where they are
            if manifest.path(name).is_file():
                self.client.log_artifact(run_id, str(manifest.path(name)))
        if datasets:
            self.client.log_inputs(run_id, datasets)
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))

    def reuse(self, name: str, manifest: Manifest, settings: dict[str, Any]) -> str | None:
        """A reused result adds no run: the pipeline's run is tagged with the run that made it
        (`posttrain.reused.<stage>`), whose history and model it links, and carries its headline
        metrics. That run's id; None where this store does not have it finished (a result made
        elsewhere, or one whose logging the store's failure cut off), which then gets a run of its
        own that logs it."""
        try:
            made_by = self.client.get_run(manifest.run_id) if manifest.run_id else None
        except MlflowException:
            made_by = None
        if made_by is None or made_by.info.status != RunStatus.to_string(RunStatus.FINISHED):
            return None
        producer = made_by.info.run_id
        self.client.set_tag(self.parent_id, f"posttrain.reused.{name}", producer)
        if "model" in manifest.outputs:  # also for results made before models were logged
            self.made_model(manifest, producer, settings)
        self.log_pipeline_metrics(name, manifest)
        return producer

    def made_model(self, manifest: Manifest, run_id: str, settings: dict[str, Any]) -> str:
        """The LoggedModel of the model a stage made in run `run_id`; the pipeline's final model so far."""
        made = self.logged_model(MODEL_NAMES.get(manifest.stage, manifest.stage), manifest.key, manifest.path("model"),
                                 run_id, settings)
        self.final_model = made, run_id
        return made

    def log_pipeline_metrics(self, name: str, manifest: Manifest) -> None:
        """An evaluation's headline metrics on the pipeline's run, as `<stage>/<metric>`."""
        if manifest.stage == "evaluate":
            now = int(time.time() * 1000)
            self.client.log_batch(self.parent_id, metrics=[Metric(f"{name}/{k}", float(v), now, 0)
                                                           for k, v in manifest.metrics.items()
                                                           if PIPELINE_METRICS.fullmatch(k)])

    def logged_model(self, name: str, key: str, folder: Path, source_run: str | None, settings: dict[str, Any]) -> str:
        """The id of the LoggedModel of the model made under `key` (a stage result's key, or a given
        model's digest): the one an earlier run logged, else a new one, with the key settings of
        the stage that made it as its parameters, and its files as artifacts with `log_models: copy`."""
        if key in self.models:
            return self.models[key]
        folder = Path(folder)
        weights = "copy" if self.log_models == "copy" and folder.is_dir() else "reference"  # a hub id has no folder
        found = self.client.search_logged_models(
            [self.experiment_id], max_results=1, filter_string=f"name = '{name}' AND tags.`posttrain.key` = '{key}' "
            f"AND tags.`posttrain.weights` = '{weights}'")
        if found and found[0].status == LoggedModelStatus.READY:
            self.models[key] = found[0].model_id
            return self.models[key]
        model = self.client.create_logged_model(
            self.experiment_id, name=name, source_run_id=source_run, model_type="causal-lm", params=flatten(settings),
            tags={"posttrain.key": key, "posttrain.path": str(folder.resolve() if folder.exists() else folder),
                  "posttrain.weights": weights})
        if weights == "copy":
            self.client.log_model_artifacts(model.model_id, str(folder))
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        self.models[key] = model.model_id
        return model.model_id

    def register_final_model(self) -> str | None:
        """Register the pipeline's final model under `tracking.registered_model` (a new version,
        linked to the run that made it); the version, or None when nothing is to be registered."""
        if not self.registered_model or self.final_model is None:
            return None
        model_id, run_id = self.final_model
        with best_effort():
            self.client.create_registered_model(self.registered_model)  # exists already after the first run
        # The model's artifact location, not `models:/<id>`: the registry would resolve that through
        # MLflow's global tracking URI, not this client's store.
        location = self.client.get_logged_model(model_id).artifact_location
        version = self.client.create_model_version(self.registered_model, source=location, run_id=run_id,
                                                   model_id=model_id)
        self.client.set_tag(self.parent_id, "posttrain.registered_model", f"{self.registered_model}/{version.version}")
        return version.version

    def fail_stage(self, run_id: str, error: BaseException) -> None:
        self.stages.pop(run_id, None)
        with best_effort():
            self.client.set_tag(run_id, "posttrain.error", str(error)[:5000] or type(error).__name__)
            self.client.set_terminated(run_id, ended_status(error))

    def log_report(self, files: dict[str, Path]) -> None:
        """Log a comparison's report files, and its summary as metrics of this run:
        `<phase>/<arm>/<metric>` (mean over seeds) and `<phase>/<arm>-vs-<baseline>/<metric>`."""
        report = json.loads(files["report.json"].read_text())
        now = int(time.time() * 1000)
        metrics = [Metric(f"{phase}/{arm}/{name}", s["mean"], now, 0)
                   for phase, arms in report["summary"].items() for arm, values in arms.items()
                   for name, s in values.items()]
        metrics += [Metric(f"{phase}/{arm}-vs-{report['baseline']}/{name}", d["diff"], now, 0)
                    for phase, arms in report["differences"].items() for arm, values in arms.items()
                    for name, d in values.items()]
        self.client.log_batch(self.parent_id, metrics=metrics)
        for path in files.values():
            self.client.log_artifact(self.parent_id, str(path), "report")

    def finish(self, error: BaseException | None = None) -> None:
        if error is None:
            self.client.set_terminated(self.parent_id, RunStatus.to_string(RunStatus.FINISHED))
            return
        with best_effort():
            self.client.set_terminated(self.parent_id, ended_status(error))

