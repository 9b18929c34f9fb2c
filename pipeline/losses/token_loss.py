"""A token-level SFT loss as the trainer calls it: from the logits, or from the hidden states and
the LM head through the chunked projection; with its diagnostics for logging."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.losses.chunked import ChunkedTokenStats, FusedTokenLoss, RefHead, tokens_per_chunk
from pipeline.losses.functions import LOSSES, PER_TOKEN_LOSSES, Diagnostics, LossFn
from pipeline.losses.params import LOSS_PARAMS, loss_params
from pipeline.losses.stats import CONFLICT_QUANTILE, Needs, TokenStats, TopK, confident_conflicts, mean, select_tokens, token_stats

@dataclass
class TokenLoss:
    """`loss(logits, labels, ...)`, or `loss.chunked(hidden, lm_head, labels, ...)` -> scalar.

    After each call `diagnostics` holds detached 0-d tensors for logging (per micro-batch).
    """

    name: str
    fn: LossFn
    needs: Needs
    diagnostics: Diagnostics = field(default_factory=dict)

    @property
    def needs_reference(self) -> bool:
        return self.needs.reference

    def __call__(
        self,
        logits: Tensor,
        labels: Tensor,
        num_items_in_batch: int | Tensor | None = None,
        ref_logits: Tensor | None = None,
        ref_topk: TopK | None = None,
    ) -> Tensor:
        """From the model's logits [B, T, V]; the reference as its logits, or its top K at the
        valid positions."""
        z, y, mask = select_tokens(logits, labels)
        ref = ref_topk
        if ref_logits is not None:
            with torch.no_grad():
                ref = F.log_softmax(ref_logits[:, :-1][mask].float(), dim=-1)
        logp = F.log_softmax(z.float(), dim=-1)
        return self.loss(token_stats(logp, y, self.needs, self.check_reference(ref)), num_items_in_batch)

    def chunked(
        self,
        hidden: Tensor,
        lm_head: nn.Linear,
        labels: Tensor,
        num_items_in_batch: int | Tensor | None = None,
        ref_hidden: Tensor | None = None,
        ref_lm_head: nn.Linear | None = None,
        ref_topk: TopK | None = None,
        chunk_tokens: int | None = None,
    ) -> Tensor:
        """The same loss from the last hidden states [B, T, H] and the LM head, projected
        `chunk_tokens` at a time (default: `tokens_per_chunk`); the reference as its
        hidden states and head, or its top K at the valid positions."""
        h, y, mask = select_tokens(hidden, labels)
        ref = ref_topk
        if ref_hidden is not None:
            ref = RefHead(ref_hidden[:, :-1][mask], ref_lm_head.weight, ref_lm_head.bias)
        vocab = lm_head.weight.size(0)
        chunk = chunk_tokens or tokens_per_chunk(vocab, h.device)
        ref = self.check_reference(ref)
        weight, bias = lm_head.weight, lm_head.bias
        trains = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h, weight, bias))
        if self.name in PER_TOKEN_LOSSES and trains:
            n = self.normaliser(len(y), num_items_in_batch, h.device)
            loss, *stats = FusedTokenLoss.apply(h, weight, bias, y, self.needs, chunk, self.fn, n)
            self.record_diagnostics(TokenStats(vocab, *stats), n)
            return loss
        stats = ChunkedTokenStats.apply(h, weight, bias, y, self.needs, ref, chunk)
        return self.loss(TokenStats(vocab, *stats), num_items_in_batch)

    def check_reference(self, ref: Any) -> Any:
        if self.needs.reference and ref is None:
            raise ValueError(f"loss {self.name!r} needs the frozen reference model (ref_logits) or its top K (ref_topk)")
        return ref if self.needs.reference else None

    def loss(self, stats: TokenStats, num_items_in_batch: int | Tensor | None) -> Tensor:
        n = self.normaliser(len(stats.logp), num_items_in_batch, stats.logp.device)
        loss, diag = self.fn(stats, n)
        self.record_diagnostics(stats, n, diag)
        return loss

    @staticmethod
    def normaliser(tokens: int, num_items_in_batch: int | Tensor | None, device: torch.device) -> Tensor:
        count = tokens if num_items_in_batch is None else num_items_in_batch
        # clamped so that a micro-batch with no loss tokens gives a finite 0 (with a grad_fn)
        return torch.as_tensor(count, device=device).clamp(min=1)

    def record_diagnostics(self, stats: TokenStats, n: Tensor, diag: Diagnostics | None = None) -> None:
        """`diag`: the loss's own, if it was computed on these stats; else it is computed here."""
        with torch.no_grad():
            diag = self.fn(stats, n)[1] if diag is None else diag
            conflicts = confident_conflicts(stats.entropy, stats.logp, CONFLICT_QUANTILE)
            self.diagnostics = {"entropy": mean(stats.entropy.detach()),
                                "confident_conflict_frac": mean(conflicts.float()), **diag}


def build_loss(name: str, **params: Any) -> TokenLoss:
    params = loss_params(name, **params)
    fn, needs = LOSSES[name]
    own = inspect.signature(fn).parameters  # GEM's beta and h shape only its per-token term
    needs = replace(needs(params), reference=LOSS_PARAMS[name].needs_reference)
    return TokenLoss(name, partial(fn, **{k: v for k, v in params.items() if k in own}), needs)
