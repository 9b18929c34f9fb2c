"""Tests for the losses (pipeline/losses/) against independent, token-by-token reference implementations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.losses.token_loss import build_loss

CASES = [
    ("ce", {}),
    ("dft", {}),
    ("eaft", {}),
    ("eaft", {"topk": 5, "alpha": 2.0}),
    ("masked", {}),
    ("masked", {"quantile": 0.3}),
    ("eksft", {}),
    ("eksft", {"ratio": 0.3, "union": False, "lambda_entropy": 0.5, "lambda_kl": 0.7}),
    ("eksft", {"normalize": "all"}),
    ("gem", {}),
    ("gem", {"beta": 0.5, "h": "logsigmoid"}),
]
DEFAULTS = {
    "eaft": {"topk": 20, "alpha": 1.0},
    "masked": {"quantile": 0.15},
    "eksft": {"ratio": 0.2, "union": True, "lambda_entropy": 0.05, "lambda_kl": 0.05, "normalize": "kept"},
    "gem": {"beta": 0.7, "h": "linear"},
}


def make_batch(B=3, T=9, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100  # prompt
    labels[1, -2:] = -100  # padding
    labels[2, 5] = -100
    ref = logits + torch.randn(B, T, V, generator=g)
    return logits, labels, ref


# ------------------------------------------------------------ independent reference


def valid_pairs(labels):
    """(b, t, y): logits[b, t] predicts labels[b, t+1]."""
    B, T = labels.shape
    return [(b, t, int(labels[b, t + 1])) for b in range(B) for t in range(T - 1) if labels[b, t + 1] != -100]


def log_softmax(z):
    return z - torch.logsumexp(z, dim=0)


def ent(z):
    lp = log_softmax(z)
    return -(lp.exp() * lp).sum()


def reference_loss(name, params, logits, labels, ref_logits, n=None):
    """Straight from methods.md, one token at a time in float64."""
    pairs = valid_pairs(labels)
    n = len(pairs) if n is None else n
    n = max(n, 1)
    zs = [logits[b, t].double() for b, t, _ in pairs]
    lps = [log_softmax(z) for z in zs]
    lpy = [lp[y] for lp, (_, _, y) in zip(lps, pairs)]
    if name == "ce":
        return sum((-x for x in lpy), torch.zeros((), dtype=torch.float64)) / n
    if name == "dft":
        return sum((-x.exp().detach() * x for x in lpy), torch.zeros((), dtype=torch.float64)) / n
    if name == "eaft":
        total = torch.zeros((), dtype=torch.float64)
        for z, x in zip(zs, lpy):
            K = min(params["topk"], len(z))
            top = torch.sort(z.detach(), descending=True).values[:K]
            w = (ent(top) / math.log(K)) ** params["alpha"]
            total = total - w * x
        return total / n
    if name == "masked":
        H = np.array([float(ent(z.detach())) for z in zs])
        P = np.array([float(x.detach().exp()) for x in lpy])
        q = 100 * params["quantile"]
        drop = (H <= np.percentile(H, q)) & (P <= np.percentile(P, q))
        return sum((-x for x, d in zip(lpy, drop) if not d), torch.zeros((), dtype=torch.float64)) / n
    if name == "gem":
        total = torch.zeros((), dtype=torch.float64)
        for z, lp, x, (_, _, y) in zip(zs, lps, lpy, pairs):
            q = torch.softmax(z.detach() / params["beta"], dim=0)
            if params["h"] == "linear":
                total = total - x + (q * lp).sum()
            else:  # liziniu/GEM sft_trainer.py: -sum(q * sigmoid(0.01 (z - z_y)) * (log p_y - log p))
                w = torch.sigmoid(0.01 * (z - z[y])).detach()
                total = total - (q * w * (x - lp)).sum()
        return total / n
    if name == "eksft":
        V = logits.shape[-1]
        H = [ent(z) for z in zs]
        KL = []
        for lp, (b, t, _) in zip(lps, pairs):
            lr = log_softmax(ref_logits[b, t].double())
            KL.append(sum(lp[v].exp() * (lp[v] - lr[v]) for v in range(V)))
        k = math.floor(params["ratio"] * len(pairs))
        S_H = set(sorted(range(len(pairs)), key=lambda i: -float(H[i].detach()))[:k])
        S_KL = set(sorted(range(len(pairs)), key=lambda i: -float(KL[i].detach()))[:k])
        M = S_H | S_KL if params["union"] else S_H & S_KL
        # "kept": the official mean over the unmasked tokens, n scaled by the kept share
        denom = n * (len(pairs) - len(M)) / len(pairs) if params["normalize"] == "kept" else n
        loss = sum((-lpy[i] for i in range(len(pairs)) if i not in M), torch.zeros((), dtype=torch.float64)) / denom
        if k:
            loss = loss - params["lambda_entropy"] * sum(H[i] / math.log(V) for i in S_H) / k
            loss = loss + params["lambda_kl"] * sum(KL[i] for i in S_KL) / k
        return loss
    raise AssertionError(name)


def value_and_grad(fn, logits):
    logits = logits.clone().requires_grad_(True)
    loss = fn(logits)
    loss.backward()
    return loss.detach(), logits.grad


# -------------------------------------------------------------------------- tests


@pytest.mark.parametrize("V", [50, 8])  # V=8 < topk: EAFT falls back to K=V
@pytest.mark.parametrize("name,params", CASES)
def test_value_and_grad_match_reference(name, params, V):
    logits, labels, ref = make_batch(V=V)
    full = {**DEFAULTS.get(name, {}), **params}
    loss_fn = build_loss(name, **params)
    got, got_grad = value_and_grad(lambda z: loss_fn(z, labels, ref_logits=ref), logits)
    want, want_grad = value_and_grad(lambda z: reference_loss(name, full, z, labels, ref), logits)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)
    assert got_grad[:, -1].abs().sum() == 0  # the last position predicts nothing


@pytest.mark.parametrize("name,params", CASES)
def test_num_items_in_batch_normalises(name, params):
    logits, labels, ref = make_batch()
    n_valid = int((labels[:, 1:] != -100).sum())
    full = {**DEFAULTS.get(name, {}), **params}
    got = build_loss(name, **params)(logits, labels, num_items_in_batch=3 * n_valid, ref_logits=ref)
    want = reference_loss(name, full, logits, labels, ref, n=3 * n_valid)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    if name in ("masked", "eksft"):  # their CE part still scales with n (eksft "kept": n times the kept share)
        off = build_loss(name, **{**params, **({"lambda_entropy": 0, "lambda_kl": 0} if name == "eksft" else {})})
        a = off(logits, labels, ref_logits=ref)
        b = off(logits, labels, num_items_in_batch=torch.tensor(2 * n_valid), ref_logits=ref)
        torch.testing.assert_close(b, a / 2)


@pytest.mark.parametrize(
    "name,params", [("ce", {}), ("dft", {}), ("eaft", {}), ("gem", {}), ("gem", {"h": "logsigmoid"})]
)
def test_gradient_accumulation_equals_big_batch(name, params):
    logits, labels, _ = make_batch(B=8, T=7, seed=1)
    labels[3, 2:] = -100
    labels[5] = -100  # a micro-batch row with no loss tokens at all
    total = int((labels[:, 1:] != -100).sum())
    loss_fn = build_loss(name, **params)
    big, big_grad = value_and_grad(lambda z: loss_fn(z, labels), logits)
    z = logits.clone().requires_grad_(True)
    acc = sum(loss_fn(z[i : i + 2], labels[i : i + 2], num_items_in_batch=total) for i in range(0, 8, 2))
    acc.backward()
    torch.testing.assert_close(acc.detach(), big)
    torch.testing.assert_close(z.grad, big_grad)


def test_dft_matches_trl():
    # TRL 1.16 SFTTrainer.compute_loss, loss_type="dft", lines transcribed (calling it needs a trainer and a model):
    #   per_token_loss = -outputs.log_probs * outputs.log_probs.exp().detach()
    #   loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
    # Its log_probs come from TRL's own fused LM-head kernel (ChunkedLogProbFunction, CPU path); with an identity
    # LM head the kernel's hidden states are the logits. The gradient is checked on plain log_softmax log-probs:
    # the kernel's backward imports trl.trainer.utils, which alone takes seconds.
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    logits, labels, _ = make_batch()
    V = logits.shape[-1]
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    targets = shift_labels.clamp(min=0).reshape(-1)

    def trl_dft(log_probs, num_items):
        per_token_loss = -log_probs * log_probs.exp().detach()
        num_tokens = mask.sum() if num_items is None else num_items
        return per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)

    kernel_log_probs = ChunkedLogProbFunction.apply(
        logits[:, :-1].reshape(-1, V), torch.eye(V), None, targets, 1.0, 32768, None, 1.0, ("log_probs",)
    )[0]
    kernel_log_probs = kernel_log_probs.view(mask.shape).masked_fill(~mask, 0)
    for num_items in (None, 40, torch.tensor(40)):
        got, got_grad = value_and_grad(lambda z: build_loss("dft")(z, labels, num_items_in_batch=num_items), logits)
        torch.testing.assert_close(got, trl_dft(kernel_log_probs, num_items))

        def trl_on_logits(z):
            log_probs = F.log_softmax(z[:, :-1], -1).gather(-1, shift_labels.clamp(min=0)[..., None])[..., 0]
            return trl_dft(log_probs.masked_fill(~mask, 0), num_items)

        want, want_grad = value_and_grad(trl_on_logits, logits)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_grad, want_grad)


def test_gem_beta_one_has_ce_gradient():
    logits, labels, _ = make_batch()
    ce, ce_grad = value_and_grad(lambda z: build_loss("ce")(z, labels), logits)
    gem, gem_grad = value_and_grad(lambda z: build_loss("gem", beta=1.0)(z, labels), logits)
    torch.testing.assert_close(gem_grad, ce_grad)
    assert not torch.isclose(gem, ce)  # the value differs by the mean entropy
    _, gem07_grad = value_and_grad(lambda z: build_loss("gem")(z, labels), logits)
    assert not torch.allclose(gem07_grad, ce_grad)


def test_eaft_weight_carries_no_gradient():
    logits, labels, _ = make_batch()
    loss_fn = build_loss("eaft", topk=10)
    _, grad = value_and_grad(lambda z: loss_fn(z, labels), logits)
    pairs = valid_pairs(labels)
    weights = []
    for b, t, y in pairs:
        top = logits[b, t].topk(10).values
        w = float(ent(top) / math.log(10))
        weights.append(w)
        # d/dz of w * (-log p_y) with w constant is w * (softmax - onehot) / N
        expected = w * (torch.softmax(logits[b, t], 0) - F.one_hot(torch.tensor(y), 50)) / len(pairs)
        torch.testing.assert_close(grad[b, t], expected, rtol=1e-4, atol=1e-7)
    assert 0 < min(weights) and max(weights) <= 1
    torch.testing.assert_close(float(loss_fn.diagnostics["weight"]), float(np.mean(weights)), rtol=1e-5, atol=0)
    assert not loss_fn.diagnostics["weight"].requires_grad


def _eksft_example():
    """One sequence, V=5, two prompt tokens, five valid positions (logits rows 1..5).

    Row 2 is uniform (highest entropy); at row 4 the reference prefers another token (highest KL).
    Every other row is peaked and identical to the reference, and the targets give distinct log-probs.
    """
    V = 5
    logits = torch.full((1, 7, V), -4.0)
    peaks = {0: 0, 1: 1, 3: 2, 4: 3, 5: 4, 6: 0}
    for t, v in peaks.items():
        logits[0, t, v] = 4.0
    logits[0, 2] = 0.0
    logits[0, 3, 0] = 1.0
    logits[0, 5, 1] = 2.0
    ref = logits.clone()
    ref[0, 4] = logits[0, 4].flip(0)
    labels = torch.tensor([[-100, -100, 1, 0, 3, 1, 4]])  # labels[t+1] is predicted by row t
    return logits, labels, ref


def test_eksft_masks_hand_example_union_and_intersection():
    logits, labels, ref = _eksft_example()
    lp = F.log_softmax(logits[0], -1)
    nll = {t: -float(lp[t, labels[0, t + 1]]) for t in range(1, 6)}
    assert len(set(round(x, 3) for x in nll.values())) == 5  # distinct, so a wrong mask changes the value
    H = {t: float(ent(logits[0, t])) for t in range(1, 6)}
    ref_lp = F.log_softmax(ref[0], -1)
    KL = {t: float(F.kl_div(ref_lp[t], lp[t], log_target=True, reduction="sum")) for t in range(1, 6)}
    assert max(H, key=H.get) == 2 and max(KL, key=KL.get) == 4
    reg = -0.05 * H[2] / math.log(5) + 0.05 * KL[4]

    union = build_loss("eksft")  # ratio 0.2 * 5 tokens -> k = 1: S_H = {row 2}, S_KL = {row 4}
    got = union(logits, labels, ref_logits=ref)
    # the official normalisation: the mean over the 3 kept tokens
    assert got.item() == pytest.approx((nll[1] + nll[3] + nll[5]) / 3 + reg, rel=1e-5)
    # mask applied before the shift would drop the targets of rows 1 and 3 instead of 2 and 4
    assert got.item() != pytest.approx((nll[2] + nll[4] + nll[5]) / 3 + reg, rel=1e-3)
    over_all = build_loss("eksft", normalize="all")(logits, labels, ref_logits=ref)
    assert over_all.item() == pytest.approx((nll[1] + nll[3] + nll[5]) / 5 + reg, rel=1e-5)
    d = union.diagnostics
    fracs = [float(d[k]) for k in ("masked_entropy_frac", "masked_kl_frac", "masked_both_frac")]
    assert fracs == pytest.approx([0.2, 0.2, 0.0])
    assert float(d["masked_frac"]) == pytest.approx(0.4)

    inter = build_loss("eksft", union=False)  # disjoint S_H and S_KL: nothing is masked
    assert inter(logits, labels, ref_logits=ref).item() == pytest.approx(sum(nll.values()) / 5 + reg, rel=1e-5)
    assert float(inter.diagnostics["masked_frac"]) == 0

    ref2 = ref.clone()
    ref2[0, 4] = logits[0, 4]
    ref2[0, 2, 0] = 6.0  # now row 2 has both the top entropy and the top KL
    KL2 = float(F.kl_div(F.log_softmax(ref2[0, 2], -1), lp[2], log_target=True, reduction="sum"))
    reg2 = -0.05 * H[2] / math.log(5) + 0.05 * KL2
    for union_flag in (True, False):
        loss_fn = build_loss("eksft", union=union_flag)
        got = loss_fn(logits, labels, ref_logits=ref2).item()
        assert got == pytest.approx((sum(nll.values()) - nll[2]) / 4 + reg2, rel=1e-5)
        assert float(loss_fn.diagnostics["masked_both_frac"]) == pytest.approx(0.2)


def test_eksft_kl_is_true_kl():
    logits, labels, ref = make_batch()
    loss_fn = build_loss("eksft")
    loss_fn(logits, labels, ref_logits=ref)
    mask = labels[:, 1:] != -100
    p_log, r_log = F.log_softmax(logits[:, :-1][mask], -1), F.log_softmax(ref[:, :-1][mask], -1)
    kl = F.kl_div(r_log, p_log, log_target=True, reduction="none").sum(-1)
    assert (kl > 0).all()
    torch.testing.assert_close(loss_fn.diagnostics["kl"], kl.mean())
    assert float(loss_fn.diagnostics["kl"]) > 0

    # reference == policy: KL is 0, so the loss is CE over unmasked tokens minus the entropy bonus only
    same = loss_fn(logits, labels, ref_logits=logits)
    assert abs(float(loss_fn.diagnostics["kl"])) < 1e-6
    no_kl = build_loss("eksft", lambda_kl=0.0)(logits, labels, ref_logits=logits)
    torch.testing.assert_close(same, no_kl)


def test_eksft_ref_logits_get_no_gradient_and_are_required():
    logits, labels, ref = make_batch()
    ref = ref.requires_grad_(True)
    build_loss("eksft")(logits.requires_grad_(True), labels, ref_logits=ref).backward()
    assert ref.grad is None
    with pytest.raises(ValueError, match="ref_logits"):
        build_loss("eksft")(logits, labels)


@pytest.mark.parametrize("name,params", CASES)
def test_no_loss_tokens_gives_finite_zero(name, params):
    logits, _, ref = make_batch()
    labels = torch.full(logits.shape[:2], -100)
    loss_fn = build_loss(name, **params)
    z = logits.clone().requires_grad_(True)
    loss = loss_fn(z, labels, ref_logits=ref)
    assert loss.grad_fn is not None and loss.item() == 0
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() == 0
    assert all(math.isfinite(float(v)) for v in loss_fn.diagnostics.values())


@pytest.mark.parametrize("name,params", CASES)
def test_diagnostics(name, params):
    logits, labels, ref = make_batch()
    loss_fn = build_loss(name, **params)
    loss_fn(logits.clone().requires_grad_(True), labels, ref_logits=ref)
    d = {k: float(v) for k, v in loss_fn.diagnostics.items()}
    expected_keys = {"entropy", "confident_conflict_frac"} | {
        "eaft": {"weight"},
        "masked": {"masked_frac"},
        "eksft": {"kl", "masked_entropy_frac", "masked_kl_frac", "masked_both_frac", "masked_frac"},
    }.get(name, set())
    assert set(d) == expected_keys
    assert not any(v.requires_grad for v in loss_fn.diagnostics.values())
    for k, v in d.items():
        if k.endswith("frac") or k == "weight":
            assert 0 <= v <= 1, k

    pairs = valid_pairs(labels)
    H = np.array([float(ent(logits[b, t])) for b, t, _ in pairs])
    P = np.array([float(torch.softmax(logits[b, t], 0)[y]) for b, t, y in pairs])
    assert d["entropy"] == pytest.approx(H.mean(), rel=1e-5)
    conflicts = (H <= np.percentile(H, 15)) & (P <= np.percentile(P, 15))
    assert conflicts.any() and d["confident_conflict_frac"] == pytest.approx(conflicts.mean())
    if name == "masked" and not params:
        assert d["masked_frac"] == pytest.approx(conflicts.mean())
    if name == "eksft":
        full = {**DEFAULTS["eksft"], **params}
        k_frac = math.floor(full["ratio"] * len(pairs)) / len(pairs)
        assert k_frac > 0
        assert d["masked_entropy_frac"] + d["masked_both_frac"] == pytest.approx(k_frac)  # |S_H| = k
        assert d["masked_kl_frac"] + d["masked_both_frac"] == pytest.approx(k_frac)  # |S_KL| = k
        only_h, only_kl, both = d["masked_entropy_frac"], d["masked_kl_frac"], d["masked_both_frac"]
        expected = only_h + only_kl + both if full["union"] else both
        assert d["masked_frac"] == pytest.approx(expected)


def test_bf16_logits_are_upcast():
    logits, labels, _ = make_batch()
    got = build_loss("ce")(logits.bfloat16(), labels)
    assert got.dtype == torch.float32
    want = F.cross_entropy(logits.bfloat16().float()[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(got, want)


def test_unknown_name_and_parameters_raise():
    with pytest.raises(ValueError, match=r"allowed: \['ce', 'dft', 'eaft', 'eksft', 'gem', 'masked'\]"):
        build_loss("focal")
    with pytest.raises(ValueError, match=r"allowed: \['alpha', 'topk'\]"):
        build_loss("eaft", top_k=5)
    with pytest.raises(ValueError, match=r"allowed: \[\]"):
        build_loss("ce", beta=1.0)
    with pytest.raises(ValueError, match="'linear' or 'logsigmoid'"):
        build_loss("gem", h="tanh")
    invalid = [
        ("eaft", {"topk": 1}),
        ("eaft", {"topk": 20.0}),
        ("gem", {"beta": 0}),
        ("eksft", {"ratio": 1.5}),
        ("eksft", {"union": "yes"}),
        ("eksft", {"normalize": "mean"}),
        ("masked", {"quantile": -0.1}),
    ]
    for name, bad in invalid:
        with pytest.raises(ValueError, match=rf"loss '{name}': {next(iter(bad))}=.* is invalid \("):
            build_loss(name, **bad)


# ------------------------------------------------------------------- the chunked path


def make_hidden_batch(B=3, T=9, H=16, V=50, seed=0, bias=True):
    """Hidden states and LM heads (policy and reference) whose logits are a batch like make_batch's."""
    g = torch.Generator().manual_seed(seed)
    _, labels, _ = make_batch(B, T, V, seed)
    hidden = torch.randn(B, T, H, generator=g)
    head, ref_head = torch.nn.Linear(H, V, bias=bias), torch.nn.Linear(H, V, bias=bias)
    with torch.no_grad():
        for layer in (head, ref_head):
            layer.weight.copy_(torch.randn(V, H, generator=g))
            if bias:
                layer.bias.copy_(torch.randn(V, generator=g))
        ref_head.weight.add_(head.weight)
    ref_hidden = hidden + 0.3 * torch.randn(B, T, H, generator=g)
    return hidden, labels, head, ref_hidden, ref_head


