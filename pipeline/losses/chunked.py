"""The chunked projection: the token statistics (pipeline/losses/stats.py) straight from the last
hidden states and the LM head, projected to the vocabulary a chunk of tokens at a time, so that
the [tokens x vocab] logits never exist whole. A loss whose per-token gradient depends only on
its own token takes its gradient in the forward (`FusedTokenLoss`); the others take two passes
(`ChunkedTokenStats`)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.losses.functions import LossFn
from pipeline.losses.stats import STAT_FIELDS, Needs, TopK, token_stats, token_stats_grad

CHUNK_LOGITS = 2**25  # logits per chunk of the chunked path: 128 MB in float32
# On a GPU 1 GB per float32 [chunk x vocab] tensor (a chunk's work holds about four at once):
# fewer, larger chunks keep it busy. bench/losses.py on an H200, CE at 8k tokens x
# vocab 151,936: 0.09 s with 2^25 logits per chunk, 0.05 s with 2^28 (the full logits' 0.06 s).
CHUNK_LOGITS_CUDA = 2**28

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
