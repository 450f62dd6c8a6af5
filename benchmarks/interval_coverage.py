"""How often the honest-vs-honest interval covers 0.5: the bootstrap with and without the
calibration episodes redrawn, on pairs of identical models.

Two honest models with one score distribution, each with its own calibration episodes
and its own test episodes, are audited against each other as the honest-vs-honest
control is (:func:`audit.figures.seed_figures` with ``control=True``): their true AUROC is
0.5, so a 95% interval should cover 0.5 in about 95% of such pairs. This module draws
``trials`` pairs and counts how often it does, with the two bootstraps of
:func:`audit.figures.compute`:

- ``fixed``: test windows resampled, every p-value computed once against the model's
  calibration set;
- ``resampled``: the calibration episodes drawn again in every resample and every
  p-value recomputed against them (:func:`audit.figures.calibrated_seed_figures`).

All of a model's p-values move together with its calibration set, so the first leaves
out a variance that the second carries. Scores are one-step standard normal episodes
with smoothed p-values: the simulation measures the bootstrap, not a detector.

``python -m benchmarks.interval_coverage`` prints both coverages (``--calibration`` and
``--test`` episodes a model, ``--trials`` pairs, ``--resamples`` per interval,
``--seed``).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence

import numpy as np

from audit import figures, metrics

ALPHA = 0.05


def _pair(rng: np.random.Generator, calibration: int, test: int) -> tuple:
    """One pair's arrays for :func:`audit.figures.calibrated_seed_figures` (no positives:
    the control row reads every window of the one model against the other's)."""
    def windows():  # length 1, smoothing draw, score
        return np.stack([np.ones(test), 1.0 - rng.random(test), rng.normal(size=test)], axis=1)

    def episodes():  # length 1, running score
        return np.stack([np.ones(calibration), rng.normal(size=calibration)], axis=1)

    no_positive = np.full((1, figures.RAW_POSITIVE_COLUMNS + 1), np.nan)
    return (no_positive, windows(), windows(), episodes(), episodes(), rng.normal(size=16))


def _fixed(pair: tuple) -> tuple:
    """The same pair as :func:`audit.figures.seed_figures` takes it: p-values computed once."""
    _, own, other, own_calibration, other_calibration, demo = pair

    def p_values(windows, episodes):
        return metrics.time_matched_p_values(
            windows[:, 2], windows[:, 0].astype(int), episodes[:, 1:],
            episodes[:, 0].astype(int), uniform=windows[:, 1])[:, None]

    return (np.full((1, figures.POSITIVE_COLUMNS), np.nan), p_values(own, own_calibration),
            p_values(other, other_calibration), own_calibration[:, 1], demo)


def coverage(calibration: int = 40, test: int = 400, trials: int = 100, resamples: int = 400,
             seed: int = 0) -> dict[str, float]:
    """The share of ``trials`` identical pairs whose honest-vs-honest AUROC interval covers 0.5.

    Args:
      calibration: calibration episodes per model.
      test: test episodes per model.
      trials: pairs drawn.
      resamples: bootstrap resamples per interval.
      seed: seed of the pairs and of the bootstraps.

    Returns:
      ``{"fixed": share, "resampled": share}``.

    Example:
      >>> found = coverage(calibration=20, test=50, trials=4, resamples=50)
      >>> sorted(found)
      ['fixed', 'resampled']
    """
    for name, value in (("calibration", calibration), ("test", test), ("trials", trials),
                        ("resamples", resamples)):
        if int(value) != value or value < 2:
            raise ValueError(f"{name} must be an integer >= 2; got {value!r}")
    rng = np.random.default_rng(seed)
    auroc = figures.FIGURES.index("auroc")
    keywords = dict(alpha=ALPHA, budgets=(), control=True)
    statistics = {
        "fixed": (functools.partial(figures.seed_figures, **keywords),
                  functools.partial(figures.resampled_seed_figures, **keywords)),
        "resampled": (functools.partial(figures.calibrated_seed_figures, **keywords),
                      functools.partial(figures.resampled_calibrated_seed_figures, **keywords)),
    }
    covered = dict.fromkeys(statistics, 0)
    for trial in range(trials):
        pair = _pair(rng, calibration, test)
        for name, (statistic, resampled) in statistics.items():
            arrays = _fixed(pair) if name == "fixed" else pair
            _, low, high = metrics.nested_bootstrap_ci(
                statistic, [arrays], resamples=resamples, seed=seed * 100_003 + trial,
                resampled_statistic=resampled)
            covered[name] += bool(low[auroc] <= 0.5 <= high[auroc])
    return {name: count / trials for name, count in covered.items()}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Prints how often each bootstrap's interval covers 0.5 for identical pairs."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--calibration", type=int, default=40)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--resamples", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        found = coverage(args.calibration, args.test, args.trials, args.resamples, args.seed)
    except ValueError as error:
        parser.error(str(error))
    print(f"{args.trials} pairs of identical models, {args.calibration} calibration and "
          f"{args.test} test episodes each, {args.resamples} resamples: the honest-vs-honest "
          f"AUROC's 95% interval covers 0.5 in {found['fixed']:.0%} of pairs with the "
          f"calibration fixed, {found['resampled']:.0%} with it redrawn")
    return found


if __name__ == "__main__":
    main()
