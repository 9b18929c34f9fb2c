"""lm-evaluation-harness tasks as part of the general suite: checked before any stage runs (names
in lm-eval's registry, data available), run on an evaluate stage's model, and turned into
metrics `general/lm_eval/<task>/<metric>` and retention against the base model.

lm-eval does the work (task registry, few-shot, requests, scoring); this module only wires it to
the stage: which backend, which tasks with which settings, and the metric names MLflow takes."""

from __future__ import annotations

import difflib
import functools
import gzip
import io
import json
import logging
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config.schema import ConfigError, LmEvalConfig, PipelineConfig
from pipeline.data.hub import dataset_cached, hub_reachable

if TYPE_CHECKING:
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedTokenizerBase

PREFIX = "general/lm_eval"
SHIPPED = ("posttrain_general_exact", "posttrain_general_choice")  # they read data.general_eval
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}  # `datasets` builders over local files


def task_manager(settings: LmEvalConfig, general_eval: Path | None) -> TaskManager:
    """lm-eval's registry with the project's and the config's task folders. Its own ~15,000 tasks
    are indexed (about 9 s) only when a task is not found in those folders."""
    # Kept per process, under the digest of the folders' files: a changed task file is read anew.
    folders, data = tuple(settings.folders()), str(general_eval) if general_eval else None
    files = settings.files_digest()
    local = _task_manager(folders, files, False, data)
    if all(t.task in local.all_tasks or _is_file(t.task) for t in settings.tasks):
        return local
    return _task_manager(folders, files, True, data)


@functools.cache
def _task_manager(folders: tuple[Path, ...], files: str, defaults: bool, general_eval: str | None) -> TaskManager:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(folders), include_defaults=defaults,
                       metadata={"general_eval": general_eval} if general_eval else {})


def _is_file(task: str) -> bool:
    return task.endswith((".yaml", ".yml")) and Path(task).is_file()


def check_lm_eval(cfg: PipelineConfig, general_chats: bool) -> None:
    """Before any stage runs: every task is in lm-eval's registry (or a YAML file), and the data
    each needs can be read here: local files that exist, or a hub data set that is cached or
    reachable. The error names the task, its key and the data it needs. `general_chats`: the
    general suite's prompts are chats (message lists), which the project's own tasks cannot pose."""
    settings = cfg.evaluate.lm_eval
    if settings is None:
        return
    general = cfg.data.general_eval
    name = general.name if general is not None else f"the {cfg.demo.world} demo world's general suite"
    for i, spec in enumerate(settings.tasks):
        if spec.task in SHIPPED and (general_chats or (general is not None and (
                not general.as_is or general.verifier == "code"))):
            raise ConfigError(f"evaluate.lm_eval.tasks[{i}] ({spec.task}) reads data.general_eval as prompt/answer "
                              f"rows of a local JSONL file read as it is, with text prompts, and {name} is not one"
                              f"{' (its prompts are chats)' if general_chats else ''}: use lm-eval tasks of its own")
    if all(spec.task in SHIPPED for spec in settings.tasks):
        return  # the project's own, over data.general_eval, checked above; importing lm-eval to index them takes 1.5 s
    manager = task_manager(settings, None)
    index = manager.task_index
    for i, spec in enumerate(settings.tasks):
        if spec.task.endswith((".yaml", ".yml")) and not Path(spec.task).is_file():
            raise ConfigError(f"evaluate.lm_eval.tasks[{i}]: no task file at {spec.task}")
        if spec.task not in index and not _is_file(spec.task):
            close = difflib.get_close_matches(spec.task, manager.all_tasks, n=3)
            raise ConfigError(f"evaluate.lm_eval.tasks[{i}]: {spec.task!r} is not an lm-eval task, group or tag"
                              + (f" (did you mean {', '.join(close)}?)" if close else "")
                              + "; custom tasks: a YAML file, or its folder in evaluate.lm_eval.include_path")
    missing: list[str] = []
    for i, spec in enumerate(settings.tasks):
        needs: dict[str, set[str]] = {}  # the data -> its subsets (dataset_name) that are needed
        for task in leaf_configs(index, spec.task):
            if need := unavailable_data(task):
                needs.setdefault(need, set()).update([task["dataset_name"]] if task.get("dataset_name") else [])
        if needs:
            missing.append(f"evaluate.lm_eval.tasks[{i}] ({spec.task}) needs " + ", ".join(
                what + (f" ({', '.join(sorted(subsets)[:3])}{', ...' if len(subsets) > 3 else ''})" if subsets else "")
                for what, subsets in needs.items()))
    if missing:
        raise ConfigError("; ".join(missing) + ": not available on this machine (hub data sets are neither in the "
                          "local Hugging Face cache nor reachable): fill the cache where the hub is reachable, or use "
                          "tasks over local files (docs/pipeline.md, lm-eval tasks)")


