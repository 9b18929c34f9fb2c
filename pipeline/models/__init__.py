"""Loading a model and its tokenizer as the stages use them: dtype, attention, LoRA/QLoRA, chat templates."""