def loss_and_grads(compute, hidden, head):
    hidden = hidden.clone().requires_grad_(True)
    head.zero_grad()
    loss = compute(hidden)
    loss.backward()
    grads = [hidden.grad, head.weight.grad] + ([head.bias.grad] if head.bias is not None else [])
    return loss.detach(), [g.clone() for g in grads]


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("name,params", CASES)
def test_chunked_equals_full_logits(name, params, chunk):
    hidden, labels, head, ref_hidden, ref_head = make_hidden_batch(bias=chunk != 4)
    num_items = 50
    full_fn, chunked_fn = build_loss(name, **params), build_loss(name, **params)

    def full(h):
        ref = ref_head(ref_hidden)
        return full_fn(head(h), labels, num_items_in_batch=num_items, ref_logits=ref)

    def chunked(h):
        return chunked_fn.chunked(h, head, labels, num_items_in_batch=num_items, ref_hidden=ref_hidden,
                                  ref_lm_head=ref_head, chunk_tokens=chunk)

    want, want_grads = loss_and_grads(full, hidden, head)
    got, got_grads = loss_and_grads(chunked, hidden, head)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        assert w.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert ref_head.weight.grad is None  # the reference is never trained
    assert chunked_fn.diagnostics.keys() == full_fn.diagnostics.keys()
    for key in full_fn.diagnostics:
        torch.testing.assert_close(chunked_fn.diagnostics[key], full_fn.diagnostics[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reference", ["logits", "top 5", "top V"])
@pytest.mark.parametrize("with_grad", [("logp",), ("entropy",), ("kl",), ("gem",), ("logp", "entropy", "kl", "gem")])
@pytest.mark.parametrize("gem", [(0.7, "linear"), (0.5, "logsigmoid")])
def test_closed_form_stats_gradient_is_autograds(reference, with_grad, gem):
    """The chunked backward's token_stats_grad against autograd through token_stats, each stat
    with its own upstream gradient; "top V" caches the whole vocabulary (the tail clamp's edge)."""
    from pipeline.losses.stats import Needs, TopK, token_stats, token_stats_grad

    g = torch.Generator().manual_seed(1)
    n, V = 7, 30
    z = (3 * torch.randn(n, V, generator=g)).requires_grad_()
    y = torch.randint(0, V, (n,), generator=g)
    ref = F.log_softmax(z.detach() + torch.randn(n, V, generator=g), dim=-1)
    if reference != "logits":
        top = ref.topk(5 if reference == "top 5" else V, dim=-1)
        ref = TopK(top.indices.int(), top.values)
    needs = Needs(reference=True, gem=gem)
    stats = token_stats(F.log_softmax(z, dim=-1), y, needs, ref)
    upstream = {name: torch.randn(n, generator=g) for name in with_grad}
    (want,) = torch.autograd.grad([getattr(stats, name) for name in upstream], z, list(upstream.values()))
    got = token_stats_grad(F.log_softmax(z.detach(), dim=-1), y, needs, ref, upstream, stats.entropy.detach())
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["eksft", "ce"])
def test_chunked_without_loss_tokens_is_a_finite_zero(name):
    hidden, labels, head, ref_hidden, ref_head = make_hidden_batch()
    loss_fn = build_loss(name)
    loss, grads = loss_and_grads(lambda h: loss_fn.chunked(h, head, torch.full_like(labels, -100),
                                                           ref_hidden=ref_hidden, ref_lm_head=ref_head), hidden, head)
    assert loss.item() == 0 and all(g.abs().sum() == 0 for g in grads)


def test_chunked_bf16_matches_float32():
    hidden, labels, head, _, _ = make_hidden_batch()
    want, want_grads = loss_and_grads(lambda h: build_loss("eaft").chunked(h, head, labels, chunk_tokens=5), hidden, head)
    head16 = torch.nn.Linear(16, 50).bfloat16()
    head16.load_state_dict(head.state_dict())
    got, got_grads = loss_and_grads(lambda h: build_loss("eaft").chunked(h, head16, labels, chunk_tokens=5),
                                    hidden.bfloat16(), head16)
    assert got.dtype == torch.float32 and got_grads[1].dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0.03, atol=0.03)
    torch.testing.assert_close(got_grads[1].float(), want_grads[1], rtol=0.05, atol=0.02)


