"""Pass@k: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code")."""

from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples, drawn without replacement from n samples of which
    c are correct, is correct: ``1 - C(n-c, k) / C(n, k)``.

    Computed as ``1 - prod(1 - k / arange(n-c+1, n+1))`` so that large n does not overflow the binomials.
    """
    if k < 1 or c < 0:
        raise ValueError(f"Pass@K needs k >= 1 and c >= 0: got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"Pass@K needs n >= K samples per problem: got n={n}, k={k}")
    if c > n:
        raise ValueError(f"Pass@K needs c <= n (correct samples out of n): got n={n}, c={c}")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_table(results: list[tuple[int, int]], ks: list[int]) -> dict[int, float]:
    """Mean pass@k over problems, given per-problem ``(n, c)`` pairs.

    Only the K that every problem can support are reported: K <= min(n) over problems (normally all
    problems share n; if they do not, the smallest n decides, so no problem is silently dropped).
    """
    if not results:
        raise ValueError("pass_at_k_table needs at least one (n, c) result")
    n_min = min(n for n, _ in results)
    return {
        k: float(np.mean([pass_at_k(n, c, k) for n, c in results]))
        for k in sorted(set(ks))
        if k <= n_min
    }


def sample_counts(scored: list[dict]) -> list[tuple[int, int]]:
    """Per-prompt ``(n, c)`` from scored rows (each with its samples' ``correct`` flags)."""
    return [(len(r["correct"]), sum(r["correct"])) for r in scored]


def mean_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval over independent runs (seeds): (mean, low, high)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        raise ValueError(f"an interval needs two values at least, got {len(x)}")
    half = stats.t.ppf((1 + confidence) / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def paired_bootstrap(diff: np.ndarray, resamples: int, seed: int = 0, confidence: float = 0.95) -> dict[str, float]:
    """Paired differences `diff[seed, problem]` (arm minus baseline, same problem and seed):
    the mean, a percentile interval and a two-sided p-value for "no difference", from a
    bootstrap that resamples seeds and problems both, so both kinds of noise are in the interval.
    (scipy.stats.bootstrap resamples one axis of independent observations; this needs two.)"""
    rng = np.random.default_rng(seed)
    seeds, problems = diff.shape
    means = []
    for size in [1000] * (resamples // 1000) + [resamples % 1000]:  # bounded memory for many problems
        rows = rng.integers(seeds, size=(size, seeds, 1))
        cols = rng.integers(problems, size=(size, 1, problems))
        means.append(diff[rows, cols].mean(axis=(1, 2)))
    means = np.concatenate(means)
    tail = (1 - confidence) / 2
    p = min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean()))
    return {"diff": float(diff.mean()), "low": float(np.quantile(means, tail)),
            "high": float(np.quantile(means, 1 - tail)), "p": float(p)}
