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