def topk_of(ref_logits, labels, k):
    from pipeline.losses.stats import TopK

    ref_logp = F.log_softmax(ref_logits[:, :-1][labels[:, 1:] != -100], dim=-1)
    top = ref_logp.topk(k, dim=-1)
    return TopK(top.indices.int(), top.values)


def test_cached_topk_kl_is_exact_when_the_reference_tail_is_flat():
    logits, labels, ref = make_batch()
    ref[..., 5:] = 0.0  # the tail of the reference's distribution is uniform: its top 5 say all there is
    ref[..., :5] = 3 + ref[..., :5].abs()
    for lambda_kl in (0.05, 2.0):
        exact_fn, cached_fn = build_loss("eksft", lambda_kl=lambda_kl), build_loss("eksft", lambda_kl=lambda_kl)
        want, want_grad = value_and_grad(lambda z: exact_fn(z, labels, ref_logits=ref), logits)
        got, got_grad = value_and_grad(lambda z: cached_fn(z, labels, ref_topk=topk_of(ref, labels, 5)), logits)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cached_fn.diagnostics["kl"], exact_fn.diagnostics["kl"])


def test_cached_topk_kl_approaches_exact_as_k_grows():
    logits, labels, ref = make_batch()
    exact_fn = build_loss("eksft")
    exact_fn(logits, labels, ref_logits=ref)
    errors = []
    for k in (2, 10, 49):
        cached_fn = build_loss("eksft")
        cached_fn(logits, labels, ref_topk=topk_of(ref, labels, k))
        errors.append(abs(float(cached_fn.diagnostics["kl"] - exact_fn.diagnostics["kl"])))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5


