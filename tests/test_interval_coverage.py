"""benchmarks.interval_coverage: the bootstrap's coverage on pairs of identical models."""

from __future__ import annotations

import pytest

from benchmarks import interval_coverage


def test_intervals_that_hold_the_calibration_fixed_miss_two_identical_models_difference(capsys):
    """Two honest models with one score distribution, each calibrated on its own 40
    episodes and scored on 400 test episodes: the honest-vs-honest AUROC's interval
    should cover 0.5 in about 95% of such pairs. Holding each model's calibration fixed,
    it covers far less (all of a model's p-values move with its calibration set, which
    that bootstrap never redraws); redrawing the calibration puts it near nominal."""
    found = interval_coverage.main(["--trials", "60", "--resamples", "300"])
    assert found["fixed"] < 0.7
    assert found["resampled"] > 0.85
    assert "covers 0.5 in" in capsys.readouterr().out


def test_bad_settings_are_one_line_errors(capsys):
    with pytest.raises(SystemExit):
        interval_coverage.main(["--calibration", "1"])
    assert "calibration must be an integer >= 2; got 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="trials must be an integer >= 2"):
        interval_coverage.coverage(trials=0)


def test_the_modules_examples_hold():
    import doctest

    result = doctest.testmod(interval_coverage)
    assert result.attempted > 0 and result.failed == 0
