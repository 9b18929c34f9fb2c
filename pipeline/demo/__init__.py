"""The embedded demo world: its tasks, tokenizer and model, built without a model hub."""
