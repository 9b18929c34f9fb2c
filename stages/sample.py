"""Stage `sample`: n completions per training prompt from the SFT model, the raw material of
on-policy preference pairs. Kept with the sampling settings and each prompt's reference
answer, so pairs (or any other score) can be built again without sampling again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config.schema import PipelineConfig
from pipeline.results.manifest import Manifest
from pipeline.runtime.contract import Stage
from pipeline.runtime.process import stage_main


def settings(cfg: PipelineConfig) -> dict[str, Any]:
    return {"sampling": cfg.pairs.sampling(cfg.sampling).key_settings(), "max_prompts": cfg.pairs.max_prompts,
            **cfg.model.key_settings(training=False)}


def run(cfg: PipelineConfig, out: Path, model: Path) -> Manifest:
    """`model`: the SFT model's folder."""
    from pipeline.data.sources import TRAIN_PROMPT_FIELDS, load_rows, prompt_and_answer, scored_fields, write_jsonl
    from pipeline.models.loading import rendered_prompts
    from pipeline.sampling.sampler import sample

    source = cfg.pair_prompts
    rows = [prompt_and_answer(row, source.answer_pattern, f"{source.name} row {i + 1}")
            for i, row in enumerate(load_rows(source, scored_fields(source, TRAIN_PROMPT_FIELDS)))]
    rows = rows[: cfg.pairs.max_prompts]
    settings = cfg.pairs.sampling(cfg.sampling)
    names = [f"{source.name} row {i + 1}" for i in range(len(rows))]
    prompts = rendered_prompts([r["prompt"] for r in rows], model, cfg.model)
    completions = sample(model, prompts, settings, cfg.model.tokenizer, names, cfg.model.trust_remote_code)
    sampled_with = settings.key_settings()  # what decides the samples: not the devices, not a warm engine
    samples = [{"id": row.get("id", str(i)), **row, "completions": texts, "sampling": sampled_with}
               for i, (row, texts) in enumerate(zip(rows, completions, strict=True))]
    write_jsonl(out / "samples.jsonl", samples)
    return Manifest("sample", out.name, {"samples": "samples.jsonl"})


STAGE = Stage("sample", run, settings, data=lambda cfg: {"prompts": cfg.pair_prompts},
              preload=("pipeline.sampling.sampler",  # and what transformers imports at the first Auto class
                       "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto"),
              system_metrics=True, samples=True)

if __name__ == "__main__":
    stage_main(STAGE)
