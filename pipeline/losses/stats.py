"""Per-token statistics of the SFT losses, from log-probabilities over the vocabulary: log p(y),
the entropy, and what a loss needs besides (top-K entropy, reverse KL to the reference model,
GEM's term), with their gradients for the chunked path (pipeline/losses/chunked.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
CONFLICT_QUANTILE = 0.15  # the "confident conflict" diagnostic, logged under every loss

# ---------------------------------------------------------------------------- helpers


def select_tokens(x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Shift (x[:, t] predicts labels[:, t+1]) and keep valid positions: x [N, ...], targets
    [N] and the [B, T-1] validity mask. `x` is the logits or the hidden states."""
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    return x[:, :-1][mask], labels[mask], mask


def token_logp(logp: Tensor, y: Tensor) -> Tensor:
    return logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)


def entropy(logp: Tensor) -> Tensor:
    return -(logp.exp() * logp).sum(-1)


def mean(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over `mask` (or all entries) that is 0, not NaN, when empty, and keeps x's graph."""
    x = x if mask is None else x * mask
    count = x.numel() if mask is None else mask.sum()
    return x.sum() / torch.as_tensor(count, device=x.device).clamp(min=1)


def topk_mask(x: Tensor, k: int) -> Tensor:
    """Boolean mask of the k largest entries; selection is not differentiated."""
    return torch.zeros_like(x, dtype=torch.bool).scatter_(0, x.detach().topk(k).indices, True)


def confident_conflicts(h: Tensor, lp: Tensor, quantile: float) -> Tensor:
    """Tokens in the bottom `quantile` of BOTH entropy and p(y), percentiles over these tokens."""
    h, p = h.detach(), lp.detach().exp()
    if h.numel() == 0:  # torch.quantile refuses empty input
        return torch.zeros_like(h, dtype=torch.bool)
    return (h <= torch.quantile(h, quantile)) & (p <= torch.quantile(p, quantile))


# -------------------------------------------------------------------- per-token stats


def topk_entropy(logp: Tensor, k: int) -> Tensor:
    """Entropy of the softmax over the top-K logits only (EAFT's H_K)."""
    # log_softmax over the top-K log-probs renormalises them (softmax is shift invariant)
    return entropy(F.log_softmax(logp.topk(min(k, logp.size(-1)), dim=-1).values, dim=-1))


class TopK(NamedTuple):
    """The reference model's K most likely tokens and their log-probs, per token: [N, K] each."""

    ids: Tensor
    logp: Tensor

    def rows(self, start: int, end: int, needed: Tensor | None = None) -> TopK:
        """Tokens start:end; all of them even when fewer are `needed` (see RefHead.rows): reading
        the cache costs nothing next to projecting a head."""
        return TopK(self.ids[start:end], self.logp[start:end])

    def rest_logp(self, vocab: int) -> Tensor:
        """log r_v of each token v outside the top K: the rest of the mass, spread evenly over the V - K."""
        rest = (1 - self.logp.exp().sum(-1)).clamp(min=1e-12)
        return rest.log() - math.log(max(vocab - self.ids.size(-1), 1))


# The reference model's distribution for some tokens: log-probs [n, V], or its top K.
RefRows = Tensor | TopK


def topk_cross(p: Tensor, ref: TopK) -> tuple[Tensor, Tensor, Tensor]:
    """Σ_v p_v log r_v with r known on its top K only: p at the top K, the log r of every other
    token (TopK.rest_logp; 0 where rounding puts all of p in the top K, which leaves the rest no
    mass and no gradient), and the sum."""
    p_top = p.gather(-1, ref.ids.long())
    rest = torch.where(p_top.sum(-1) <= 1, ref.rest_logp(p.size(-1)), 0)
    return p_top, rest, (p_top * ref.logp).sum(-1) + (1 - p_top.sum(-1)) * rest


def reverse_kl(logp: Tensor, ref: RefRows, p: Tensor | None = None, entropy: Tensor | None = None) -> Tensor:
    """KL(p_θ || p_ref) per token, the reference over the whole vocabulary or its top K (see
    TopK.rest_logp); `p` = exp(logp) and `entropy` = −Σ p log p if already computed."""
    p = logp.exp() if p is None else p
    if isinstance(ref, Tensor):
        return (p * (logp - ref)).sum(-1)  # one sum: −H − Σ p log r would cancel to noise where p ≈ r
    entropy = -(p * logp).sum(-1) if entropy is None else entropy
    return -entropy - topk_cross(p, ref)[2]


def gem_weights(logp: Tensor, lp: Tensor, beta: float, h: str) -> Tensor:
    """GEM's sg(q_v · w_v), q = softmax(z/β) (the log-normaliser cancels); see `gem_term`."""
    logp = logp.detach()
    q = F.softmax(logp / beta, dim=-1)
    return q * torch.sigmoid(0.01 * (logp - lp.detach().unsqueeze(-1))) if h == "logsigmoid" else q


def gem_term(logp: Tensor, lp: Tensor, beta: float, h: str) -> Tensor:
    """GEM per token: Σ_v sg(q_v · w_v) (log p_v − log p_y), q = softmax(z/β).

    h="linear": w_v = 1, i.e. −log p(y) + Σ_v sg(q_v) log p_v, gradient q − onehot(y).
    h="logsigmoid": w_v = sg(sigmoid(0.01 · (z_v − z_y))), exactly as the official code
    (github.com/liziniu/GEM, sft_trainer.py `gem_loss`) implements it.
    """
    return (gem_weights(logp, lp, beta, h) * (logp - lp.unsqueeze(-1))).sum(-1)  # log p_v − log p_y = z_v − z_y


@dataclass(frozen=True)
class Needs:
    """What a loss needs per token besides log p(y) and the entropy."""

    topk: int = 0  # EAFT's top-K entropy, with this K
    reference: bool = False  # the reverse KL to the reference model
    gem: tuple[float, str] | None = None  # GEM's term, with (beta, h)


@dataclass
class TokenStats:
    """Per valid token, [N] each; all but `topk_entropy` carry gradients."""

    vocab: int
    logp: Tensor  # log p(y_t)
    entropy: Tensor
    topk_entropy: Tensor | None = None
    kl: Tensor | None = None
    gem: Tensor | None = None


STAT_FIELDS = tuple(f.name for f in fields(TokenStats) if f.name != "vocab")


def token_stats(logp: Tensor, y: Tensor, needs: Needs, ref: RefRows | None = None) -> TokenStats:
    """The stats of tokens with log-probs logp [n, V] (float32) and targets y [n]."""
    p = logp.exp()
    lp = token_logp(logp, y)
    stats = TokenStats(logp.size(-1), lp, -(p * logp).sum(-1))
    if needs.topk:
        stats.topk_entropy = topk_entropy(logp.detach(), needs.topk)
    if needs.reference:
        stats.kl = reverse_kl(logp, ref, p, stats.entropy)
    if needs.gem:
        stats.gem = gem_term(logp, lp, *needs.gem)
    return stats


def token_stats_grad(logp: Tensor, y: Tensor, needs: Needs, ref: RefRows | None, grads: dict[str, Tensor],
                     entropy: Tensor) -> Tensor:
    """d(Σ_t Σ_s grads[s]_t · s_t) / dz [n, V] for the stats s of `token_stats` that have a gradient,
    where logp = log_softmax(z) and `entropy` is the one `token_stats` gave.

    In closed form, so that the chunked backward walks the chunk's logits a few times instead of
    building and walking autograd's graph of `token_stats`. With p = softmax(z), per token:
      log p(y):  onehot(y) − p
      H:         −p ⊙ (log p + H)
      KL(p‖r) = −H − Σ p log r:  p ⊙ (log p + H) − p ⊙ (log r − Σ p log r)
      GEM:       sg(q ⊙ w) − Σ sg(q ⊙ w) · onehot(y)
    so the gradient is p ⊙ (a · log p + b) plus terms at y (and at a cached reference's top K).
    `ref` is read only where grads["kl"] is not 0.
    """
    p = logp.exp()
    zero = torch.zeros(len(y), device=p.device)
    g_lp, g_h, g_kl, g_gem = (grads.get(s, zero) for s in ("logp", "entropy", "kl", "gem"))
    b, at_y = -g_lp, g_lp
    inner = None  # a · log p + b, where a is not 0
    scatters = []  # (columns, values) added to the gradient at the end
    if "entropy" in grads or "kl" in grads:
        a = g_kl - g_h
        b = b + a * entropy
        inner = logp * a.unsqueeze(-1)
    if "kl" in grads:
        if isinstance(ref, Tensor):
            inner = inner.addcmul_(ref, g_kl.unsqueeze(-1), value=-1)
            b = b + g_kl * (p * ref).sum(-1)
        else:  # log r is rest_logp off the top K: the constant goes to b, the top K are scattered
            p_top, rest, cross = topk_cross(p, ref)
            b = b - g_kl * (rest - cross)
            scatters.append((ref.ids.long(), -g_kl.unsqueeze(-1) * p_top * (ref.logp - rest.unsqueeze(-1))))
    grad = p * b.unsqueeze(-1) if inner is None else inner.add_(b.unsqueeze(-1)).mul_(p)
    if "gem" in grads:
        weights = gem_weights(logp, token_logp(logp, y), *needs.gem)
        grad.add_(weights * g_gem.unsqueeze(-1))
        at_y = at_y - g_gem * weights.sum(-1)
    for columns, values in [*scatters, (y.unsqueeze(-1), at_y.unsqueeze(-1))]:
        grad.scatter_add_(-1, columns, values)
    return grad
