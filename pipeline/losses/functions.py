"""The SFT losses, one function each: pure math on the per-token statistics of a micro-batch
(`TokenStats`), Σ(per-token loss) / n with n = num_items_in_batch (or the micro-batch's count of
valid tokens), so that summing micro-batches gives the big-batch update. Definitions follow
shared/notes/methods.md; each loss's parameters are its pydantic model in
pipeline/losses/params.py (the same names), which reading a config checks without torch."""

from __future__ import annotations

import math
from typing import Any, Callable

from torch import Tensor

from pipeline.losses.stats import Needs, TokenStats, confident_conflicts, mean, topk_mask

Diagnostics = dict[str, Tensor]

LossFn = Callable[..., tuple[Tensor, Diagnostics]]


def ce_loss(s: TokenStats, n: Tensor) -> tuple[Tensor, Diagnostics]:
    return -s.logp.sum() / n, {}


def dft_loss(s: TokenStats, n: Tensor) -> tuple[Tensor, Diagnostics]:
    """Dynamic Fine-Tuning: CE scaled by sg(p(y)); TRL's loss_type="dft"."""
    return -(s.logp.exp().detach() * s.logp).sum() / n, {}


def eaft_loss(s: TokenStats, n: Tensor, topk: int, alpha: float) -> tuple[Tensor, Diagnostics]:
    """EAFT: CE scaled by sg((H_K / ln K)^α), H_K the entropy over the renormalised top-K."""
    # exact ln K (the LLaMA-Factory port's 3.0 is only right for K=20); K is at most the vocabulary
    w = (s.topk_entropy / math.log(min(topk, s.vocab))) ** alpha
    return -(w * s.logp).sum() / n, {"weight": mean(w)}


def masked_loss(s: TokenStats, n: Tensor, quantile: float) -> tuple[Tensor, Diagnostics]:
    """CE without the confident conflicts; n still counts every valid token."""
    drop = confident_conflicts(s.entropy, s.logp, quantile)
    return -(s.logp * ~drop).sum() / n, {"masked_frac": mean(drop.float())}


def eksft_loss(
    s: TokenStats,
    n: Tensor,
    ratio: float,
    union: bool,
    lambda_entropy: float,
    lambda_kl: float,
    normalize: str,
) -> tuple[Tensor, Diagnostics]:
    """EKSFT: CE outside M = S_H ∪ S_KL (or ∩), minus an entropy bonus on S_H, plus KL on S_KL.

    normalize="kept" divides the kept CE by the kept tokens, as the official trainer does
    (MINE-USTC/EKSFT: a mean over the unmasked tokens); "all" by every valid token, as a
    token-level loss usually is. With gradient accumulation or several processes the kept count
    of the whole batch is not known per micro-batch: n (all its valid tokens) is scaled by this
    micro-batch's kept share, which is exact for one micro-batch on one process.

    Diagnostics masked_entropy_frac / masked_kl_frac are the fractions in S_H only / S_KL only,
    masked_both_frac in both, masked_frac in M.
    """
    lp, h, kl = s.logp, s.entropy, s.kl  # kl: the true reverse KL(p_θ || p_ref) per token
    k = math.floor(ratio * len(lp))
    in_h, in_kl = topk_mask(h, k), topk_mask(kl, k)
    m = in_h | in_kl if union else in_h & in_kl
    kept = ~m
    if normalize == "kept":  # at least 1 when a token is kept (n >= this micro-batch's tokens); else CE is 0
        n = (n * kept.sum() / max(len(lp), 1)).clamp(min=1)
    ce = -(lp * kept).sum() / n
    # The regularisers are means over this micro-batch's S_H / S_KL, as the paper defines them,
    # so unlike CE they are not rescaled by num_items_in_batch; empty sets (k=0) give 0.
    reg = -lambda_entropy * mean(h / math.log(s.vocab), in_h) + lambda_kl * mean(kl, in_kl)
    diag = {
        "kl": mean(kl.detach()),
        "masked_entropy_frac": mean((in_h & ~in_kl).float()),
        "masked_kl_frac": mean((in_kl & ~in_h).float()),
        "masked_both_frac": mean((in_h & in_kl).float()),
        "masked_frac": mean(m.float()),
    }
    return ce + reg, diag


def gem_loss(s: TokenStats, n: Tensor) -> tuple[Tensor, Diagnostics]:
    """GEM (see `gem_term`)."""
    return s.gem.sum() / n, {}


# Losses that are a sum of per-token terms, each a function of its own token's stats only: their
# gradient is taken in the forward on the chunked path (FusedTokenLoss). masked and eksft pick
# their tokens by quantiles over the whole micro-batch, so they take the two-pass path.
PER_TOKEN_LOSSES = frozenset({"ce", "dft", "eaft", "gem"})

# name -> (function, what it needs per token given its parameters); the parameters are
# pipeline.losses.params's, which also says whether a loss needs the reference model.
LOSSES: dict[str, tuple[LossFn, Callable[[dict[str, Any]], Needs]]] = {
    "ce": (ce_loss, lambda p: Needs()),
    "dft": (dft_loss, lambda p: Needs()),
    "eaft": (eaft_loss, lambda p: Needs(topk=p["topk"])),
    "masked": (masked_loss, lambda p: Needs()),
    "eksft": (eksft_loss, lambda p: Needs()),
    "gem": (gem_loss, lambda p: Needs(gem=(p["beta"], p["h"]))),
}
