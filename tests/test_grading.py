import time

import pytest

from trb.grading import Grader


@pytest.fixture(scope="module")
def grader():
    with Grader(workers=1, item_timeout_s=5.0) as g:
        yield g


CASES = [
    ("so \\boxed{51}", "51", True),
    ("so \\boxed{52}", "51", False),
    ("The answer is \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True),
    ("The answer is \\boxed{0.5}", "\\frac{1}{2}", True),
    ("first \\boxed{3} then \\boxed{4}", "4", True),
    ("no answer here", "4", False),
    ("The total is 1,234 dollars. \\boxed{1,234}", "1234", True),
    ("\\boxed{(3, \\frac{\\pi}{2})}", "(3, \\frac{\\pi}{2})", True),
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
