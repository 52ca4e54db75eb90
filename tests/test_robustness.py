"""Effective robustness: exact values on hand-computed lines."""
import math

import numpy as np
import pytest

from genrobust import robustness as rb


def _sig(z):
    return 1 / (1 + math.exp(-z))


def _lg(p):
    return math.log(p / (1 - p))


def test_fit_recovers_a_hand_made_line():
    xs = [0.6, 0.7, 0.8, 0.9]
    ys = [_sig(0.5 * _lg(x) - 1.0) for x in xs]
    line = rb.fit_line(xs, ys)
    assert line.slope == pytest.approx(0.5, abs=1e-9)
    assert line.intercept == pytest.approx(-1.0, abs=1e-9)
    assert line.n == 4


def test_points_on_the_line_have_zero_er_and_offsets_are_exact():
    xs = [0.6, 0.7, 0.8, 0.9]
    ys = [_sig(0.5 * _lg(x) - 1.0) for x in xs]
    line = rb.fit_line(xs, ys)
    on = _sig(0.5 * _lg(0.75) - 1.0)
    assert rb.effective_robustness(0.75, on, line) == pytest.approx(0.0, abs=1e-12)
    # x = 0.5: logit 0, predicted sigmoid(-1) = 0.268941...; measured 0.40 -> ER 0.131058...
    assert rb.effective_robustness(0.5, 0.40, line) == pytest.approx(0.40 - 0.2689414213699951, abs=1e-12)


def test_too_few_points_nan_and_flat_x_are_errors():
    with pytest.raises(ValueError, match="at least 3"):
        rb.fit_line([0.6, 0.7], [0.3, 0.4])
    with pytest.raises(ValueError, match="NaN"):
        rb.fit_line([0.6, 0.7, float("nan")], [0.3, 0.4, 0.5])
    with pytest.raises(ValueError, match="same in-distribution"):
        rb.fit_line([0.7, 0.7, 0.7], [0.3, 0.4, 0.5])


def test_accuracies_of_0_or_1_are_clipped_with_a_warning(caplog):
    line = rb.fit_line([0.5, 0.8, 1.0], [0.2, 0.5, 0.9])
    assert math.isfinite(line.slope) and math.isfinite(line.intercept)
    assert "clipped" in caplog.text


def test_bootstrap_interval_is_zero_width_for_exact_lines_and_seeded():
    xs = np.linspace(0.55, 0.95, 8)
    ys = [_sig(0.8 * _lg(x) - 0.5) for x in xs]
    lo, hi = rb.bootstrap_interval(xs, ys, 0.7, _sig(0.8 * _lg(0.7) - 0.5) + 0.05, n=200)
    assert lo == pytest.approx(0.05, abs=1e-9) and hi == pytest.approx(0.05, abs=1e-9)
    noisy = np.array(ys) + np.linspace(-0.02, 0.02, 8)[::-1] * np.array([1, -1] * 4)
    a = rb.bootstrap_interval(xs, noisy, 0.7, 0.5, n=200, seed=1)
    assert a == rb.bootstrap_interval(xs, noisy, 0.7, 0.5, n=200, seed=1)
    assert a[0] < a[1]


def test_relative_robustness():
    assert rb.relative_robustness(0.8, 0.75) == pytest.approx(0.05)