def leaf_configs(index: dict, name: str, seen: set[str] | None = None) -> list[dict]:
    """The configs of the tasks a task, group or tag name (or task file) stands for, read from
    lm-eval's index without loading any data."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    seen = set() if seen is None else seen
    if name in seen:
        return []
    seen.add(name)
    if name not in index:
        return [load_yaml(Path(name), resolve_func=False, recursive=True)] if _is_file(name) else []
    entry = index[name]
    if entry.kind == Kind.TAG:
        return [c for other in index.values() if name in other.tags for c in leaf_configs(index, other.name, seen)]
    if entry.kind == Kind.GROUP:
        members = entry.cfg.get("task") or []
        return [c for m in (members if isinstance(members, list) else [members])
                for c in ([m] if isinstance(m, dict) else leaf_configs(index, m, seen))]
    return [entry.cfg]


def unavailable_data(task: dict) -> str | None:
    """What a task's data is, if it cannot be read here; None when it can."""
    if task.get("custom_dataset") or task.get("class"):  # a function of the task's own gives the data
        return None
    path = task.get("dataset_path")
    if path is None:
        return None
    kwargs = task.get("dataset_kwargs") or {}
    if path in LOCAL_BUILDERS:
        files = kwargs.get("data_files") or {}
        names = files.values() if isinstance(files, dict) else [files]
        absent = [f for group in names for f in ([group] if isinstance(group, str) else group) if not Path(f).exists()]
        return f"the file {absent[0]}" if absent else None
    if Path(path).expanduser().exists():
        return None
    return None if dataset_cached(path) or hub_reachable() else f"the hub data set {path}"


@contextmanager
def lm_eval_model(model: Path, tokenizer: PreTrainedTokenizerBase, cfg: PipelineConfig) -> Iterator[tuple[str, LM]]:
    """The model lm-eval evaluates, named by its backend: the sampling's vLLM engine (`EngineLM`)
    where `sampling.backend` is vllm, else lm-eval's HF backend. `tokenizer`: the model's, with the
    config's chat template; the template's variables are `model.chat_template_kwargs`."""
    sampling, options = cfg.sampling, cfg.model
    if sampling.chosen_backend() != "vllm":
        import torch
        from lm_eval.models.huggingface import HFLM

        yield "hf", HFLM(pretrained=str(model), tokenizer=tokenizer, dtype="auto",
                         trust_remote_code=options.trust_remote_code, batch_size=cfg.evaluate.lm_eval.batch_size,
                         device="cuda" if torch.cuda.is_available() else "cpu",
                         chat_template_args=options.chat_template_kwargs)
        return
    from pipeline.evaluation.lm_eval_engine import EngineLM
    from pipeline.sampling.sampler import engine_session

    # One engine: data-parallel ranks are for the sampling's many completions.
    engine = sampling.resolved().model_copy(update={"data_parallel_size": 1})
    with engine_session(model, engine, options.tokenizer, options.trust_remote_code) as call:
        yield "vllm", EngineLM(call, tokenizer, sampling.seed, options.chat_template_kwargs)


