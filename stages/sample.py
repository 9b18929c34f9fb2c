"""Stage `sample`: n completions per training prompt from the SFT model, the raw material of
on-policy preference pairs. Kept with the sampling settings and each prompt's reference
answer, so pairs (or any other score) can be built again without sampling again."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.data import TRAIN_PROMPT_FIELDS, load_rows, prompt_and_answer, scored_fields, write_jsonl
from pipeline.manifest import Manifest
from pipeline.sampling import sample
from pipeline.stage import stage_main


def run(cfg: PipelineConfig, out: Path, model: Path) -> Manifest:
    rows = [prompt_and_answer(row) for row in load_rows(cfg.pair_prompts, scored_fields(cfg.pair_prompts, TRAIN_PROMPT_FIELDS))]
    rows = rows[: cfg.pairs.max_prompts]
    settings = cfg.pairs.sampling(cfg.sampling)
    source = cfg.pair_prompts
    names = [f"{source.name} row {i + 1}" for i in range(len(rows))]
    completions = sample(model, [r["prompt"] for r in rows], settings, cfg.model.tokenizer, names)
    samples = [{"id": row.get("id", str(i)), **row, "completions": texts, "sampling": settings.model_dump()}
               for i, (row, texts) in enumerate(zip(rows, completions, strict=True))]
    write_jsonl(out / "samples.jsonl", samples)
    return Manifest("sample", out.name, {"samples": "samples.jsonl"})


if __name__ == "__main__":
    stage_main(run)
