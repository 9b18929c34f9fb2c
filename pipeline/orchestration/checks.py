"""What a run reads, checked before any stage runs, so that bad input fails in a second with the
key at fault rather than after the first stage's minutes."""

from __future__ import annotations

from pipeline.config.schema import EVAL_SUITES, PipelineConfig
from pipeline.data.hub import check_hub_models, check_tokenizer
from pipeline.data.sources import (EVAL_FIELDS, PREFERENCE_FIELDS, SFT_FIELDS, TRAIN_PROMPT_FIELDS, DataError,
                                   checked_rows, hub_data_readable, scored_fields, source_rows)
from pipeline.evaluation.lm_eval_suite import check_lm_eval
from pipeline.models.loading import check_quantization


def check_inputs(cfg: PipelineConfig) -> None:
    """Everything a run reads, checked before any stage runs: every data set of the config, row by
    row (a hub data set where it is cached or the hub is reachable: `datasets` keeps what it reads
    for the run); the models and tokenizer named by hub id; the tokenizer, with a chat template
    where the data holds chats; the lm-eval tasks' names and that their data can be read; QLoRA's
    GPU."""
    sources = [("sft", SFT_FIELDS), ("preference", PREFERENCE_FIELDS)]
    sources += [(key, EVAL_FIELDS) for key in EVAL_SUITES.values()]
    checked = [(f"data.{key}", getattr(cfg.data, key), fields) for key, fields in sources]
    checked.append(("pairs.prompts", cfg.pairs.prompts, TRAIN_PROMPT_FIELDS))
    chats: set[str] = set()  # the keys of the data sets that hold chats
    for key, source, fields in checked:
        if source is None or (source.hub is not None and not hub_data_readable(source.hub)):
            continue
        try:
            for row in checked_rows(source_rows(source), scored_fields(source, fields), source.columns,
                                    source.answer_pattern):
                if "messages" in row or not isinstance(row.get("prompt", ""), str):
                    chats.add(key)
        except DataError as error:
            raise DataError(f"{key}: {error}") from None
    check_hub_models(cfg)
    check_tokenizer(cfg, bool(chats))
    # The demo world writes its general suite later, in chats where it is the chat world.
    demo_chats = cfg.is_demo and cfg.data.general_eval is None and cfg.demo.world == "chat"
    check_lm_eval(cfg, "data.general_eval" in chats or demo_chats)
    check_quantization(cfg)
