"""Token-level SFT losses: ce, dft, eaft, masked, eksft, gem.

Definitions follow shared/notes/methods.md. Every loss sees the valid next-token positions
only, as float32 log-probs `logp` [N, V] and targets `y` [N], and returns
Σ(per-token loss) / n plus its own diagnostics, where n = num_items_in_batch (or the
micro-batch's count of valid tokens): summing micro-batches then gives the big-batch update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
CONFLICT_QUANTILE = 0.15  # the "confident conflict" diagnostic, logged under every loss

Diagnostics = dict[str, Tensor]
LossFn = Callable[..., tuple[Tensor, Diagnostics]]

# ---------------------------------------------------------------------------- helpers


def select_tokens(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Shift (logits[:, t] predicts labels[:, t+1]) and keep valid positions.

    Returns float32 log-probs [N, V], targets [N] and the [B, T-1] validity mask. Selecting before
    the upcast keeps the float32 copy to the valid tokens only.
    """
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    return F.log_softmax(logits[:, :-1][mask].float(), dim=-1), labels[mask], mask


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


# ----------------------------------------------------------------------------- losses


def ce_loss(logp: Tensor, y: Tensor, n: Tensor) -> tuple[Tensor, Diagnostics]:
    return -token_logp(logp, y).sum() / n, {}


def dft_loss(logp: Tensor, y: Tensor, n: Tensor) -> tuple[Tensor, Diagnostics]:
    """Dynamic Fine-Tuning: CE scaled by sg(p(y)); TRL's loss_type="dft"."""
    lp = token_logp(logp, y)
    return -(lp.exp().detach() * lp).sum() / n, {}


def eaft_loss(logp: Tensor, y: Tensor, n: Tensor, topk: int, alpha: float) -> tuple[Tensor, Diagnostics]:
    """EAFT: CE scaled by sg((H_K / ln K)^α), H_K the entropy over the renormalised top-K."""
    with torch.no_grad():
        k = min(topk, logp.size(-1))
        # log_softmax over the top-K log-probs renormalises them (softmax is shift invariant)
        top = F.log_softmax(logp.topk(k, dim=-1).values, dim=-1)
        # exact ln K (the LLaMA-Factory port's 3.0 is only right for K=20)
        w = (entropy(top) / math.log(k)) ** alpha
    return -(w * token_logp(logp, y)).sum() / n, {"weight": mean(w)}


def masked_loss(logp: Tensor, y: Tensor, n: Tensor, quantile: float) -> tuple[Tensor, Diagnostics]:
    """CE without the confident conflicts; n still counts every valid token."""
    lp = token_logp(logp, y)
    drop = confident_conflicts(entropy(logp), lp, quantile)
    return -(lp * ~drop).sum() / n, {"masked_frac": mean(drop.float())}


def eksft_loss(
    logp: Tensor,
    y: Tensor,
    n: Tensor,
    ref_logp: Tensor,
    ratio: float,
    union: bool,
    lambda_entropy: float,
    lambda_kl: float,
) -> tuple[Tensor, Diagnostics]:
    """EKSFT: CE outside M = S_H ∪ S_KL (or ∩), minus an entropy bonus on S_H, plus KL on S_KL.

    Diagnostics masked_entropy_frac / masked_kl_frac are the fractions in S_H only / S_KL only,
    masked_both_frac in both, masked_frac in M.
    """
    lp, h = token_logp(logp, y), entropy(logp)
    kl = (logp.exp() * (logp - ref_logp)).sum(-1)  # true reverse KL(p_θ || p_ref), per token
    k = math.floor(ratio * len(y))
    in_h, in_kl = topk_mask(h, k), topk_mask(kl, k)
    m = in_h | in_kl if union else in_h & in_kl
    ce = -(lp * ~m).sum() / n
    # The regularisers are means over this micro-batch's S_H / S_KL, as the paper defines them,
    # so unlike CE they are not rescaled by num_items_in_batch; empty sets (k=0) give 0.
    reg = -lambda_entropy * mean(h / math.log(logp.size(-1)), in_h) + lambda_kl * mean(kl, in_kl)
    diag = {
        "kl": mean(kl.detach()),
        "masked_entropy_frac": mean((in_h & ~in_kl).float()),
        "masked_kl_frac": mean((in_kl & ~in_h).float()),
        "masked_both_frac": mean((in_h & in_kl).float()),
        "masked_frac": mean(m.float()),
    }
    return ce + reg, diag


