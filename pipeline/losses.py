"""Token-level SFT losses: ce, dft, eaft, masked, eksft, gem.

Definitions follow shared/notes/methods.md. A loss is computed in two steps:
1. `TokenStats` of each valid next-token position: log p(y), the entropy, and what the loss
   needs besides (top-K entropy, KL to the reference, GEM's term). They come from the float32
   logits all at once (`token_stats`), or straight from the hidden states, projected to the
   vocabulary a chunk of tokens at a time (`ChunkedTokenStats`), so that the
   [tokens × vocab] logits never exist whole;
2. the loss, pure math on those [N] vectors: Σ(per-token loss) / n, where n =
   num_items_in_batch (or the micro-batch's count of valid tokens): summing micro-batches then
   gives the big-batch update.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, fields, replace
from functools import partial
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.loss_params import LOSS_PARAMS, loss_params

IGNORE_INDEX = -100
CONFLICT_QUANTILE = 0.15  # the "confident conflict" diagnostic, logged under every loss
CHUNK_LOGITS = 2**25  # logits per chunk of the chunked path: 128 MB in float32
# On a GPU 1 GB per float32 [chunk x vocab] tensor (a chunk's work holds about four at once):
# fewer, larger chunks keep it busy. bench/losses.py on an H200, CE at 8k tokens x
# vocab 151,936: 0.09 s with 2^25 logits per chunk, 0.05 s with 2^28 (the full logits' 0.06 s).
CHUNK_LOGITS_CUDA = 2**28

Diagnostics = dict[str, Tensor]

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


def tokens_per_chunk(vocab: int, device: torch.device) -> int:
    """Tokens per chunk of the chunked path on `device`."""
    return max(1, (CHUNK_LOGITS_CUDA if device.type == "cuda" else CHUNK_LOGITS) // vocab)


def chunk_logp(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.log_softmax(F.linear(hidden, weight, bias).float(), dim=-1)


class RefHead(NamedTuple):
    """The reference model's last hidden states at the valid positions [N, H], and its LM head."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None

    def rows(self, start: int, end: int, needed: Tensor | None = None) -> Tensor:
        """log r of tokens start:end; with the bool mask `needed`, only of those tokens (0 elsewhere)."""
        hidden = self.hidden[start:end]
        with torch.no_grad():
            if needed is None:
                return chunk_logp(hidden, self.weight, self.bias)
            logp = hidden.new_zeros(len(hidden), self.weight.size(0), dtype=torch.float32)
            logp[needed] = chunk_logp(hidden[needed], self.weight, self.bias)
            return logp


