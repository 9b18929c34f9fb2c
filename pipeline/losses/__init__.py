"""Token-level SFT losses: ce, dft, eaft, masked, eksft, gem (definitions: shared/notes/methods.md).

A loss is computed in two steps:
1. `TokenStats` (stats.py) of each valid next-token position: log p(y), the entropy, and what
   the loss needs besides (top-K entropy, KL to the reference, GEM's term). They come from the
   float32 logits all at once, or straight from the hidden states projected to the vocabulary a
   chunk of tokens at a time (chunked.py), so that the [tokens x vocab] logits never exist whole;
2. the loss (functions.py), pure math on those [N] vectors: Σ(per-token loss) / n.

params.py holds each loss's parameters (pydantic, no torch: a config is checked without it);
token_loss.py the loss the trainer calls, from logits or from the hidden states and the head.
"""
