"""Stage `demo_data`: the demo world's tokenizer and generated data: train, validation and test
splits of the general and the domain tasks, and the SFT data (the domain's train split with
general replay)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config.schema import PipelineConfig
from pipeline.results.manifest import Manifest
from pipeline.runtime.contract import Stage
from pipeline.runtime.process import stage_main


def settings(cfg: PipelineConfig) -> dict[str, Any]:
    return {"seed": cfg.seed, "demo": cfg.demo.world_settings()}


def run(cfg: PipelineConfig, out: Path) -> Manifest:
    from pipeline.data.sources import write_jsonl
    from pipeline.demo.tasks import make_splits
    from pipeline.demo.world import SYSTEM_PROMPT, build_bpe_tokenizer, build_tokenizer, chat_prompt, worked_answer

    demo = cfg.demo
    chat = demo.world == "chat"
    splits = make_splits(cfg.seed, demo.train_examples, demo.domain_train_examples, demo.test_examples,
                         demo.val_examples, demo.general_replay)
    outputs = {"tokenizer": "tokenizer"}
    for name, rows in splits.items():
        if name.endswith(("_test", "_val")):  # evaluation rows: an id and the reference answer
            rows = [{"id": f"{name}-{i}", "task": r["task"], "prompt": chat_prompt(r) if chat else r["prompt"],
                     "answer": r["completion"]} for i, r in enumerate(rows)]
        elif chat:
            rows = [{"task": r["task"], "prompt": chat_prompt(r),
                     "completion": [{"role": "assistant", "content": worked_answer(r)}]} for r in rows]
        write_jsonl(out / f"{name}.jsonl", rows)
        outputs[name] = f"{name}.jsonl"
    if chat:  # trained on every turn of every split, roles included: no word of the world is unknown to it
        examples = [r for rows in splits.values() for r in rows]
        tokenizer = build_bpe_tokenizer([turn for r in examples for turn in (
            f"system\n{SYSTEM_PROMPT}", f"user\n{r['prompt']}", f"assistant\n{worked_answer(r)}")])
    else:
        tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out / "tokenizer")
    return Manifest("demo_data", out.name, outputs)


STAGE = Stage("demo_data", run, settings, preload=("pipeline.demo.world", "pipeline.demo.tasks"))

if __name__ == "__main__":
    stage_main(STAGE)
