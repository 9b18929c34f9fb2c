"""Verifiers: decide whether a completion is correct. Each has the shape
``verify(completion: str, answer: str | dict) -> bool``; ``get_verifier`` returns one by name."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from fractions import Fraction

from pipeline.sandbox import run_untrusted

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


def verify_code(
    completion: str, answer: dict, *, allow_untrusted_code: bool = False, timeout_s: float = 5.0
) -> bool:
    """Run the completion's code followed by ``answer["tests"]`` in the sandbox; correct if it exits 0.
    With an ``entry_point`` and HumanEval-style tests (``def check(candidate)``), ``check`` is called."""
    _require_opt_in(allow_untrusted_code)
    if not completion:
        return False
    program = f"{extract_code(completion)}\n\n{answer['tests']}\n"
    if answer.get("entry_point") and "def check(" in answer["tests"]:
        program += f"\ncheck({answer['entry_point']})\n"
    return run_untrusted(program, timeout_s=timeout_s).passed


_FENCE = re.compile(r"```(python|py)?[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The first ```python fenced block (else the first fenced block, else the whole completion)."""
    blocks = _FENCE.findall(completion)
    python_blocks = [code for lang, code in blocks if lang]
    if python_blocks or blocks:
        return (python_blocks or [code for _, code in blocks])[0]
    return completion


def _require_opt_in(allow_untrusted_code: bool) -> None:
    if not allow_untrusted_code:
        raise PermissionError(
            "The 'code' verifier executes model-written code, which is off by default. Set "
            "evaluate.allow_untrusted_code: true to enable it, after reading what pipeline/sandbox.py "
            "does and does not guarantee."
        )


VERIFIERS: dict[str, Callable[..., bool]] = {"exact": verify_exact, "math": verify_math, "code": verify_code}


def get_verifier(name: str, *, allow_untrusted_code: bool = False) -> Verifier:
    """The verifier called ``name``; for "code" the opt-in is checked now, so a run fails before sampling."""
    if name not in VERIFIERS:
        raise ValueError(f"Unknown verifier {name!r}; allowed: {sorted(VERIFIERS)}")
    if name == "code":
        _require_opt_in(allow_untrusted_code)
        return functools.partial(verify_code, allow_untrusted_code=True)
    return VERIFIERS[name]
