"""Sampling completions, with vLLM or transformers' generate, on one device or several."""
