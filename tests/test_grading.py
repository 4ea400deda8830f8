import time

import pytest

from trb.grading import Grader


@pytest.fixture(scope="module")
def grader():
    with Grader(workers=1, item_timeout_s=5.0) as g:
        yield g


CASES = [
    # GSM8K-style integers
    ("so \\boxed{51}", "51", True),
    ("so \\boxed{52}", "51", False),
    ("The answer is 72.", "72", True),
    ("#### 72", "72", True),
    ("She pays \\boxed{\\$18}.", "18", True),
    ("Total: \\boxed{1,234}", "1234", True),
    ("Total: \\boxed{1234}", "1,234", True),
    ("\\boxed{18.00}", "18", True),
    ("\\boxed{-5}", "-5", True),
    ("\\boxed{5}", "-5", False),
    ("\\boxed{0}", "0", True),
    ("I think it is 7, no wait, \\boxed{8}", "8", True),
    ("first \\boxed{3} then \\boxed{4}", "4", True),
    ("first \\boxed{4} then \\boxed{3}", "4", False),
    ("no answer here", "4", False),
    ("", "4", False),
    ("\\boxed{}", "4", False),
    # fractions and decimals
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{1/2}", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", False),
    ("\\boxed{0.333}", "\\frac{1}{3}", False),
    # percent: math-verify reads 25\\% as 0.25, so it matches a percent gold, not a bare 25
    ("\\boxed{25\\%}", "25\\%", True),
    ("\\boxed{25\\%}", "25", False),
    # radicals, pi
    ("\\boxed{2\\sqrt{2}}", "2\\sqrt{2}", True),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", True),
    ("\\boxed{3\\pi}", "3\\pi", True),
    ("\\boxed{\\pi}", "3\\pi", False),
    # tuples, intervals, sets
    ("\\boxed{(3, \\frac{\\pi}{2})}", "(3, \\frac{\\pi}{2})", True),
    ("\\boxed{(2, 3)}", "(3, 2)", False),
    ("\\boxed{[1, 5)}", "[1,5)", True),
    ("\\boxed{(1, 5)}", "[1,5)", False),
    ("\\boxed{(-\\infty, 2]}", "(-\\infty,2]", True),
    # text answers
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", True),
    ("\\boxed{\\text{Monday}}", "\\text{Monday}", True),
    # algebraic
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("\\boxed{x+1}", "x+2", False),
    ("\\boxed{y = 2x + 3}", "2x+3", True),
    # units
    ("\\boxed{10 \\text{ cm}}", "10", True),
    ("\\boxed{90^\\circ}", "90", True),
    # degrees of sloppiness
    ("The final answer is $\\boxed{42}$.", "42", True),
    ("$42$", "42", True),
]


@pytest.mark.parametrize("completion, gold, expected", CASES)
def test_grading_table(grader, completion, gold, expected):
    assert grader.grade([completion], [gold]) == [expected]


def test_adversarial_outputs_return_within_deadline(grader):
    bad = ["\\boxed{9^{9^{9^{9^{9}}}}}", "1+" * 50_000 + "1", "\\boxed{{{{{", "\x00\xff\x13junk\\frac{"]
    t0 = time.monotonic()
    out = grader.grade(bad + ["\\boxed{7}"], ["1"] * len(bad) + ["7"])
    assert out[-1] is True and not any(out[:-1])
    assert time.monotonic() - t0 < 5 * 5.0 + 30


def test_stuck_worker_is_killed_replaced_and_counted():
    """A deadline shorter than any grading forces the kill path: wrong, counted, worker replaced."""
    with Grader(workers=1, item_timeout_s=1e-4) as g:
        assert g.grade(["\\boxed{7}", "\\boxed{8}"], ["7", "8"]) == [False, False]
        assert g.stats.timeouts == 2
        first = g._pool[0]
        g.item_timeout_s = 10.0
        assert g.grade(["\\boxed{7}"], ["7"]) == [True]  # the replacement worker grades normally
        assert g._pool[0] is first and first.poll() is None


def test_adversarial_cost_is_bounded(grader):
    t0 = time.monotonic()
    out = grader.grade(["\\boxed{9^{9^{9^{9^{9}}}}}"], ["1"])
    assert out == [False] and time.monotonic() - t0 < 5.0 + 1