def test_chunked_topk_reference_equals_full_logits():
    hidden, labels, head, ref_hidden, ref_head = make_hidden_batch()
    top = topk_of(ref_head(ref_hidden).detach(), labels, 8)
    full_fn, chunked_fn = build_loss("eksft"), build_loss("eksft")
    want, want_grads = loss_and_grads(lambda h: full_fn(head(h), labels, ref_topk=top), hidden, head)
    got, got_grads = loss_and_grads(lambda h: chunked_fn.chunked(h, head, labels, ref_topk=top, chunk_tokens=3), hidden, head)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_chunked_backward_projects_again_only_what_it_lacks(monkeypatch):
    """The backward reuses the forward's last chunk (policy and reference) and projects the
    reference again only at the tokens whose KL has a gradient (EKSFT's S_KL)."""
    from pipeline.losses import chunked
    from pipeline.losses.stats import select_tokens, topk_mask

    hidden, labels, head, ref_hidden, ref_head = make_hidden_batch()
    projected = []  # (which head, tokens) per projection
    real = chunked.chunk_logp

    def counting(h, weight, bias):
        projected.append(("policy" if weight is head.weight else "reference", len(h)))
        return real(h, weight, bias)

    monkeypatch.setattr(chunked, "chunk_logp", counting)
    loss = build_loss("eksft", ratio=0.25).chunked(hidden.clone().requires_grad_(), head, labels,
                                                   ref_hidden=ref_hidden, ref_lm_head=ref_head, chunk_tokens=4)
    with torch.no_grad():  # S_KL: the quarter of the tokens with the largest KL
        z, _, mask = select_tokens(head(hidden), labels)
        logp, ref = F.log_softmax(z, dim=-1), F.log_softmax(ref_head(ref_hidden)[:, :-1][mask], dim=-1)
        in_kl = topk_mask((logp.exp() * (logp - ref)).sum(-1), math.floor(0.25 * len(z)))
    n, last = len(z), 4 * ((len(z) - 1) // 4)  # the last chunk starts at `last`
    assert projected == [(which, min(4, n - start)) for start in range(0, n, 4) for which in ("policy", "reference")]
    projected.clear()
    loss.backward()
    assert [t for which, t in projected if which == "policy"] == [4] * (last // 4)  # every chunk but the last
    assert 0 < in_kl[:last].sum() < last
    assert sum(t for which, t in projected if which == "reference") == in_kl[:last].sum()


@pytest.mark.parametrize("name", ["ce", "dft", "eaft", "gem"])
def test_per_token_losses_take_their_gradient_in_the_forward(monkeypatch, name):
    """ce, dft, eaft and gem project each chunk once, in the forward; the backward only scales the
    gradient it kept (here by 3, a loss scaled before its backward), and a frozen head (LoRA) gets none."""
    from pipeline.losses import chunked

    hidden, labels, head, _, _ = make_hidden_batch()
    projected = []
    real = chunked.chunk_logp
    monkeypatch.setattr(chunked, "chunk_logp", lambda h, w, b: projected.append(len(h)) or real(h, w, b))
    want, want_grads = loss_and_grads(lambda h: 3 * build_loss(name)(head(h), labels), hidden, head)
    projected.clear()
    got, got_grads = loss_and_grads(lambda h: 3 * build_loss(name).chunked(h, head, labels, chunk_tokens=4), hidden, head)
    n = int((labels[:, 1:] != -100).sum())
    assert projected == [min(4, n - start) for start in range(0, n, 4)]  # the forward's, none in the backward
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    head.zero_grad(set_to_none=True)
    head.requires_grad_(False)
    h = hidden.clone().requires_grad_()
    build_loss(name).chunked(h, head, labels, chunk_tokens=4).backward()
    assert head.weight.grad is None and head.bias.grad is None
    torch.testing.assert_close(3 * h.grad, want_grads[0], rtol=1e-4, atol=1e-5)


def test_fused_backward_scales_bf16_gradients_in_float32():
    """A loss scaled before its backward (gradient accumulation) scales the kept bf16 gradient with a
    float32 factor: rounding 1/3 to bf16 first would make every gradient 0.2% too large."""
    hidden, labels, head, _, _ = make_hidden_batch()
    head16 = torch.nn.Linear(16, 50).bfloat16()
    head16.load_state_dict(head.state_dict())
    grads = {}
    for scale in (1.0, 1 / 3):
        head16.zero_grad(set_to_none=True)
        (build_loss("ce").chunked(hidden.bfloat16(), head16, labels, chunk_tokens=4) * scale).backward()
        grads[scale] = head16.weight.grad.clone()
    assert torch.equal(grads[1 / 3], (grads[1.0].float() * (1 / 3)).bfloat16())


def test_a_gpu_takes_larger_chunks_than_a_cpu():
    from pipeline.losses.chunked import tokens_per_chunk

    cpu, gpu = tokens_per_chunk(151936, torch.device("cpu")), tokens_per_chunk(151936, torch.device("cuda"))
    assert 100 < cpu < gpu and tokens_per_chunk(10**12, torch.device("cpu")) == 1


def test_chunked_loss_without_gradient_projects_the_forward_only(monkeypatch):
    """Evaluation (no_grad) takes no gradient, fused or not: one projection per chunk, the same value."""
    from pipeline.losses import chunked

    hidden, labels, head, _, _ = make_hidden_batch()
    projected = []
    real = chunked.chunk_logp
    monkeypatch.setattr(chunked, "chunk_logp", lambda h, w, b: projected.append(len(h)) or real(h, w, b))
    want = build_loss("eaft").chunked(hidden.requires_grad_(), head, labels, chunk_tokens=4)
    projected.clear()
    with torch.no_grad():
        got = build_loss("eaft").chunked(hidden, head, labels, chunk_tokens=4)
    assert sum(projected) == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(got, want.detach())


@pytest.mark.parametrize("name", ["eksft", "ce"])
def test_chunked_backward_twice_with_retain_graph(name):
    """A second backward gives the same gradient: eksft has no kept chunk to reuse then and projects
    every chunk; ce scales the gradient its forward kept, again."""
    hidden, labels, head, ref_hidden, ref_head = make_hidden_batch()
    h = hidden.clone().requires_grad_()
    loss = build_loss(name).chunked(h, head, labels, ref_hidden=ref_hidden, ref_lm_head=ref_head, chunk_tokens=4)
    (first,) = torch.autograd.grad(loss, h, retain_graph=True)
    (second,) = torch.autograd.grad(loss, h)
    assert first.abs().sum() > 0
    torch.testing.assert_close(second, first)


def test_eksft_with_every_token_masked_gives_a_finite_loss_of_its_regularisers():
    logits, labels, ref = make_batch()
    for normalize in ("kept", "all"):
        loss_fn = build_loss("eksft", ratio=1.0, lambda_entropy=0.0, lambda_kl=0.0, normalize=normalize)
        logits_grad = logits.clone().requires_grad_(True)
        loss = loss_fn(logits_grad, labels, ref_logits=ref)
        loss.backward()
        assert loss.item() == 0 and float(loss_fn.diagnostics["masked_frac"]) == 1.0
        assert torch.isfinite(logits_grad.grad).all() and logits_grad.grad.abs().sum() == 0


def test_a_losss_stage_key_settings_fill_in_its_defaults():
    """So that a changed default (EKSFT's `normalize`) is a new SFT key, never a reused result."""
    from pipeline.config.schema import LossConfig

    assert LossConfig(name="eksft").resolved() == LossConfig(name="eksft", normalize="kept", ratio=0.2).resolved() \
        == {"name": "eksft", "ratio": 0.2, "union": True, "lambda_entropy": 0.05, "lambda_kl": 0.05, "normalize": "kept"}
    assert LossConfig(name="eksft").resolved() != LossConfig(name="eksft", normalize="all").resolved()
    assert LossConfig(name="ce").resolved() == {"name": "ce"}