def gem_loss(logp: Tensor, y: Tensor, n: Tensor, beta: float, h: str) -> tuple[Tensor, Diagnostics]:
    """GEM: Σ_v sg(q_v · w_v) (log p_v − log p_y), q = softmax(z/β).

    h="linear": w_v = 1, i.e. −log p(y) + Σ_v sg(q_v) log p_v, gradient q − onehot(y).
    h="logsigmoid": w_v = sg(sigmoid(0.01 · (z_v − z_y))), exactly as the official code
    (github.com/liziniu/GEM, sft_trainer.py `gem_loss`) implements it.
    """
    lp = token_logp(logp, y)
    diff = logp - lp.unsqueeze(-1)  # log p_v − log p_y = z_v − z_y
    q = F.softmax(logp.detach() / beta, dim=-1)  # softmax(z/β): the log-normaliser cancels
    if h == "logsigmoid":
        q = q * torch.sigmoid(0.01 * diff.detach())
    return (q * diff).sum() / n, {}


# -------------------------------------------------------------------------- public API


def _number(lo: float, hi: float = math.inf, lo_open: bool = False) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        is_num = isinstance(v, (int, float)) and not isinstance(v, bool)
        return is_num and (lo < v if lo_open else lo <= v) and v <= hi

    return ok


# name -> (function, default parameters)
LOSSES: dict[str, tuple[LossFn, dict[str, Any]]] = {
    "ce": (ce_loss, {}),
    "dft": (dft_loss, {}),
    "eaft": (eaft_loss, {"topk": 20, "alpha": 1.0}),
    "masked": (masked_loss, {"quantile": 0.15}),
    "eksft": (eksft_loss, {"ratio": 0.2, "union": True, "lambda_entropy": 0.05, "lambda_kl": 0.05}),
    "gem": (gem_loss, {"beta": 0.7, "h": "linear"}),
}

# parameter -> (check, what is allowed)
PARAM_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "topk": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 2, "an int >= 2"),
    "alpha": (_number(0), "a number >= 0"),
    "quantile": (_number(0, 1), "a number in [0, 1]"),
    "ratio": (_number(0, 1), "a number in [0, 1]"),
    "union": (lambda v: isinstance(v, bool), "True or False"),
    "lambda_entropy": (_number(0), "a number >= 0"),
    "lambda_kl": (_number(0), "a number >= 0"),
    "beta": (_number(0, lo_open=True), "a number > 0"),
    "h": (lambda v: v in ("linear", "logsigmoid"), "'linear' or 'logsigmoid'"),
}


@dataclass
class TokenLoss:
    """`loss(logits, labels, num_items_in_batch=None, ref_logits=None)` -> scalar.

    After each call `diagnostics` holds detached 0-d tensors for logging (per micro-batch).
    """

    name: str
    fn: LossFn
    needs_reference: bool = False
    diagnostics: Diagnostics = field(default_factory=dict)

    def __call__(
        self,
        logits: Tensor,
        labels: Tensor,
        num_items_in_batch: int | Tensor | None = None,
        ref_logits: Tensor | None = None,
    ) -> Tensor:
        logp, y, mask = select_tokens(logits, labels)
        extra = {}
        if self.needs_reference:
            if ref_logits is None:
                raise ValueError(f"loss {self.name!r} needs ref_logits from the frozen reference model")
            with torch.no_grad():
                extra["ref_logp"] = F.log_softmax(ref_logits[:, :-1][mask].float(), dim=-1)
        count = len(y) if num_items_in_batch is None else num_items_in_batch
        # clamped so that a micro-batch with no loss tokens gives a finite 0 (with a grad_fn)
        n = torch.as_tensor(count, device=logp.device).clamp(min=1)
        loss, diag = self.fn(logp, y, n, **extra)
        with torch.no_grad():
            lp, h = token_logp(logp, y), entropy(logp)
            conflicts = confident_conflicts(h, lp, CONFLICT_QUANTILE)
            self.diagnostics = {"entropy": mean(h), "confident_conflict_frac": mean(conflicts.float()), **diag}
        return loss


def build_loss(name: str, **params: Any) -> TokenLoss:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; allowed: {sorted(LOSSES)}")
    fn, defaults = LOSSES[name]
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} for loss {name!r}; allowed: {sorted(defaults)}")
    params = {**defaults, **params}
    for key, value in params.items():
        check, allowed = PARAM_CHECKS[key]
        if not check(value):
            raise ValueError(f"loss {name!r}: {key}={value!r} is invalid; allowed: {allowed}")
    return TokenLoss(name, partial(fn, **params), needs_reference=name == "eksft")
