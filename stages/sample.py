"""Stage `sample`: n completions per prompt, kept with the sampling settings, so any score
(Pass@K, another verifier) can be computed later without sampling again."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.data import read_jsonl, write_jsonl
from pipeline.manifest import Manifest
from pipeline.sampling import sample
from pipeline.stage import stage_main


def run(cfg: PipelineConfig, out: Path, model: Path, prompts: Path) -> Manifest:
    """`prompts`: JSONL rows with a `prompt` (text or chat messages), an optional `id`, and any
    other fields (an answer, a task), which are kept."""
    rows = read_jsonl(prompts, [{"prompt"}])
    completions = sample(model, [r["prompt"] for r in rows], cfg.sampling, cfg.model.tokenizer)
    settings = cfg.sampling.model_dump()
    samples = [{"id": row.get("id", str(i)), **row, "completions": texts, "sampling": settings}
               for i, (row, texts) in enumerate(zip(rows, completions, strict=True))]
    write_jsonl(out / "samples.jsonl", samples)
    return Manifest("sample", out.name, {"samples": "samples.jsonl"})


if __name__ == "__main__":
    stage_main(run)
