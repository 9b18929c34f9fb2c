"""On-policy preference pairs: from a model's own scored samples, a correct completion is
"chosen" and an incorrect one of the same prompt "rejected".

Pairs come from the model being tuned, so each SFT arm of a comparison gets DPO data from its
own distribution. A prompt whose samples are all correct or all wrong gives no pair: there
is nothing to prefer; with `reference_chosen`, one whose samples are all wrong pairs its
reference answer (off-policy) with them instead, so that a model that has barely learnt the
task still gets pairs. TRL has no builder for this (its trainers take pairs as given).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass


@dataclass
class PairStats:
    prompts: int = 0
    prompts_paired: int = 0  # prompts that gave at least one pair
    prompts_all_correct: int = 0
    prompts_all_wrong: int = 0
    pairs: int = 0
    duplicates: int = 0  # repeats of a completion already drawn for the prompt (each text is used once)
    ambiguous: int = 0  # texts judged both right and wrong (a verifier that is not a function of the text)
    reference_chosen: int = 0  # pairs whose chosen side is the reference answer (`reference_chosen`)

    def as_metrics(self) -> dict[str, float]:
        metrics = {f"pairs/{k}": float(v) for k, v in asdict(self).items()}
        metrics["pairs/kept_prompt_frac"] = self.prompts_paired / self.prompts if self.prompts else 0.0
        return metrics


def as_message(prompt: str | list[dict], completion: str) -> str | list[dict]:
    """A completion in the prompt's format: TRL reads a chat prompt's answers as assistant turns."""
    return completion if isinstance(prompt, str) else [{"role": "assistant", "content": completion}]


def build_pairs(samples: list[dict], pairs_per_prompt: int, seed: int,
                reference_chosen: bool = False) -> tuple[list[dict], PairStats]:
    """`samples`: one row per prompt with `prompt`, `completions` and their `correct` flags (and
    any other fields, e.g. `id`, kept in the pairs; with `reference_chosen`, the `answer`). Each
    prompt gives up to `pairs_per_prompt` pairs of distinct completions, each completion used
    once; which ones is random but fixed by `seed` and the prompt's position."""
    pairs: list[dict] = []
    stats = PairStats(prompts=len(samples))
    for i, row in enumerate(samples):
        judged = list(zip(row["completions"], row["correct"], strict=True))
        # dict.fromkeys: distinct texts in first-seen order; a text judged both ways is on neither side.
        right = dict.fromkeys(c for c, ok in judged if ok)
        wrong = dict.fromkeys(c for c, ok in judged if not ok)
        ambiguous = right.keys() & wrong.keys()
        right, wrong = [c for c in right if c not in ambiguous], [c for c in wrong if c not in ambiguous]
        stats.duplicates += len(judged) - len({c for c, _ in judged})
        stats.ambiguous += len(ambiguous)
        if not wrong:
            stats.prompts_all_correct += bool(right)
        if not right:
            stats.prompts_all_wrong += bool(wrong)
        rng = random.Random(f"{seed}:{i}")
        rng.shuffle(right)
        rng.shuffle(wrong)
        kept = list(zip(right, wrong))[:pairs_per_prompt]
        if reference_chosen and not right and wrong:
            kept = [(row["answer"], rejected) for rejected in wrong[:pairs_per_prompt]]
            stats.reference_chosen += len(kept)
        extra = {k: v for k, v in row.items() if k not in ("prompt", "completions", "correct", "sampling")}
        for chosen, rejected in kept:
            pairs.append({**extra, "prompt": row["prompt"], "chosen": as_message(row["prompt"], chosen),
                          "rejected": as_message(row["prompt"], rejected)})
        stats.prompts_paired += bool(kept)
        stats.pairs += len(kept)
    return pairs, stats
