"""Stage `pairs`: score the SFT model's samples with the task's verifier and pair a correct
with an incorrect completion of the same prompt; the pairs file and its statistics are the
output, so DPO can be run again on the same pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config.schema import PipelineConfig
from pipeline.results.manifest import Manifest
from pipeline.runtime.contract import Stage
from pipeline.runtime.process import stage_main


def settings(cfg: PipelineConfig) -> dict[str, Any]:
    settings = {"seed": cfg.seed, "pairs_per_prompt": cfg.pairs.pairs_per_prompt, "verifier": cfg.pair_prompts.verifier}
    if cfg.pair_prompts.verifier == "code":  # what a program may do and for how long decides what passes
        settings["code"] = cfg.evaluate.model_dump(include={"allow_untrusted_code", "code_timeout_s"})
    return settings | ({"reference_chosen": True} if cfg.pairs.reference_chosen else {})


def run(cfg: PipelineConfig, out: Path, samples: Path) -> Manifest:
    """`samples`: the `sample` stage's file of completions."""
    from pipeline.data.sources import read_jsonl, reference, write_jsonl
    from pipeline.evaluation.metrics import pass_at_k_table, sample_counts
    from pipeline.evaluation.verifiers import get_verifier
    from pipeline.training.preferences import build_pairs

    verify = get_verifier(cfg.pair_prompts.verifier, **cfg.evaluate.verifier_options())
    rows = read_jsonl(samples, [{"prompt", "answer", "completions"}, {"prompt", "test", "entry_point", "completions"}])
    for row in rows:
        row["correct"] = [verify(c, reference(row)) for c in row["completions"]]
    pairs, stats = build_pairs(rows, cfg.pairs.pairs_per_prompt, cfg.seed, cfg.pairs.reference_chosen)
    if not pairs:
        raise ValueError(
            f"no preference pairs: of {stats.prompts} prompts, {stats.prompts_all_correct} had only correct and "
            f"{stats.prompts_all_wrong} only wrong completions; sample more (pairs.n) or at a higher "
            "pairs.temperature, set pairs.reference_chosen, or give data.preference"
        )
    write_jsonl(out / "pairs.jsonl", pairs)
    metrics = stats.as_metrics() | {"pairs/train_pass_at_1": pass_at_k_table(sample_counts(rows), [1])[1]}
    return Manifest("pairs", out.name, {"pairs": "pairs.jsonl"}, metrics=metrics)


STAGE = Stage("pairs", run, settings,
              preload=("pipeline.data.sources", "pipeline.evaluation.verifiers", "pipeline.training.preferences"))

if __name__ == "__main__":
    stage_main(STAGE)