def accumulate_matmul(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b in float32: rounding each chunk's product to bf16 before summing biases training
    (TRL's finding for its own chunked kernel)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def head_grad_buffers(inputs: tuple[Tensor, Tensor, Tensor | None], needed: tuple[bool, ...]) -> list[Tensor | None]:
    """float32 zeros for the gradients of (hidden, weight, bias) where `needed`."""
    return [torch.zeros_like(x, dtype=torch.float32) if x is not None and need else None for x, need in zip(inputs, needed)]


def accumulate_head_grads(buffers: list[Tensor | None], grad_z: Tensor, h: Tensor, weight: Tensor, start: int) -> None:
    """Add the chunk's share (its tokens start:start+len(h), gradient grad_z w.r.t. its logits)
    to the gradients of the hidden states, the head's weight and its bias."""
    grad_hidden, grad_weight, grad_bias = buffers
    if grad_hidden is not None:
        accumulate_matmul(grad_hidden[start:start + len(h)], grad_z, weight.to(h.dtype))
    if grad_weight is not None:
        accumulate_matmul(grad_weight, grad_z.t(), h)
    if grad_bias is not None:
        grad_bias += grad_z.sum(0, dtype=torch.float32)


def in_dtypes(buffers: list[Tensor | None], inputs: tuple[Tensor, Tensor, Tensor | None]) -> list[Tensor | None]:
    return [None if g is None else g.to(x.dtype) for g, x in zip(buffers, inputs)]


class ChunkedTokenStats(torch.autograd.Function):
    """TokenStats of the logits `hidden @ weight.T + bias` of N tokens, `chunk` tokens at a time.

    TRL's ChunkedLogProbFunction does this for log p(y) and the entropy; the losses here need
    the top-K entropy, the KL to a reference head or its cached top K, and GEM's term from the
    same logits, so they get their own function, built the same way: the forward keeps no
    graph, and the backward projects each chunk again and takes the stats' gradient there in
    closed form (`token_stats_grad`), so at most one chunk's logits exist at a time. Two
    projections are spared: the last chunk's log-probs (and the reference's) are kept from the
    forward, and the backward starts with them; and the reference is projected again only at
    the tokens whose KL has a gradient (EKSFT's S_KL).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, y, needs: Needs, ref: RefHead | TopK | None, chunk: int):
        ctx.set_materialize_grads(False)
        device_type = hidden.device.type
        # the backward recomputes the chunks under the forward's autocast, not the one current then
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        parts = []
        for start in range(0, max(len(y), 1), chunk):  # one empty chunk when N = 0
            end = start + chunk
            logp = ref_logp = None  # the previous chunk's go before this one's are made
            logp = chunk_logp(hidden[start:end], weight, bias)
            ref_logp = ref.rows(start, end) if ref is not None else None
            parts.append(token_stats(logp, y[start:end], needs, ref_logp))
        ctx.last_chunk = (start, logp, ref_logp)
        out = tuple(None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts])
                    for f in STAT_FIELDS)
        entropy = out[STAT_FIELDS.index("entropy")]
        ctx.save_for_backward(hidden, weight, bias, y, entropy)
        ctx.needs, ctx.ref, ctx.chunk = needs, ref, chunk
        if out[STAT_FIELDS.index("topk_entropy")] is not None:
            ctx.mark_non_differentiable(out[STAT_FIELDS.index("topk_entropy")])
        return out

    @staticmethod
    def backward(ctx, *grads):
        hidden, weight, bias, y, entropy = ctx.saved_tensors
        buffers = head_grad_buffers((hidden, weight, bias), ctx.needs_input_grad[:3])
        device_type, autocast, autocast_dtype = ctx.autocast
        kept = ctx.last_chunk  # None in a second backward (retain_graph): then every chunk is projected again
        ctx.last_chunk = None  # not held through the model's backward
        for start in reversed(range(0, len(y), ctx.chunk)):
            end = start + ctx.chunk
            rows = {f: g[start:end] for f, g in zip(STAT_FIELDS, grads) if g is not None and f != "topk_entropy"}
            if not rows:
                continue
            logp = ref = grad_z = None  # the previous chunk's go before this one's are made
            h = hidden[start:end]
            if kept is not None and kept[0] == start:
                (_, logp, ref), kept = kept, None
            else:
                with torch.autocast(device_type, autocast_dtype, enabled=autocast):
                    logp = chunk_logp(h, weight, bias)
                if "kl" in rows:
                    ref = ctx.ref.rows(start, end, rows["kl"] != 0)
            grad_z = token_stats_grad(logp, y[start:end], ctx.needs, ref, rows, entropy[start:end]).to(h.dtype)
            accumulate_head_grads(buffers, grad_z, h, weight, start)
        return (*in_dtypes(buffers, (hidden, weight, bias)), None, None, None, None)


class FusedTokenLoss(torch.autograd.Function):
    """A per-token loss (`PER_TOKEN_LOSSES`: Σ_t ℓ(stats_t) / n) of the logits `hidden @ weight.T + bias`,
    whose gradient is taken in the forward, chunk by chunk, so that the backward only scales it.

    Liger Kernel's fused linear cross-entropy does this for CE; it has no entropy-weighted losses,
    hence this function. Each token's ℓ depends on that token's stats alone, so a chunk's ∂ℓ/∂stats
    is known as soon as its stats are (autograd over the [chunk] vectors), and the chunk's
    logits are projected once instead of twice (forward and backward): the three matmuls of the
    full-logits path, with one chunk of logits alive at a time. Returns the loss and the stats
    (detached, for the diagnostics).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, y, needs: Needs, chunk: int, loss_fn: LossFn, n: Tensor):
        inputs = (hidden, weight, bias)
        buffers = head_grad_buffers(inputs, tuple(x is not None and x.requires_grad for x in inputs))
        loss, parts = torch.zeros((), device=hidden.device), []
        for start in range(0, max(len(y), 1), chunk):  # one empty chunk when N = 0
            end = start + chunk
            logp = grad_z = None  # the previous chunk's go before this one's are made
            h = hidden[start:end]
            logp = chunk_logp(h, weight, bias)
            stats = token_stats(logp, y[start:end], needs)
            parts.append(stats)
            leaves = [f for f in STAT_FIELDS if getattr(stats, f) is not None and f != "topk_entropy"]
            for f in leaves:  # the stats become leaves: ∂ℓ/∂stats by autograd over [chunk] vectors
                getattr(stats, f).requires_grad_()
            with torch.enable_grad():
                part, _ = loss_fn(stats, n)
                coeffs = torch.autograd.grad(part, [getattr(stats, f) for f in leaves], allow_unused=True)
            loss += part.detach()
            grads = {f: g for f, g in zip(leaves, coeffs) if g is not None}
            with torch.autocast(hidden.device.type, enabled=False):  # accumulate_matmul picks the dtypes
                grad_z = token_stats_grad(logp, y[start:end], needs, None, grads, stats.entropy.detach()).to(h.dtype)
                accumulate_head_grads(buffers, grad_z, h, weight, start)
        # saved, not kept on ctx: autograd releases saved tensors after the backward, so the weight's
        # AccumulateGrad can take the gradient as it is instead of copying it (a second [V, H])
        ctx.save_for_backward(*in_dtypes(buffers, inputs))
        stats = tuple(None if getattr(parts[0], f) is None else torch.cat([getattr(p, f).detach() for p in parts])
                      for f in STAT_FIELDS)
        ctx.mark_non_differentiable(*(s for s in stats if s is not None))
        return (loss, *stats)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        # A Python number: the kernels apply it in float32, not rounded to the gradients' dtype
        # first (a bf16 1/3 is 0.2% off). 1, the usual case, spares a pass over the head's [V, H].
        scale = float(grad_loss)
        scaled = [None if g is None else g if scale == 1 else g * scale for g in ctx.saved_tensors]
        return (*scaled, None, None, None, None, None)


# ----------------------------------------------------------------------------- losses

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


# -------------------------------------------------------------------------- public API


# Losses that are a sum of per-token terms, each a function of its own token's stats only: their
# gradient is taken in the forward on the chunked path (FusedTokenLoss). masked and eksft pick
# their tokens by quantiles over the whole micro-batch, so they take the two-pass path.
PER_TOKEN_LOSSES = frozenset({"ce", "dft", "eaft", "gem"})

# name -> (function, what it needs per token given its parameters); the parameters are
# pipeline.loss_params's, which also says whether a loss needs the reference model.
LOSSES: dict[str, tuple[LossFn, Callable[[dict[str, Any]], Needs]]] = {
    "ce": (ce_loss, lambda p: Needs()),
    "dft": (dft_loss, lambda p: Needs()),
    "eaft": (eaft_loss, lambda p: Needs(topk=p["topk"])),
    "masked": (masked_loss, lambda p: Needs()),
    "eksft": (eksft_loss, lambda p: Needs()),
    "gem": (gem_loss, lambda p: Needs(gem=(p["beta"], p["h"]))),
}


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
