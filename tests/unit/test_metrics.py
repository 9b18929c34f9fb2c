"""Pass@k, the verifiers that decide which samples count as correct (c in pass@k), and the
answer-entropy pass's batches."""

import math

import pytest

from pipeline.evaluation.answer_entropy import batches
from pipeline.evaluation.metrics import pass_at_k, pass_at_k_table
from pipeline.evaluation.verifiers import VERIFIERS, extract_final_answer, get_verifier, verify_exact, verify_math


# --- pass@k -------------------------------------------------------------------------------------

def test_pass_at_k_matches_exact_binomials():
    for n in range(1, 41):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)  # large n: no overflow


@pytest.mark.parametrize(("n", "c", "k"), [(3, 1, 4), (5, 6, 1), (5, -1, 1), (5, 1, 0), (0, 0, 1)])
def test_pass_at_k_rejects_invalid(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_pass_at_k_message_names_n_and_k():
    with pytest.raises(ValueError, match=r"n >= K samples per problem: got n=3, k=4"):
        pass_at_k(3, 1, 4)


def test_table_reports_only_supported_k_and_averages():
    table = pass_at_k_table([(10, 0), (10, 10), (10, 5)], ks=[1, 5, 10, 20])
    assert sorted(table) == [1, 5, 10]
    assert table[1] == pytest.approx((0 + 1 + 0.5) / 3)
    assert table[10] == pytest.approx(2 / 3)


def test_table_uses_smallest_n():
    assert sorted(pass_at_k_table([(4, 1), (8, 2)], ks=[1, 4, 8])) == [1, 4]
    with pytest.raises(ValueError):
        pass_at_k_table([], ks=[1])


# --- exact ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("completion", "ok"),
    [("42", True), ("  42  \nmore text", True), ("42</s>junk", True), ("42<|im_end|>", True),
     ("\n42\n", True), ("421", False), ("4 2", False), ("", False), ("None", False), ("42.0", False)],
)
def test_exact(completion, ok):
    assert verify_exact(completion, "42") is ok


# --- math -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("completion", "answer", "ok"),
    [
        ("So she pays 18 + 54 = 72 dollars.\n#### 72", "72", True),
        ("The answer is 1,000.", "1000", True),
        ("The answer is $1,000.", "#### 1000", True),
        ("Total: \\boxed{3/4}", "0.75", True),
        ("Total: \\boxed{\\frac{3}{4}}", "0.75", True),
        ("\\boxed{\\dfrac{-1}{2}}", "-0.5", True),
        ("The answer is -5", "-5", True),
        ("The answer is +5", "5", True),
        ("so 50%", "50", True),
        ("I think 7, no wait, 12.", "12", True),
        ("0.3333333", "1/3", True),  # within 1e-6 relative
        ("0.333", "1/3", False),
        ("#### 71", "Natalia sold 48/2 = 24 clips in May.\n#### 72", False),
        ("#### 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", True),
        ("\\boxed{72} but the answer is 73", "72", True),  # boxed has priority
        ("it is 5-3", "3", True),  # a hyphen between numbers is not a minus sign
        ("", "72", False),
        (None, "72", False),
        ("None", "72", False),
        ("no idea at all", "72", False),
        ("\\boxed{", "72", False),
        ("\\boxed{1/0}", "72", False),
        ("9" * 5000, "72", False),  # more digits than int() accepts: rejected, not a crash
        ("123456789012345678901234567890", "123456789012345678901234567890", True),
        ("\\boxed{x^2}", "#### x^2", True),  # non-numeric: compared as strings
    ],
)
def test_math(completion, answer, ok):
    assert verify_math(completion, answer) is ok


def test_extract_final_answer_priority():
    assert extract_final_answer("answer is 3 \n#### 4") == "4"
    assert extract_final_answer("the answer is 3 and then 5") == "3 and then 5"
    assert extract_final_answer("a 1 b 2 c") == "2"
    assert extract_final_answer("nothing") is None


# --- registry and the code opt-in -------------------------------------------------------------------

def test_registry():
    assert set(VERIFIERS) == {"exact", "math", "code"}
    assert get_verifier("math") is verify_math
    with pytest.raises(ValueError, match="allowed: \\['code', 'exact', 'math'\\]"):
        get_verifier("regex")


def test_code_verifier_is_off_by_default():
    with pytest.raises(PermissionError, match="evaluate.allow_untrusted_code"):
        get_verifier("code")


# --- the answer-entropy pass's batches -----------------------------------------------------------

def test_entropy_batches_fill_the_token_budget_padded_to_their_longest_row():
    lengths = [3, 5, 2, 2, 9, 1, 4, 30, 2]
    spans = batches(lengths, 10)
    assert [list(s) for s in spans] == [[0, 1], [2, 3], [4], [5, 6], [7], [8]]
    for span in spans:  # within the budget, but for a row too long for it, which goes alone
        assert max(lengths[i] for i in span) * len(span) <= 10 or len(span) == 1
    for a, b in zip(spans, spans[1:]):  # no batch could have taken the next row
        assert max(lengths[i] for i in [*a, b[0]]) * (len(a) + 1) > 10
    assert [list(s) for s in batches([4] * 8, 8192)] == [list(range(8))]
    assert batches([], 10) == []
