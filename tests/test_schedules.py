import math

import pytest

from trb.schedules import Schedule


def test_linear_is_the_paper_schedule():
    s = Schedule("linear", start=0.01, horizon=25)
    assert s(0) == 0.01
    assert math.isclose(s(12), 0.01 * (1 - 12 / 25))
    assert math.isclose(s(24), 0.01 / 25)
    assert s(25) == 0.0 and s(400) == 0.0


def test_cosine():
    s = Schedule("cosine", start=0.02, horizon=10)
    assert s(0) == 0.02
    assert math.isclose(s(5), 0.01)
    assert 0 < s(9) < 0.02 * 0.03
    assert s(10) == 0.0 and s(11) == 0.0


def test_step():
    s = Schedule("step", start=1.0, horizon=30, milestones=(10, 20), gamma=0.5)
    assert [s(k) for k in (0, 9, 10, 19, 20, 29, 30, 100)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.0, 0.0]
    assert Schedule("step", start=0.3, horizon=4)(3) == 0.3  # no milestones: flat then 0


def test_constant_and_zero_horizon():
    assert Schedule("constant", start=0.05, horizon=0)(1000) == 0.05
    assert Schedule("linear", start=0.05, horizon=0)(0) == 0.0


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(shape="linear", start=-0.1, horizon=5), "start"),
        (dict(shape="linear", start=0.1, horizon=-1), "horizon"),
        (dict(shape="step", start=0.1, horizon=9, milestones=(5, 3)), "milestones"),
        (dict(shape="step", start=0.1, horizon=9, gamma=-2.0), "gamma"),
        (dict(shape="exp", start=0.1, horizon=9), "shape"),
    ],
)
def test_invalid_parameters_name_the_parameter(kwargs, word):
    with pytest.raises(ValueError, match=word):
        Schedule(**kwargs)
