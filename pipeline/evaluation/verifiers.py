"""Verifiers: decide whether a completion is correct. Each has the shape
``verify(completion: str, answer: str | dict) -> bool`` (for `code`, the answer is the problem:
prompt, test, entry_point); ``get_verifier`` returns one by name."""

from __future__ import annotations

import functools
import json
import re
import secrets
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

from pipeline.sandbox import code_harness
from pipeline.sandbox.isolation import require_isolation, run_untrusted

HARNESS = Path(code_harness.__file__).read_text()  # the script each verdict runs, read once

Verifier = Callable[[str, "str | dict"], bool]

# End-of-sequence markers of the common chat templates; the demo tasks' answers never contain them.
EOS_MARKERS = ("</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<eos>")


def verify_exact(completion: str, answer: str) -> bool:
    """The first line of the completion (cut at an EOS marker), stripped, equals the stripped answer."""
    if not completion:
        return False
    text = completion.lstrip()
    for marker in (*EOS_MARKERS, "\n"):
        text = text.split(marker, 1)[0]
    return text.strip() == str(answer).strip()


# A number: optional sign (not a hyphen inside a word), thousands separators, decimals, a fraction.
_NUM = r"(?:(?<![\w.])[-+])?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?:(?<![\w.])[-+])?\.\d+"
_NUMBER = re.compile(rf"(?:{_NUM})(?:\s*/\s*(?:\d+(?:\.\d+)?))?")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_HASHES = re.compile(r"####\s*(.+)")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+)", re.IGNORECASE)
_REL_TOL = Fraction(1, 10**6)


def extract_final_answer(text: str) -> str | None:
    """The final answer in a completion or GSM8K reference solution, by priority:
    ``\\boxed{...}``, then ``#### X``, then "answer is X", then the last number in the text."""
    if (boxed := _last_boxed(text)) is not None:
        return boxed
    for pattern in (_HASHES, _ANSWER_IS):
        if matches := pattern.findall(text):
            return matches[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def to_number(answer: str) -> Fraction | None:
    """The first number in an answer string, as an exact Fraction (None when there is none)."""
    text = _FRAC.sub(r"(\1)/(\2)", answer.replace("−", "-").replace("{,}", ","))
    text = text.replace("(", "").replace(")", "")
    if (match := _NUMBER.search(text)) is None:
        return None
    numerator, _, denominator = re.sub(r"[,\s]", "", match.group()).partition("/")
    try:
        return Fraction(numerator) / Fraction(denominator or 1)
    except (ValueError, ZeroDivisionError):  # 1/0, or more digits than int() accepts
        return None


def verify_math(completion: str, answer: str | int | float) -> bool:
    """GSM8K-style: final answers compared as numbers (relative tolerance 1e-6); ``answer`` may be a bare
    value or a reference solution ending in ``#### X``. Non-numeric answers are compared as strings."""
    if not completion:
        return False
    got, want = extract_final_answer(completion), extract_final_answer(str(answer))
    if got is None or want is None:
        return False
    got_n, want_n = to_number(got), to_number(want)
    if want_n is None:
        return _clean(got) == _clean(want)
    return got_n is not None and abs(got_n - want_n) <= _REL_TOL * max(abs(got_n), abs(want_n))


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):  # braces may nest: \boxed{\frac{3}{4}}
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i]
            depth -= 1
    return None


def _clean(answer: str) -> str:
    return answer.strip().rstrip(".").replace("$", "").strip().lower()


def verify_code(completion: str, problem: dict, *, timeout_s: float = 10.0, isolation: str = "bubblewrap") -> bool:
    """HumanEval-style: the program (``code_program``) runs in the sandbox and ``problem["test"]``'s
    ``check(candidate)`` calls it; correct only if the harness reports, after ``check`` returned,
    that every test passed (pipeline/sandbox/code_harness.py says why a program cannot forge that)."""
    nonce = secrets.token_hex(16)
    payload = {"nonce": nonce, "program": code_program(completion, problem), **problem}
    result = run_untrusted(HARNESS, stdin=json.dumps(payload).encode(), timeout_s=timeout_s,
                           unsafe=isolation == "none")
    verdicts = [line.removeprefix(nonce + " ") for line in result.stdout.splitlines() if line.startswith(nonce)]
    return verdicts == ["passed"] and result.killed_reason is None


# Where a base model's continuation of a HumanEval prompt ends (the Codex paper's stop sequences):
# what follows is not the function's body.
CONTINUATION_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def code_program(completion: str, problem: dict) -> str:
    """The solution the tests run against. A text prompt (its imports, helpers and the function's
    signature) comes first; then the completion's code: its first fenced block (a chat model's
    answer, which may define the whole function again), else the completion as a continuation of
    the prompt, cut at the first ``CONTINUATION_STOPS`` (HumanEval's base-model convention).
    After a chat prompt, the completion's code alone."""
    blocks = _FENCE.findall(completion)
    if blocks:
        code = next((c for lang, c in blocks if lang), blocks[0][1])
        return f"{problem['prompt']}\n{code}" if isinstance(problem["prompt"], str) else code
    if not isinstance(problem["prompt"], str):
        return completion
    ends = [i for i in (completion.find(stop) for stop in CONTINUATION_STOPS) if i >= 0]
    return problem["prompt"] + completion[: min(ends, default=len(completion))]


_FENCE = re.compile(r"```(python|py)?[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def _require_opt_in(allow_untrusted_code: bool) -> None:
    if not allow_untrusted_code:
        raise PermissionError(
            "The 'code' verifier executes model-written code, which is off by default. Set "
            "evaluate.allow_untrusted_code: true to enable it, after reading what pipeline/sandbox/isolation.py "
            "does and does not guarantee."
        )


VERIFIERS: dict[str, Callable[..., bool]] = {"exact": verify_exact, "math": verify_math, "code": verify_code}


def get_verifier(name: str, *, allow_untrusted_code: bool = False, code_isolation: str = "bubblewrap",
                 code_timeout_s: float = 10.0) -> Verifier:
    """The verifier called ``name``. For "code" the opt-in and the sandbox are checked now, so a
    run fails before it samples."""
    if name not in VERIFIERS:
        raise ValueError(f"Unknown verifier {name!r}; allowed: {sorted(VERIFIERS)}")
    if name == "code":
        _require_opt_in(allow_untrusted_code)
        if code_isolation == "bubblewrap":
            require_isolation()
        return functools.partial(verify_code, timeout_s=code_timeout_s, isolation=code_isolation)
    return VERIFIERS[name]
