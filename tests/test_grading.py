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
    # percents (parsed on the grading workers' ANTLR 4.13.2 runtime; hydra's 4.9.3 reads 28\\% as 28):
    # math-verify reads 25\\% as 25/100 and accepts it for 0.25, 25% and (leniently) 25, never 26
    ("\\boxed{25\\%}", "25\\%", True),
    ("\\boxed{28\\%}", "28%", True),
    ("\\boxed{25\\%}", "0.25", True),
    ("\\boxed{12.5\\%}", "0.125", True),
    ("\\boxed{25\\%}", "25", True),
    ("\\boxed{25\\%}", "26", False),
    ("\\boxed{25\\%}", "0.26", False),
    ("so the rate is $15\\%$.", "$15\\%$", True),
    ("\\boxed{30\\%}", "$30\\%$", True),
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
    # several boxes: one set answer, as math-verify reads them; a single gold is the last box
    ("\\boxed{-3} \\text{ or } \\boxed{2}", "-3, 2", True),
    ("$x = \\boxed{4}$ and $y = \\boxed{7}$", "\\{4, 7\\}", True),
    ("\\boxed{(1, 3)}, \\boxed{(3, 1)}", "(1,3),(3,1)", True),
    ("\\boxed{2}, \\boxed{5}", "2, 5, 7", False),
    ("\\boxed{1} and \\boxed{2}", "1", False),
    ("\\boxed{5}. Wait, that is wrong: \\boxed{6}", "6", True),
    ("\\boxed{5}. Wait, that is wrong: \\boxed{6}", "5", False),
    # gold answers as given: $...$ kept, thousands separators, a decimal comma, LaTeX content
    ("\\boxed{1.22}", "1,22", True),  # one comma between digit groups that is no thousands group: a
    ("\\boxed{\\{1, 22\\}}", "1,22", True),  # decimal comma or a pair; either reading counts
    ("\\boxed{-2, 1}", "-2,1", True),
    ("\\boxed{-2.1}", "-2,1", True),
    ("\\boxed{-2.2}", "-2,1", False),
    ("\\boxed{1,234}", "1,234", True),  # a thousands group is a thousands group
    ("\\boxed{\\{1, 234\\}}", "1,234", False),
    ("\\boxed{1234567}", "1,234,567", True),
    ("\\boxed{\\frac12}", "$\\frac{1}{2}$", True),
    ("\\boxed{2}", "2\\sqrt{2}", False),
    ("\\boxed{2x+3}", "2x+3", True),
    ("\\boxed{2}", "2x+3", False),
    ("\\boxed{\\{1, 2, 3\\}}", "1,2,3", True),
    ("\\boxed{\\text{B}}", "\\text{B}", True),
    # only the last MAX_CHARS characters are read
    ("x" * 50_000 + " so \\boxed{7}", "7", True),
    ("\\boxed{7}" + " x" * 15_000, "7", False),
    # degrees of sloppiness
    ("The final answer is $\\boxed{42}$.", "42", True),
    ("$42$", "42", True),
]


@pytest.mark.parametrize("completion, gold, expected", CASES)
def test_grading_table(grader, completion, gold, expected):
    assert grader.grade([completion], [gold]) == [expected]


def test_workers_parse_with_the_antlr_runtime_of_the_newest_parser(grader):
    """`make install` puts antlr4-python3-runtime 4.13.2 on the workers' path (the main process
    keeps hydra's 4.9.3); without it percents do not parse."""
    import antlr4

    from trb.grading import GRADING_ANTLR

    grader.grade(["\\boxed{1}"], ["1"])
    assert grader.stats.antlr == GRADING_ANTLR and grader.stats.math_verify == "0.9.0"
    assert antlr4.__file__ and "antlr-" not in antlr4.__file__  # this process is untouched


def test_judge_returns_math_verifys_answer_and_a_vote_key(grader):
    out = grader.judge(["so \\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{1} and \\boxed{2}", "no answer", "x = 3"],
                       ["0.5", "1/2", "2", "4", "3"])
    assert [j.correct for j in out] == [True, True, True, False, True]
    assert out[0].extracted == "\\frac{1}{2}" and out[0].key == out[1].key == "1/2"  # they vote together
    assert out[2].extracted == "2" and out[2].key == "2"  # accepted on the last box
    assert out[3].extracted is None and out[3].key is None
    assert out[4].extracted == "3"
    wrong = grader.judge(["\\boxed{1} and \\boxed{2}"], ["7"])[0]
    assert not wrong.correct and wrong.key == "{1, 2}"  # math-verify's reading when nothing matched


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


def test_maj_at_k_votes_on_the_graders_parsed_answers(grader):
    from trb.evaluate import maj_at_k

    out = grader.judge(["\\boxed{3}", "\\boxed{0.5}", "so $\\frac{1}{2}$"], ["1/2"] * 3)
    assert [j.correct for j in out] == [False, True, True]
    assert maj_at_k([j.key for j in out], [j.correct for j in out], 3)  # 0.5 and 1/2 are one answer, 2 votes to 1


def test_without_the_grading_runtime_percents_fail_and_say_so(monkeypatch, tmp_path, capsys):
    import trb.grading as grading

    monkeypatch.setenv("TRB_GRADING_RUNTIME", str(tmp_path / "absent"))
    monkeypatch.setattr(grading, "_WARNED", False)
    with Grader(workers=1) as g:
        assert g.grade(["\\boxed{28\\%}"], ["0.28"]) == [False]  # hydra's ANTLR 4.9.3 reads 28\% as 28
        assert g.stats.antlr == "4.9.3"
    err = capsys.readouterr().err
    assert err.count("warning: grading workers") == 1 and "python -m trb.grading --install" in err
