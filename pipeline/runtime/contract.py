"""The stage contract: what makes a stage a stage, declared once, in its own module.

A stage module (`stages/<name>.py`) holds a plain `run(cfg, out, **inputs) -> Manifest` and a
`STAGE = Stage(...)` that says what its result's key depends on: its settings (a function of
the config) and the data sets it reads. Its inputs are `run`'s keyword parameters: paths, each
handed over with the digest of its content, so a key follows what an upstream stage produced,
not how it was asked for. The runtime (pipeline.orchestration.runner) computes keys and runs stages; the
flows only say which result feeds which input.

Light by design: `posttrain status` reads every declaration without importing torch, so a
stage imports its heavy modules inside `run` and names them in `preload` for the fork server.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config.schema import DataSource, PipelineConfig
from pipeline.results.manifest import Manifest, digest


def no_data(cfg: PipelineConfig) -> dict[str, DataSource]:
    return {}


@dataclass(frozen=True)
class Stage:
    name: str  # the module `stages.<name>`
    run: Callable[..., Manifest]  # run(cfg, out, **inputs): the inputs are its keyword parameters
    settings: Callable[[PipelineConfig], dict[str, Any]]  # what its key depends on, besides inputs and data
    data: Callable[[PipelineConfig], dict[str, DataSource]] = no_data  # the data sets it reads, by context
    input_data: dict[str, str] = field(default_factory=dict)  # inputs that are data sets (an upstream's): context
    trains: bool = False  # a training stage: several processes (`launch`) start through accelerate
    preload: tuple[str, ...] = ()  # the modules its `run` imports: the fork server imports them once
    system_metrics: bool = False  # MLflow's system metrics (CPU, memory, GPU) in its run: a stage that runs a model
    samples: bool = False  # it samples with `sampling` settings: with vLLM, through the run's warm engine
    # Where a stage samples and then scores: the settings its saved samples depend on. A result
    # whose samples match is re-scored from them (input `samples`) instead of sampling again.
    samples_settings: Callable[[PipelineConfig], dict[str, Any]] | None = None
    scoring_inputs: tuple[str, ...] = ()  # inputs that change the scores only, not the samples
    # Raised when the stage's code changes what it makes from the same settings and inputs, so
    # that results made before are not reused (and their samples not re-scored).
    version: int = 1
    inputs: dict[str, bool] = field(init=False)  # name -> required

    def __post_init__(self) -> None:
        params = list(inspect.signature(self.run).parameters.values())[2:]  # after cfg and out
        object.__setattr__(self, "inputs", {p.name: p.default is inspect.Parameter.empty for p in params})

    @property
    def module(self) -> str:
        return f"stages.{self.name}"

    def check_inputs(self, given: dict[str, Any]) -> None:
        """The wiring must hand over exactly the inputs `run` takes: a flow's mistake, caught before any work."""
        unknown = sorted(set(given) - set(self.inputs))
        missing = sorted(n for n, required in self.inputs.items() if required and n not in given)
        if unknown or missing:
            raise TypeError(f"stage '{self.name}': inputs {unknown} are not parameters of its run, "
                            f"and {missing} are missing" if unknown else f"stage '{self.name}': inputs {missing} "
                            "are missing")


@dataclass(frozen=True)
class Input:
    """A path a stage reads, with the digest of its content: what the reading stage's key depends on."""

    path: Path
    digest: str
    made_by: Manifest | None = None  # the upstream result it comes from (lineage); None: given by the user

    @classmethod
    def output(cls, manifest: Manifest, name: str) -> Input:
        """One output of an upstream result, by the digest its manifest recorded."""
        return cls(manifest.path(name), manifest.digests[name], manifest)

    @classmethod
    def model(cls, path_or_hub_id: str) -> Input:
        """A model the config names: a local folder by its files' digest, else a hub id as is."""
        path = Path(path_or_hub_id)
        return cls(path, digest(path) if path.exists() else f"hub:{path_or_hub_id}")

    @classmethod
    def metrics(cls, manifest: Manifest) -> Input:
        """An upstream result read for its metrics (an evaluation as a baseline): its folder, by
        its metrics' digest. (Not its files': lm-eval's record its timings.)"""
        payload = json.dumps(manifest.metrics, sort_keys=True)
        return cls(manifest.folder, hashlib.sha256(payload.encode()).hexdigest(), manifest)
