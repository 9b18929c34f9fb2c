"""The whole pipeline: demo data → pretrain (demo only) → SFT → evaluate base and SFT models.

Only wiring. Each stage is a method that first asks for its upstream stages, so asking for
one stage builds just what it needs. A stage's key is a digest of its effective settings
and of its inputs' keys or digests; a stage whose folder holds a manifest under that key
is reused, not run again.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, DataConfig, DataSource, PipelineConfig
from pipeline.data import source_digest
from pipeline.manifest import Manifest, digest, stage_key
from pipeline.stage import run_in_process

STAGES = ("demo_data", "pretrain", "evaluate_base", "sft", "evaluate_sft")


@dataclass
class StageResult:
    name: str
    manifest: Manifest
    cached: bool


@dataclass
class PipelineRun:
    cfg: PipelineConfig
    force: set[str] = field(default_factory=set)
    results: list[StageResult] = field(default_factory=list)

    def run_stage(self, name: str, module: str, cfg: PipelineConfig, settings: Any, inputs: dict[str, str],
                  **paths: Path) -> Manifest:
        """Run one stage in its own process, or reuse its result if its key matches."""
        key = stage_key(module, settings, inputs)
        out = self.cfg.results_dir / module / key
        manifest = Manifest.find(out)
        cached = manifest is not None and name not in self.force
        if cached:
            print(f"[{name}] cached: {out}", flush=True)
        else:
            if manifest is not None:  # forced: start from scratch, not from its checkpoints
                shutil.rmtree(out)
            print(f"[{name}] running: {out}", flush=True)
            manifest = run_in_process(module, cfg, out, inputs, **paths)
        self.results.append(StageResult(name, manifest, cached))
        return manifest

    @cached_property
    def demo_data(self) -> Manifest:
        return self.run_stage("demo_data", "demo_data", self.cfg, {"seed": self.cfg.seed, "demo": self.cfg.demo.model_dump()}, {})

    @cached_property
    def data(self) -> DataConfig:
        """The data sets, with the demo world's generated ones where the user gave none."""
        if not self.cfg.is_demo:
            return self.cfg.data
        world = self.demo_data
        generated = {
            "sft": DataSource(path=str(world.path("domain_train"))),
            "target_eval": DataSource(path=str(world.path("domain_test"))),
            "general_eval": DataSource(path=str(world.path("general_test"))),
        }
        return DataConfig(**{k: getattr(self.cfg.data, k) or v for k, v in generated.items()})

    @cached_property
    def stage_cfg(self) -> PipelineConfig:
        """The effective config the stages see: data and tokenizer filled in."""
        tokenizer = self.cfg.model.tokenizer
        if tokenizer is None and self.cfg.is_demo:
            tokenizer = str(self.demo_data.path("tokenizer"))
        model = self.cfg.model.model_copy(update={"tokenizer": tokenizer})
        return self.cfg.model_copy(update={"data": self.data, "model": model})

    @cached_property
    def pretrain(self) -> Manifest:
        settings = {"seed": self.cfg.seed, "demo": self.cfg.demo.model_dump(), "trainer": self.cfg.pretrain.trainer}
        world = self.demo_data
        return self.run_stage("pretrain", "pretrain", self.cfg, settings, {"data": world.key}, data=world.folder)

    @cached_property
    def base_model(self) -> tuple[Path, str]:
        """The starting model's folder and identity (the pretrain key, or a digest of the user's model)."""
        if self.cfg.is_demo:
            return self.pretrain.path("model"), self.pretrain.key
        path = Path(self.cfg.model.path)
        return path, digest(path) if path.exists() else f"hub:{self.cfg.model.path}"

    @cached_property
    def sft(self) -> Manifest:
        model, model_id = self.base_model
        settings = {"seed": self.cfg.seed, "sft": self.cfg.sft.model_dump(), "data": source_digest(self.data.sft)}
        inputs = {"model": model_id, "tokenizer": str(self.stage_cfg.model.tokenizer)}
        return self.run_stage("sft", "sft", self.stage_cfg, settings, inputs, model=model)

    def evaluate(self, name: str, model: Path, model_id: str, baseline: Manifest | None = None) -> Manifest:
        settings = {
            "sampling": self.cfg.sampling.model_dump(),
            "evaluate": self.cfg.evaluate.model_dump(),
            "target": source_digest(self.data.target_eval),
            "general": source_digest(self.data.general_eval),
            "tokenizer": str(self.stage_cfg.model.tokenizer),
        }
        inputs = {"model": model_id} | ({"baseline": baseline.key} if baseline else {})
        paths = {"baseline": baseline.folder} if baseline else {}
        return self.run_stage(name, "evaluate", self.stage_cfg, settings, inputs, model=model, **paths)

    @cached_property
    def evaluate_base(self) -> Manifest:
        return self.evaluate("evaluate_base", *self.base_model)

    @cached_property
    def evaluate_sft(self) -> Manifest:
        return self.evaluate("evaluate_sft", self.sft.path("model"), self.sft.key, baseline=self.evaluate_base)


def run_pipeline(cfg: PipelineConfig, force: set[str] = frozenset(), stage: str | None = None) -> list[StageResult]:
    """Run the whole pipeline, or only `stage` and what it needs; `force` re-runs stages by name."""
    stages = STAGES if cfg.is_demo else STAGES[2:]
    for name in ([stage] if stage else []) + sorted(force):
        if name not in stages:
            raise ConfigError(f"unknown stage '{name}'; the stages of this pipeline are: {', '.join(stages)}")
    run = PipelineRun(cfg, set(force))
    for name in [stage] if stage else stages:
        getattr(run, name)
    return run.results
