"""`posttrain init`: a commented starter config for a model and a data set, the data set's
columns mapped to the fields the stages read where their names say what they hold."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.config.schema import ConfigError, file_format

# Column names that commonly hold each field (GSM8K, Alpaca, MetaMathQA, UltraChat, HH-RLHF, ...),
# in the order they are tried.
COLUMN_NAMES = {
    "messages": ("messages", "conversations", "conversation", "chat"),
    "prompt": ("prompt", "question", "instruction", "query", "problem", "input"),
    "completion": ("completion", "answer", "response", "output", "solution", "target"),
    "chosen": ("chosen",),
    "rejected": ("rejected",),
}
GSM8K_PATTERN = "####\\s*(.+)"


def first_rows(data: str, subset: str | None) -> dict[str, dict]:
    """The first row of each split of a local file, a local data set folder or a hub data set,
    read as a stream (a hub data set is not downloaded whole)."""
    from datasets import load_dataset

    kind = file_format(data)
    try:
        if kind is not None:
            splits = load_dataset(kind.replace("jsonl", "json"), data_files=data, streaming=True)
        else:
            splits = load_dataset(data, subset, streaming=True)
        return {name: next(iter(split)) for name, split in splits.items()}
    except (OSError, ValueError, StopIteration) as error:  # not there, offline, no such subset, empty
        raise ConfigError(f"{data}: cannot read it here: {str(error).splitlines()[0] if str(error) else 'empty'}") \
            from None


def mapped_columns(row: dict) -> dict[str, str]:
    """Field -> column, for the fields whose usual column names the row has. A chat column counts
    only with TRL's role/content messages (ShareGPT's from/value are not)."""
    found = {field: next((c for c in names if c in row), None) for field, names in COLUMN_NAMES.items()}
    chat = row.get(found["messages"]) if found["messages"] else None
    if not (isinstance(chat, list) and chat and isinstance(chat[0], dict) and "role" in chat[0]):
        found["messages"] = None
    return {field: column for field, column in found.items() if column is not None}


def scalar(value: str) -> str:
    """A value as YAML reads it back: as typed where it can be, else quoted (a path with `: `)."""
    try:
        plain = yaml.safe_load(f"x: {value}") == {"x": value} and not any(c in value for c in ",{}[]")
    except yaml.YAMLError:
        plain = False
    return value if plain else json.dumps(value)


def source_yaml(data: str, subset: str | None, split: str, columns: dict[str, str], extra: str = "") -> str:
    where = f"path: {scalar(data)}" if file_format(data) else \
        f"hub: {scalar(data)}" + (f", subset: {scalar(subset)}" if subset else "")
    renamed = {f: c for f, c in columns.items() if f != c}
    mapping = f", columns: {{{', '.join(f'{f}: {scalar(c)}' for f, c in renamed.items())}}}" if renamed else ""
    return f"{{{where}, split: {scalar(split)}{mapping}{extra}}}"


def starter_config(path: Path, model: str, data: str, subset: str | None = None) -> str:
    """The YAML text of a starter config; raises ConfigError when the data set's columns hold no
    field set a stage reads."""
    rows = first_rows(data, subset)
    train = "train" if "train" in rows else next(iter(rows))
    test = next((s for s in ("test", "validation", "valid", "dev") if s in rows), None)
    columns = mapped_columns(rows[train])
    sample = rows[train]
    todo = []
    if "messages" in columns:
        sft = source_yaml(data, subset, train, {"messages": columns["messages"]})
        eval_columns, pattern = None, ""
    elif {"prompt", "completion"} <= columns.keys():
        gsm8k = "####" in str(sample[columns["completion"]])  # worked solutions ending in `#### 72`
        pattern = f", answer_pattern: '{GSM8K_PATTERN}', verifier: math" if gsm8k else ""
        sft = source_yaml(data, subset, train, {"prompt": columns["prompt"], "completion": columns["completion"]},
                          pattern)
        eval_columns = {"prompt": columns["prompt"], "answer": columns["completion"]}
    else:
        raise ConfigError(f"{data}: its columns ({', '.join(sample)}) hold no prompt/completion or messages that "
                         "posttrain recognises: write the config by hand, mapping them with `columns` "
                         "(docs/pipeline.md, Data sets)")
    lines = [
        f"# A starter config made by `posttrain init` for {model} and {data}. Check it, then:",
        f"#   posttrain validate {path}    and    posttrain run {path}",
        "# Every key: docs/pipeline.md. Settings can be changed on the command line: key=value.",
        f"name: {scalar(path.stem)}",
        "seed: 0",
        "results_dir: results",
        "",
        "model:",
        f"  path: {scalar(model)}            # a local folder or a hub id",
        "  dtype: auto                     # bfloat16 on a GPU",
        "  # chat_template: chatml         # for chat data, if the tokenizer has no template of its own",
        "",
        "data:",
        f"  sft: {sft}",
    ]
    if eval_columns is None:
        todo.append("data.target_eval")
        lines.append("  target_eval: {path: target_eval.jsonl}    # TODO: prompt/answer rows of the skill SFT teaches")
    elif test is None:
        todo.append("data.target_eval")
        lines += [f"  # TODO: {data} has no test split: this evaluates on the training prompts; give held-out ones",
                  f"  target_eval: {source_yaml(data, subset, train, eval_columns, pattern)}"]
    else:
        lines.append(f"  target_eval: {source_yaml(data, subset, test, eval_columns, pattern)}")
    todo.append("data.general_eval")
    lines += [
        "  general_eval: {path: general_eval.jsonl}  # TODO: prompt/answer rows of what the model must not forget",
        "",
        "sft:",
        "  loss: {name: eksft, ratio: 0.2}  # ce | dft | eaft | masked | eksft | gem (docs/losses.md)",
        "  reference: cached               # EKSFT's reference as top-K log-probs, not a second model",
        "  # lora: {r: 16, lora_alpha: 32}  # adapters instead of full fine-tuning; load_in_4bit: true for QLoRA",
        "  trainer: {num_train_epochs: 1, per_device_train_batch_size: 8, learning_rate: 1.0e-5, "
        "lr_scheduler_type: cosine, max_length: 1024}  # any option of TRL's SFTConfig",
        "",
        "pairs: {n: 8, temperature: 1.0}   # on-policy DPO pairs from the SFT model's samples",
        "dpo:",
        "  trainer: {beta: 0.1, num_train_epochs: 1, per_device_train_batch_size: 4, learning_rate: 5.0e-7}"
        "  # any option of TRL's DPOConfig",
        "",
        "sampling: {backend: vllm, n: 32, temperature: 0.7, max_tokens: 512}",
        "evaluate: {ks: [1, 8, 32]}",
        "",
    ]
    lines[2:2] = [f"# To fill in before it validates: {', '.join(todo)}."]
    return "\n".join(lines)


def write_starter(path: Path, model: str, data: str, subset: str | None = None) -> str:
    """Write the starter config to `path` (never over a file); its text."""
    if path.exists():
        raise ConfigError(f"{path} exists: give another --out, or remove it")
    text = starter_config(path, model, data, subset)
    path.write_text(text)
    return text
