"""The tables a person reads: a run's summary, `posttrain status` and `posttrain runs`."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Column, Table
from rich.tree import Tree

from pipeline.evaluation.lm_eval_suite import headline_metrics as lm_eval_headline

if TYPE_CHECKING:  # MLflow takes a second to import; the tables `status` prints do not need it
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

# Per stage (by module), the metrics worth a glance and their short names; the rest is in MLflow.
HEADLINE = {
    "pretrain": {"train_loss": "loss"},
    "sft": {"train_loss": "loss", "final/kl": "KL"},
    "dpo": {"train_loss": "loss", "final/rewards/accuracies": "reward acc"},
    "evaluate": {"target/pass_at_1": "target pass@1", "general/pass_at_1": "general pass@1",
                 "general/retention": "retention", "general/lm_eval/retention": "lm-eval retention"},
    "pairs": {"pairs/pairs": "pairs", "pairs/train_pass_at_1": "train pass@1"},
    "reference": {"tail_mass": "tail mass"},
}


COUNTS = {"pairs/pairs"}


def headline(stage: str, metrics: dict[str, float]) -> str:
    return "  ".join(f"{label} {metrics[name]:.{0 if name in COUNTS else 3}f}"
                     for name, label in HEADLINE.get(stage, {}).items() if name in metrics)


def link_column() -> Column:
    # Never wrapped: a link cut in two cannot be clicked or pasted; other columns wrap instead.
    return Column("MLflow run", no_wrap=True)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def run_summary(results: Iterable) -> Table:
    """One row per stage of a finished run (pipeline.orchestration.runner.StageResult): whether it ran or was
    cached, its key, its time in this run, its headline metrics and its run in the MLflow UI."""
    table = Table("stage", "status", "key", "time", "headline metrics", link_column(), title="posttrain run")
    for r in results:
        table.add_row(r.name, "cached" if r.cached else "ran", r.manifest.key, duration(r.seconds),
                      headline(r.manifest.stage, r.manifest.metrics), escape(r.link), style="dim" if r.cached else None)
    return table


def evaluation_table(evaluations: list) -> Table:
    """Every Pass@K and retention metric, and each lm-eval task's score, one column per
    evaluation (StageResult) of the run."""
    names = sorted({k for r in evaluations for k in r.manifest.metrics if "pass_at" in k or "retention" in k}
                   | {k for r in evaluations for k in lm_eval_headline(r.manifest)})
    table = Table("metric", *(r.name for r in evaluations), title="evaluations")
    for name in names:
        values = [r.manifest.metrics.get(name) for r in evaluations]
        table.add_row(name, *("" if v is None else f"{v:.3f}" for v in values))
    return table


def status_table(statuses: Iterable) -> Table:
    """`posttrain status`: each stage (pipeline.orchestration.runner.StageStatus) with, where done, what its
    result took to make, its headline metrics and the MLflow run that made it; where not, why
    (what changed since its latest result, or the upstream stage it waits on)."""
    table = Table("stage", "status", "key", "took", "headline metrics or why not done", "made by MLflow run")
    colors = {"done": "green", "stale": "yellow", "changed": "yellow", "damaged": "red", "missing": "red",
              "waiting": "dim"}
    for s in statuses:
        m = s.manifest
        table.add_row(s.name, f"[{colors[s.status]}]{s.status}[/]", s.key, duration(m.seconds) if m else "",
                      headline(m.stage, m.metrics) if m else escape(s.reason), (m.run_id or "unknown") if m else "")
    return table


@dataclass
class PipelineRunRow:
    run: Run
    stages: dict[str, Run]  # stage name -> its run under this pipeline run

    def metric(self, stage: str, name: str) -> float | None:
        return self.stages[stage].data.metrics.get(name) if stage in self.stages else None


def recent_pipeline_runs(client: MlflowClient, experiment_id: str, limit: int) -> list[PipelineRunRow]:
    """The newest pipeline runs, each with its stage runs (two searches, not one per run)."""
    pipelines = client.search_runs([experiment_id], "tags.`posttrain.kind` = 'pipeline'", max_results=limit,
                                   order_by=["attributes.start_time DESC"])
    if not pipelines:
        return []
    oldest = min(p.info.start_time for p in pipelines)
    stages = client.search_runs([experiment_id], f"tags.`posttrain.kind` = 'stage' and attributes.start_time >= {oldest}",
                                max_results=50000)
    by_parent: dict[str, dict[str, Run]] = defaultdict(dict)
    for stage in stages:
        by_parent[stage.data.tags.get("mlflow.parentRunId")][stage.data.tags.get("posttrain.stage")] = stage
    # A reused stage has no run under the pipeline's: its tag names the run that made the result.
    reused = {p.info.run_id: {k.removeprefix("posttrain.reused."): v for k, v in p.data.tags.items()
                              if k.startswith("posttrain.reused.")} for p in pipelines}
    wanted = sorted({run_id for links in reused.values() for run_id in links.values()})
    producers = {r.info.run_id: r for start in range(0, len(wanted), 100) for r in client.search_runs(
        [experiment_id], "attributes.run_id IN (" + ", ".join(f"'{i}'" for i in wanted[start:start + 100]) + ")",
        max_results=100)}
    for parent, links in reused.items():
        by_parent[parent] |= {stage: producers[run_id] for stage, run_id in links.items() if run_id in producers}
    return [PipelineRunRow(p, by_parent[p.info.run_id]) for p in pipelines]


def runs_table(rows: list[PipelineRunRow], link) -> Table:
    """`posttrain runs`: one pipeline run per row, newest first, with what it reached: target
    Pass@1 at each evaluation and the general retention after SFT and after DPO."""
    table = Table("started", "name", "status", "time", "target pass@1 base / sft / dpo",
                  "retention sft / dpo", link_column())

    def values(row: PipelineRunRow, stages: tuple[str, ...], name: str) -> str:
        return " / ".join("-" if (v := row.metric(s, name)) is None else f"{v:.3f}" for s in stages)

    for row in rows:
        info, tags = row.run.info, row.run.data.tags
        arm = ", ".join(f"{k.split('.')[-1]} {tags[k]}" for k in ("posttrain.arm", "posttrain.learning_rate", "posttrain.seed",
                                                                "posttrain.base_seed") if k in tags)
        seconds = (info.end_time - info.start_time) / 1000 if info.end_time else None
        table.add_row(time.strftime("%Y-%m-%d %H:%M", time.localtime(info.start_time / 1000)),
                      escape(f"{info.run_name} ({arm})" if arm else info.run_name), info.status.lower(),
                      duration(seconds), values(row, ("evaluate_base", "evaluate_sft", "evaluate_dpo"), "target/pass_at_1"),
                      values(row, ("evaluate_sft", "evaluate_dpo"), "general/retention"), escape(link(info.run_id)))
    return table


def lineage_tree(client: MlflowClient, start: str, link) -> Tree:
    """`posttrain lineage`: what a model (a LoggedModel id, `m-...`) or a stage run came from, as
    a tree: each run with its stage, key and link, the model it made, the data sets it read, and,
    recursively, the runs that made the models and the other results it read (DPO's pairs)."""
    if start.startswith("m-"):
        model = client.get_logged_model(start)
        tree = Tree(f"model {model.name} {model.model_id}")
        if model.source_run_id:
            add_run(client, tree, model.source_run_id, link, set())
        return tree
    tree = Tree(f"run {start}")
    add_run(client, tree, start, link, set())
    return tree


def add_run(client: MlflowClient, node: Tree, run_id: str, link, seen: set[str]) -> None:
    run = client.get_run(run_id)
    tags = run.data.tags
    branch = node.add(f"[bold]{escape(tags.get('posttrain.stage', run.info.run_name))}[/]  key "
                      f"{tags.get('posttrain.key', '?')}  {escape(link(run_id))}")
    if run_id in seen:
        branch.add("(shown above)")
        return
    seen.add(run_id)
    for output in run.outputs.model_outputs if run.outputs else []:
        model = client.get_logged_model(output.model_id)
        digest = tags.get("posttrain.output_digest.model", "")[:16]
        branch.add(f"made model {model.name} {model.model_id}" + (f"  digest {digest}" if digest else ""))
    for dataset in run.inputs.dataset_inputs:
        branch.add(f"read data {escape(dataset.dataset.name)}  digest {dataset.dataset.digest}")
    models = run.inputs.model_inputs or []
    for read in models:
        model = client.get_logged_model(read.model_id)
        below = branch.add(f"read model {model.name} {model.model_id}  {escape(model.tags.get('posttrain.path', ''))}")
        if model.source_run_id:
            add_run(client, below, model.source_run_id, link, seen)
    # The other results it read (the model's own run is reached through the model above).
    for key, upstream in sorted(tags.items()):
        if key.startswith("posttrain.input_run.") and not (models and key == "posttrain.input_run.model"):
            add_run(client, branch, upstream, link, seen)
