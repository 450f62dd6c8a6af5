"""Detection metrics (see DESIGN.md, "Metric definitions")."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from scipy import stats


def auroc(positive_scores, negative_scores) -> float:
    """Area under the ROC curve: P(score(positive) > score(negative)), ties counting 1/2.

    Computed from average ranks (the Mann-Whitney U statistic), so it is exact
    with ties.

    Args:
      positive_scores: ``[P]`` scores of positives (e.g. imitator episodes).
      negative_scores: ``[N]`` scores of negatives.

    Returns:
      The AUROC in [0, 1].

    Raises:
      ValueError: if either class is empty (AUROC is undefined with one class).

    Example:
      >>> auroc([0.9, 0.4], [0.1, 0.4])
      0.875
    """
    positive = np.asarray(positive_scores, np.float64).reshape(-1)
    negative = np.asarray(negative_scores, np.float64).reshape(-1)
    if positive.size == 0 or negative.size == 0:
        raise ValueError(f"AUROC needs both classes; got {positive.size} positive and "
                         f"{negative.size} negative scores")
    ranks = stats.rankdata(np.concatenate([positive, negative]))
    positive_rank_sum = ranks[: positive.size].sum()
    u = positive_rank_sum - positive.size * (positive.size + 1) / 2
    return float(u / (positive.size * negative.size))


def pairwise_auroc(positive_scores, negative_scores):
    """:func:`auroc` as a traceable jnp expression (for metrics inside a jitted loop).

    Compares every positive with every negative (``O(P N)`` memory), so it is meant
    for the few hundred episodes a training iteration evaluates.
    """
    positive = jnp.reshape(positive_scores, (-1, 1))
    negative = jnp.reshape(negative_scores, (1, -1))
    return jnp.mean((positive > negative) + 0.5 * (positive == negative))