def run_lm_eval(model: Path, tokenizer: PreTrainedTokenizerBase, cfg: PipelineConfig,
                out: Path) -> tuple[dict[str, float], dict]:
    """Run the config's lm-eval tasks on the model (`tokenizer`: its own, with the config's chat
    template); its metrics, and what to record in the manifest folder (`lm_eval.json`: lm-eval's
    results; `lm_eval_samples.jsonl.gz`: every request and response)."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    settings = cfg.evaluate.lm_eval
    general = cfg.data.general_eval
    # lm-eval advises, for every task with a data function, to pass its arguments as the
    # TaskManager's metadata: which is how the project's tasks get data.general_eval.
    logging.getLogger("lm_eval.api.task").addFilter(_METADATA_ADVICE)
    manager = task_manager(settings, general.file if general is not None else None)
    tasks, members = [], {}
    for spec in settings.tasks:
        loaded = manager.load(spec.task)
        for task in loaded["tasks"].values():
            if spec.num_fewshot is not None:
                task.set_config(key="num_fewshot", value=spec.num_fewshot)
        name = spec.task if not _is_file(spec.task) else next(iter(loaded["groups"] or loaded["tasks"]))
        top = loaded["groups"].get(name) or loaded["tasks"].get(name)
        tasks += [top] if top is not None else list(loaded["tasks"].values())
        members[name] = list(loaded["tasks"])  # the tasks a group or tag stands for
    with lm_eval_model(model, tokenizer, cfg) as (backend, lm):
        results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=settings.limit, log_samples=True,
                                  apply_chat_template=settings.apply_chat_template)
    write_samples(out / "lm_eval_samples.jsonl.gz", results.pop("samples"))
    record = {"backend": backend, "members": members,
              "primary": {name: primary_metric(results["results"], name, leaves, spec.metric)
                          for (name, leaves), spec in zip(members.items(), settings.tasks, strict=True)},
              **{k: results[k] for k in ("results", "versions", "n-shot", "higher_is_better", "group_subtasks")
                 if k in results}}
    (out / "lm_eval.json").write_text(json.dumps(record, indent=1, default=handle_non_serializable))
    return lm_eval_metrics(results["results"]), record


def write_samples(path: Path, samples: dict[str, list[dict]]) -> None:
    """lm-eval's logged samples, one JSON line per task row, gzipped with no time in its header:
    the same samples make the same bytes, so the result's digest is its content's."""
    from lm_eval.utils import handle_non_serializable

    with io.TextIOWrapper(gzip.GzipFile(path, "wb", mtime=0), encoding="utf-8") as f:
        for task, rows in samples.items():
            for row in rows:
                f.write(json.dumps({"task": task, **row}, default=handle_non_serializable) + "\n")


class _MetadataAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


_METADATA_ADVICE = _MetadataAdvice()


def primary_metric(results: dict[str, dict], name: str, leaves: list[str], chosen: str | None) -> dict[str, str]:
    """The metric retention is taken of (`metric` of the task's config, else the first it reports),
    by result row, as its name under PREFIX: the task's (or group's aggregate) row, or, for a tag
    or a group that aggregates nothing, each of its tasks' rows."""
    rows = [name] if _scores(results.get(name, {})) else leaves
    primary = {}
    for row in rows:
        names = _scores(results[row])
        picked = [k for k in names if k.split(",")[0] == chosen] if chosen else names
        if not picked:
            raise ValueError(f"lm-eval task {row} reports no metric {chosen!r} (it reports "
                             f"{', '.join(k.split(',')[0] for k in names) or 'none'}): set its `metric`")
        primary[row] = metric_name(row, picked[0])
    return primary


def _scores(values: dict[str, Any]) -> list[str]:
    """A result row's metric keys (`acc,none`), standard errors left out."""
    return [k for k, v in values.items() if "," in k and "_stderr" not in k and _number(v)]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def metric_name(task: str, result_key: str) -> str:
    """lm-eval's `acc,none` of a task as `general/lm_eval/<task>/acc`; a filter other than
    `none` is a further level (`exact_match/strict-match`). MLflow takes letters, digits and
    _-. /: anything else becomes _."""
    metric, _, filter_name = result_key.partition(",")
    return safe_name(f"{PREFIX}/{task}/{metric}" + ("" if filter_name in ("", "none") else f"/{filter_name}"))


def safe_name(name: str) -> str:
    return re.sub(r"[^\w\-. /]", "_", name)


def lm_eval_metrics(results: dict[str, dict]) -> dict[str, float]:
    """Every number lm-eval reports (each task's and group's metrics and standard errors)."""
    return {metric_name(task, key): float(value) for task, values in results.items()
            for key, value in values.items() if "," in key and _number(value)}


def lm_eval_retention(record: dict, after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """Per configured task: after / before of its primary metric (before / after where lower is
    better), the mean over its rows for a tag; and the mean over the tasks. NaN where the base
    model scored 0 (nothing to retain)."""
    retention = {}
    for name, primary in record["primary"].items():
        ratios = []
        for row, metric in primary.items():
            lower_better = record["higher_is_better"].get(row, {}).get(metric.split("/")[3]) is False
            new, old = after[metric], before.get(metric, math.nan)
            ratios.append((old / new if new > 0 else math.nan) if lower_better else (new / old if old > 0 else math.nan))
        retention[safe_name(f"{PREFIX}/{name}/retention")] = sum(ratios) / len(ratios)
    retention[f"{PREFIX}/retention"] = sum(retention.values()) / len(retention)
    return retention


def headline_metrics(evaluation: Any) -> list[str]:
    """An evaluation's (Manifest's) lm-eval metrics worth a row in a summary: each configured
    task's primary metric and retention, and the mean retention."""
    if "lm_eval" not in evaluation.outputs:
        return []
    record = json.loads(evaluation.path("lm_eval").read_text())
    names = [m for primary in record["primary"].values() for m in primary.values()]
    names += [safe_name(f"{PREFIX}/{task}/retention") for task in record["primary"]] + [f"{PREFIX}/retention"]
    return [m for m in names if m in evaluation.metrics]
