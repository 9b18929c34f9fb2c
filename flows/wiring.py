"""The pipeline's wiring: which result feeds which input of which stage, and what `status`
sees. Each stage is a property that first asks for its upstream stages, so asking for one stage
builds just what it needs. Keys, reuse, the results store, MLflow and the stage's process are
the runtime's (pipeline.orchestration.runner); what a stage's key depends on is its own module's (`STAGE` in
stages/<name>.py); the Prefect flow that runs the stages is flows/pipeline_flow.py. This module
imports neither Prefect nor MLflow, so that `posttrain status` answers at once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from pipeline.config.schema import ConfigError, DataConfig, DataSource, PipelineConfig
from pipeline.orchestration.runner import NotBuilt, Planned, StageRunner, StageStatus
from pipeline.results.manifest import Manifest
from pipeline.runtime.contract import Input
from stages import demo_data, dpo, evaluate, pairs, pretrain, reference, sample, sft

STAGES = ("demo_data", "pretrain", "evaluate_base", "reference", "sft", "evaluate_sft", "sample", "pairs", "dpo", "evaluate_dpo")
DEMO_STAGES = ("demo_data", "pretrain")
ON_POLICY_STAGES = ("sample", "pairs")  # not run when the config gives data.preference
MODULES = (demo_data, pretrain, evaluate, reference, sft, sample, pairs, dpo)


class cached_property(functools.cached_property):  # noqa: N801 - functools' name, for what it is
    """functools.cached_property without the lock Python 3.11 takes around its getter, one lock
    per property shared by every instance: a compare's pipelines side by side would each wait
    for the others' stages of the same name. (Python 3.12 dropped that lock.)"""

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        if self.attrname not in instance.__dict__:
            instance.__dict__[self.attrname] = self.func(instance)
        return instance.__dict__[self.attrname]


class PipelineRun:
    """The stages of one pipeline, wired: each property is a stage's result (a Manifest). A stage
    is handed to `submit` (the flow's: a Prefect task run that runs or reuses it); without one,
    its existing result is checked and nothing runs (`status`)."""

    def __init__(self, cfg: PipelineConfig, runner: StageRunner,
                 submit: Callable[[str, Planned], Manifest] | None = None):
        self.cfg, self.runner, self.submit = cfg, runner, submit

    def stage(self, name: str, module, inputs: dict[str, Input], cfg: PipelineConfig | None = None) -> Manifest:
        planned = self.runner.plan(name, module.STAGE, cfg or self.stage_cfg, inputs)
        return self.runner.check(planned) if self.submit is None else self.submit(name, planned)

    @cached_property
    def demo_data(self) -> Manifest:
        return self.stage("demo_data", demo_data, {}, self.cfg)

    @cached_property
    def data(self) -> DataConfig:
        """The data sets, with the demo world's generated ones where the user gave none."""
        if not self.cfg.is_demo:
            return self.cfg.data
        world, verifier = self.demo_data, self.cfg.demo.verifier
        generated = {
            "sft": DataSource(path=str(world.path("sft_train")), verifier=verifier),
            "target_eval": DataSource(path=str(world.path("domain_test")), verifier=verifier),
            "general_eval": DataSource(path=str(world.path("general_test")), verifier=verifier),
        }
        if self.cfg.demo.val_examples:
            generated |= {"target_val": DataSource(path=str(world.path("domain_val")), verifier=verifier),
                          "general_val": DataSource(path=str(world.path("general_val")), verifier=verifier)}
        return self.cfg.data.model_copy(update={k: getattr(self.cfg.data, k) or v for k, v in generated.items()})

    @cached_property
    def stage_cfg(self) -> PipelineConfig:
        """The effective config the stages see: the data filled in. (The demo's tokenizer
        needs no filling: the pretrained model's folder holds it.)"""
        return self.cfg.model_copy(update={"data": self.data})

    @cached_property
    def pretrain(self) -> Manifest:
        world = self.demo_data
        return self.stage("pretrain", pretrain, {"tokenizer": Input.output(world, "tokenizer"),
                                                 "train": Input.output(world, "general_train")}, self.cfg)

    @cached_property
    def base_model(self) -> Input:
        """The starting model: the demo's pretrained one, or the config's folder or hub id."""
        return Input.output(self.pretrain, "model") if self.cfg.is_demo else Input.model(self.cfg.model.path)

    @cached_property
    def reference(self) -> Manifest:
        return self.stage("reference", reference, {"model": self.base_model})

    @cached_property
    def sft(self) -> Manifest:
        cached = {"reference": Input.output(self.reference, "topk")} if self.cfg.sft.cached_reference() else {}
        return self.stage("sft", sft, {"model": self.base_model, **cached})

    @cached_property
    def evaluate_base(self) -> Manifest:
        return self.stage("evaluate_base", evaluate, {"model": self.base_model})

    @cached_property
    def evaluate_sft(self) -> Manifest:
        return self.stage("evaluate_sft", evaluate, {"model": Input.output(self.sft, "model"),
                                                     "baseline": Input.metrics(self.evaluate_base)})

    @cached_property
    def sample(self) -> Manifest:
        return self.stage("sample", sample, {"model": Input.output(self.sft, "model")})

    @cached_property
    def pairs(self) -> Manifest:
        return self.stage("pairs", pairs, {"samples": Input.output(self.sample, "samples")})

    @cached_property
    def dpo(self) -> Manifest:
        on_policy = {"pairs": Input.output(self.pairs, "pairs")} if self.data.preference is None else {}
        return self.stage("dpo", dpo, {"model": Input.output(self.sft, "model"), **on_policy})

    @cached_property
    def evaluate_dpo(self) -> Manifest:
        return self.stage("evaluate_dpo", evaluate, {"model": Input.output(self.dpo, "model"),
                                                     "baseline": Input.metrics(self.evaluate_base)})


def pipeline_stages(cfg: PipelineConfig, *named: str) -> tuple[str, ...]:
    """The stages of this pipeline (no demo stages for a real model, no on-policy pairs for
    given preference data); named ones must be among them."""
    left_out = ((() if cfg.is_demo else DEMO_STAGES) + (() if cfg.data.preference is None else ON_POLICY_STAGES)
                + (() if cfg.sft.cached_reference() else ("reference",)))
    stages = tuple(name for name in STAGES if name not in left_out)
    for name in named:
        if name not in stages:
            raise ConfigError(f"unknown stage '{name}'; the stages of this pipeline are: {', '.join(stages)}")
    return stages


def pipeline_status(cfg: PipelineConfig) -> list[StageStatus]:
    """Each stage: done, stale (and what changed), missing, or waiting on the upstream stage that
    is not built (a key follows its inputs' content, so it is known once they are)."""
    runner = StageRunner(cfg, tracker=None)
    run = PipelineRun(cfg, runner)
    waiting = {}
    for name in pipeline_stages(cfg):
        try:
            getattr(run, name)
        except NotBuilt as error:
            waiting[name] = error.name
    return [runner.statuses.get(name) or StageStatus(name, "waiting", "(not yet known)", None, f"on {waiting[name]}")
            for name in pipeline_stages(cfg)]
