"""Stage `reference`: the starting model's top-K log-probs at every SFT loss token, computed
once, so that EKSFT with `sft.reference: cached` trains without the reference model in memory."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import PipelineConfig
from pipeline.data import SFT_FIELDS, load_rows
from pipeline.manifest import Manifest
from pipeline.stage import stage_main
from pipeline.training import cache_reference_topk


def run(cfg: PipelineConfig, out: Path, model: Path) -> Manifest:
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or model)
    reference = AutoModelForCausalLM.from_pretrained(model, dtype="auto")
    dataset = load_rows(cfg.data.sft, SFT_FIELDS)
    metrics = cache_reference_topk(reference, tokenizer, dataset, cfg.sft.trainer, cfg.seed, cfg.sft.reference_topk,
                                   out / "topk")
    return Manifest("reference", out.name, {"topk": "topk"}, metrics=metrics)


if __name__ == "__main__":
    stage_main(run)
