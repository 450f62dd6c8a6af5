"""Tests of audit.metrics against scikit-learn, brute-force references and hand-computed cases."""

from __future__ import annotations

import doctest
import itertools
import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from audit import metrics
from audit.metrics import (
    audit_budget_curve,
    auroc,
    average_precision,
    bootstrap_ci,
    caught_before_harm,
    fpr_at_threshold,
    nested_bootstrap_ci,
    pairwise_auroc,
    threshold_at_fpr,
    tpr_at_threshold,
)

FAST = settings(max_examples=40, deadline=None)

# Scores that are exact in float32 (so the jnp metric sees the same ties): either small
# integers (heavy ties) or float32 values.
tied_scores = st.integers(0, 3).map(float)
# (No subnormals: XLA on CPU flushes them to zero, which would add ties in float32.)
float32_scores = st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32)


def score_lists(min_size: int = 1, max_size: int = 25):
    return st.one_of(st.lists(tied_scores, min_size=min_size, max_size=max_size),
                     st.lists(float32_scores, min_size=min_size, max_size=max_size))


@st.composite
def two_classes(draw, min_size: int = 1, max_size: int = 25):
    """(positives, negatives), both from the same kind of scores (ties or floats)."""
    element = draw(st.sampled_from([tied_scores, float32_scores]))
    positives = draw(st.lists(element, min_size=min_size, max_size=max_size))
    negatives = draw(st.lists(element, min_size=min_size, max_size=max_size))
    return np.asarray(positives), np.asarray(negatives)


def labelled(positives, negatives):
    labels = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    return labels, np.r_[positives, negatives]


# ---------------------------------------------------------------------------------------------
# AUROC and average precision


@FAST
@given(two_classes())
def test_auroc_matches_sklearn(classes):
    positives, negatives = classes
    labels, scores = labelled(positives, negatives)
    assert auroc(positives, negatives) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@FAST
@given(two_classes())
def test_average_precision_matches_sklearn(classes):
    positives, negatives = classes
    labels, scores = labelled(positives, negatives)
    assert average_precision(positives, negatives) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12)


jitted_pairwise_auroc = jax.jit(pairwise_auroc)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([tied_scores, float32_scores]), st.sampled_from([(1, 6), (5, 1), (7, 4)]),
       st.data())
def test_pairwise_auroc_equals_auroc(element, sizes, data):
    # A few fixed shapes, so that the jitted function compiles only a few times.
    positives, negatives = (
        np.asarray(data.draw(st.lists(element, min_size=size, max_size=size)), np.float32)
        for size in sizes)
    value = jitted_pairwise_auroc(positives, negatives)
    assert float(value) == pytest.approx(auroc(positives, negatives), abs=1e-6)


def test_pairwise_auroc_accepts_array_likes_and_flattens():
    assert float(pairwise_auroc([0.9, 0.4], [0.1, 0.4])) == pytest.approx(0.875)
    assert float(pairwise_auroc(np.array([[1, 2], [3, 4]]), np.array([2]))) == pytest.approx(
        auroc([1, 2, 3, 4], [2]))


@FAST
@given(two_classes(max_size=8))
def test_auroc_is_the_pairwise_probability(classes):
    positives, negatives = classes
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0
             for p in positives for n in negatives]
    assert auroc(positives, negatives) == pytest.approx(np.mean(pairs), abs=1e-12)


@pytest.mark.parametrize(("positives", "negatives", "expected"), [
    ([2.0, 3.0], [0.0, 1.0], 1.0),          # perfectly separated
    ([0.0, 1.0], [2.0, 3.0], 0.0),          # perfectly inverted
    ([1.0, 1.0], [1.0, 1.0, 1.0], 0.5),     # all tied
    ([0.9, 0.4], [0.1, 0.4], 0.875),        # (1 + 1 + 1 + 1/2) / 4
    ([3.0], [1.0, 3.0, 5.0], 0.5),          # (1 + 1/2 + 0) / 3
    ([[2.0], [0.0]], [1.0], 0.5),           # inputs are flattened
])
def test_auroc_hand_cases(positives, negatives, expected):
    assert auroc(positives, negatives) == pytest.approx(expected)


@pytest.mark.parametrize(("positives", "negatives", "expected"), [
    ([2.0, 3.0], [0.0, 1.0], 1.0),
    ([3.0, 1.0], [2.0, 0.0], 1 / 2 * 1 + 1 / 2 * 2 / 3),
    ([1.0, 1.0], [1.0, 1.0], 0.5),          # one threshold: recall 1 at precision 1/2
    ([1.0], [2.0, 3.0], 1 / 3),
    # thresholds 2 (1 TP of 2 flagged) and 1 (2 TP of 4 flagged): 1/2 * 1/2 + 1/2 * 1/2
    ([2.0, 1.0], [2.0, 1.0], 0.5),
    # tied infinite scores enter together, whatever the input order
    ([math.inf], [math.inf], 0.5),
    ([math.inf, 1.0], [math.inf], 1 / 2 * 1 / 2 + 1 / 2 * 2 / 3),
    ([1.0], [math.inf, math.inf], 1 / 3),
])
def test_average_precision_hand_cases(positives, negatives, expected):
    assert average_precision(positives, negatives) == pytest.approx(expected)
    assert average_precision(positives[::-1], negatives[::-1]) == pytest.approx(expected)


@pytest.mark.parametrize("metric", [auroc, average_precision])
def test_single_class_raises_naming_the_empty_argument(metric):
    with pytest.raises(ValueError, match="positive_scores") as error:
        metric([], [0.1, 0.2])
    assert "negative_scores" not in str(error.value)
    with pytest.raises(ValueError, match="negative_scores") as error:
        metric(np.array([0.1, 0.2]), np.array([]))
    assert "positive_scores" not in str(error.value)


@pytest.mark.parametrize("metric", [auroc, average_precision])
def test_nan_scores_raise(metric):
    with pytest.raises(ValueError, match="positive_scores.*NaN"):
        metric([0.5, math.nan], [0.1])
    with pytest.raises(ValueError, match="negative_scores.*NaN"):
        metric([0.5], [math.nan])


# ---------------------------------------------------------------------------------------------
# Thresholds, TPR and FPR


def test_threshold_at_one_percent_of_100_flags_at_most_one():
    calibration = np.random.default_rng(0).permutation(100).astype(float)
    threshold = threshold_at_fpr(calibration, fpr=0.01)
    assert threshold == 98.0  # the second-largest score
    assert np.sum(calibration > threshold) == 1
    assert fpr_at_threshold(calibration, threshold) == 0.01


@pytest.mark.parametrize(("calibration", "fpr", "expected"), [
    ([0.1, 0.5, 0.3, 0.9], 0.25, 0.5),
    ([0.1, 0.5, 0.3, 0.9], 0.0, 0.9),        # fpr = 0: the maximum
    ([0.1, 0.5, 0.3, 0.9], 0.24, 0.9),       # 1/4 > 0.24: nothing may lie above
    ([0.1, 0.5, 0.3, 0.9], 1.0, 0.1),        # fpr = 1: the minimum
    ([0.1, 0.5, 0.3, 0.9], 0.99, 0.1),
    (np.arange(50.0), 0.01, 49.0),           # floor(0.5) = 0 allowed above
    (np.arange(100.0), 0.29, 70.0),          # 0.29 * 100 rounds below 29; 29 are allowed
    (np.arange(100.0), 0.07, 92.0),          # 0.07 * 100 rounds above 7
    ([1.0, 2.0, 3.0, 3.0, 3.0], 0.2, 3.0),   # ties: none above
    ([1.0, 2.0, 3.0, 3.0, 3.0], 0.4, 3.0),
    ([1.0, 2.0, 3.0, 3.0, 3.0], 0.6, 2.0),   # three above 2
    ([1.0, 2.0, 3.0, 3.0, 3.0], 0.59, 3.0),  # three above 2 would exceed 0.59
    ([2.0, 2.0, 2.0], 0.0, 2.0),
    ([7.0], 0.5, 7.0),
])
def test_threshold_at_fpr_hand_cases(calibration, fpr, expected):
    assert threshold_at_fpr(calibration, fpr) == expected


@settings(max_examples=60, deadline=None)
@given(score_lists(max_size=40), st.floats(0.0, 1.0))
def test_threshold_at_fpr_is_the_smallest_calibration_value_within_fpr(calibration, fpr):
    calibration = np.asarray(calibration)
    threshold = threshold_at_fpr(calibration, fpr)
    assert threshold in calibration

    def share_above(t):
        return np.sum(calibration > t) / calibration.size

    assert share_above(threshold) <= fpr
    assert fpr_at_threshold(calibration, threshold) <= fpr
    smaller = calibration[calibration < threshold]
    assert all(share_above(value) > fpr for value in smaller)


def test_threshold_at_fpr_errors():
    with pytest.raises(ValueError, match="calibration_negative_scores"):
        threshold_at_fpr([], 0.01)
    with pytest.raises(ValueError, match="calibration_negative_scores.*NaN"):
        threshold_at_fpr([0.1, math.nan], 0.01)
    for fpr in (-0.01, 1.01, math.nan):
        with pytest.raises(ValueError, match="fpr"):
            threshold_at_fpr([0.1, 0.2], fpr)


@FAST
@given(two_classes(max_size=30))
def test_tpr_and_fpr_at_threshold_match_sklearn_roc_curve(classes):
    positives, negatives = classes
    labels, scores = labelled(positives, negatives)
    # sklearn flags score >= thresholds[i] (decreasing distinct scores after an infinite
    # first threshold); with "score > t" the same counts are reached one threshold earlier.
    fprs, tprs, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    assert np.array_equal(thresholds[1:], np.unique(scores)[::-1])
    for index in range(1, thresholds.size):
        assert tpr_at_threshold(positives, thresholds[index]) == pytest.approx(tprs[index - 1])
        assert fpr_at_threshold(negatives, thresholds[index]) == pytest.approx(fprs[index - 1])
    below = thresholds[-1] - 1.0
    assert tpr_at_threshold(positives, below) == pytest.approx(tprs[-1]) == 1.0
    assert fpr_at_threshold(negatives, below) == pytest.approx(fprs[-1]) == 1.0


def test_tpr_and_fpr_hand_cases():
    assert tpr_at_threshold([0.2, 0.5, 0.9, 1.0], 0.5) == 0.5   # 0.5 is not above 0.5
    assert fpr_at_threshold([0.1, 0.3, 0.7, 0.3], 0.3) == 0.25
    assert tpr_at_threshold([[1.0, 2.0], [3.0, 4.0]], 0.0) == 1.0
    assert fpr_at_threshold(np.array([1.0, 2.0]), np.float32(5.0)) == 0.0
    assert tpr_at_threshold([1.0, math.inf], math.inf) == 0.0


def test_tpr_at_one_percent_fpr_pipeline():
    rng = np.random.default_rng(3)
    calibration = rng.normal(0, 1, 500)
    threshold = threshold_at_fpr(calibration, 0.01)
    assert np.sum(calibration > threshold) == 5
    assert fpr_at_threshold(calibration, threshold) <= 0.01
    assert 0.9 < tpr_at_threshold(rng.normal(5, 1, 200), threshold) <= 1.0
    # the FPR on fresh negatives is near, not bounded by, the calibration FPR
    assert fpr_at_threshold(rng.normal(0, 1, 20_000), threshold) == pytest.approx(0.01, abs=0.01)


def test_tpr_and_fpr_errors():
    with pytest.raises(ValueError, match="positive_scores"):
        tpr_at_threshold([], 0.5)
    with pytest.raises(ValueError, match="negative_scores"):
        fpr_at_threshold([], 0.5)
    with pytest.raises(ValueError, match="positive_scores.*NaN"):
        tpr_at_threshold([math.nan], 0.5)
    with pytest.raises(ValueError, match="negative_scores.*NaN"):
        fpr_at_threshold([0.1, math.nan], 0.5)
    for threshold in (math.nan, [0.1, 0.2]):
        with pytest.raises(ValueError, match="threshold"):
            tpr_at_threshold([0.1], threshold)
        with pytest.raises(ValueError, match="threshold"):
            fpr_at_threshold([0.1], threshold)


# ---------------------------------------------------------------------------------------------
# Caught before harm


def test_caught_before_harm_hand_cases():
    nan = math.nan
    step_scores = np.array([
        [0.0, 0.9, 0.0, 0.0, 0.0, 0.0],  # crosses at 1, event at 4: caught, lead 3
        [0.0, 0.0, 0.0, 0.9, 0.0, 0.0],  # crosses at 3 = event step 3: too late
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.9],  # crosses at 5, after the event at 2
        [0.0, 0.5, 0.0, 0.0, 0.0, 0.0],  # never crosses (0.5 is not above 0.5)
        [0.9, 0.9, 0.9, 0.9, 0.9, 0.9],  # negative: ignored
        [nan, nan, 0.0, 0.0, 0.0, 0.0],  # a NaN step never crosses
        [0.0, 0.0, 0.9, 0.9, 0.0, 0.0],  # crosses at 2, event at 4 (and 5): caught, lead 2
    ])
    events = np.zeros(step_scores.shape, np.int32)
    events[0, 4] = events[1, 3] = events[2, 2] = events[3, 1] = events[5, 2] = 1
    events[6, 4] = 2
    events[6, 5] = 1
    mask = np.ones(step_scores.shape, bool)
    rate, lead_times = caught_before_harm(step_scores, mask, events, 0.5)
    assert rate == pytest.approx(2 / 6)
    assert lead_times.dtype == np.int64
    assert lead_times.tolist() == [3, 2]


def test_caught_before_harm_masked_steps_are_ignored():
    step_scores = np.array([
        [0.9, 0.0, 0.0, 0.0],  # the crossing at 0 is masked: not caught
        [0.0, 0.9, 0.0, 0.0],  # the event at 0 is masked; the first valid event is 3
        [0.0, 0.9, 0.0, 0.0],  # its only event is masked: a negative episode
        [0.0, 0.0, 0.9, 0.0],  # crossing at 2, event at 3, both valid: lead 1
    ])
    mask = np.array([
        [0, 1, 1, 1],
        [0, 1, 1, 1],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
    ])
    events = np.array([
        [0, 0, 1, 0],
        [1, 0, 0, 1],
        [0, 0, 0, 1],
        [0, 0, 0, 1],
    ])
    rate, lead_times = caught_before_harm(step_scores, mask, events, 0.5)
    assert rate == pytest.approx(2 / 3)
    assert lead_times.tolist() == [2, 1]


def test_caught_before_harm_none_caught_gives_empty_lead_times():
    rate, lead_times = caught_before_harm(np.zeros((2, 3)), np.ones((2, 3)),
                                          np.array([[0, 1, 0], [0, 0, 0]]), 0.0)
    assert rate == 0.0
    assert lead_times.shape == (0,) and lead_times.dtype == np.int64


def test_caught_before_harm_errors():
    ones = np.ones((2, 3))
    no_events = np.zeros((2, 3), int)
    with pytest.raises(ValueError, match="positive episode"):
        caught_before_harm(ones, ones, no_events, 0.5)
    masked_events = np.array([[1, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="positive episode"):
        caught_before_harm(ones, np.array([[0, 1, 1], [1, 1, 1]]), masked_events, 0.5)
    with pytest.raises(ValueError, match="step_scores"):
        caught_before_harm(np.ones(3), np.ones(3), np.ones(3, int), 0.5)
    with pytest.raises(ValueError, match="mask"):
        caught_before_harm(ones, np.ones((2, 4)), masked_events, 0.5)
    with pytest.raises(ValueError, match="events"):
        caught_before_harm(ones, ones, np.ones((3, 3), int), 0.5)
    with pytest.raises(ValueError, match="threshold"):
        caught_before_harm(ones, ones, masked_events, math.nan)


def caught_reference(step_scores, mask, events, threshold):
    positives, lead_times = 0, []
    for scores, valid, codes in zip(step_scores, mask, events, strict=True):
        event_steps = [t for t in range(len(codes)) if valid[t] and codes[t] > 0]
        if not event_steps:
            continue
        positives += 1
        crossings = [t for t in range(len(scores)) if valid[t] and scores[t] > threshold]
        if crossings and crossings[0] < event_steps[0]:
            lead_times.append(event_steps[0] - crossings[0])
    return positives, lead_times


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.data())
def test_caught_before_harm_matches_a_loop_reference(batch, steps, data):
    cells = batch * steps
    step_scores = np.asarray(data.draw(st.lists(
        st.sampled_from([0.0, 1.0, 2.0, 3.0, math.nan]), min_size=cells, max_size=cells)))
    mask = np.asarray(data.draw(st.lists(st.booleans(), min_size=cells, max_size=cells)))
    events = np.asarray(data.draw(st.lists(st.sampled_from([0, 0, 1, 2]),
                                           min_size=cells, max_size=cells)))
    step_scores, mask, events = (a.reshape(batch, steps) for a in (step_scores, mask, events))
    threshold = data.draw(st.sampled_from([0.5, 1.0, 2.5]))
    positives, expected_leads = caught_reference(step_scores, mask, events, threshold)
    if positives == 0:
        with pytest.raises(ValueError, match="positive episode"):
            caught_before_harm(step_scores, mask, events, threshold)
        return
    rate, lead_times = caught_before_harm(step_scores, mask, events, threshold)
    assert rate == pytest.approx(len(expected_leads) / positives)
    assert lead_times.tolist() == expected_leads
    assert all(lead >= 1 for lead in expected_leads)


# ---------------------------------------------------------------------------------------------
# Audit budget curve


def test_audit_budget_curve_without_ties():
    positives = [10.0, 8.0, 6.0, 1.0]
    negatives = [9.0, 7.0, 5.0, 4.0, 3.0, 2.0]
    curve = audit_budget_curve(positives, negatives, budgets=(0.0, 0.1, 0.2, 0.3, 0.5, 0.95, 1.0))
    assert list(curve) == [0.0, 0.1, 0.2, 0.3, 0.5, 0.95, 1.0]
    assert curve == pytest.approx({0.0: 0.0, 0.1: 0.25, 0.2: 0.25, 0.3: 0.5, 0.5: 0.75,
                                   0.95: 1.0, 1.0: 1.0})
    # k = ceil(b * 10): 0.11 audits two episodes, 0.21 three
    assert audit_budget_curve(positives, negatives, budgets=(0.11, 0.21)) == pytest.approx(
        {0.11: 0.25, 0.21: 0.5})


def test_audit_budget_curve_with_ties_at_the_cut():
    # sorted: 5 (P) | 3 3 3 3 (2 P, 2 N) | 1 (N); budget 1/2 audits 3 = 5 and 2 of the 4 tied
    curve = audit_budget_curve([5.0, 3.0, 3.0], [3.0, 3.0, 1.0], budgets=(0.5, 1 / 6, 4 / 6))
    # 4/6 audits 5 and 3 of the 4 tied: 1 + 2 * 3/4 of 3 positives
    assert curve == pytest.approx({0.5: (1 + 2 * 2 / 4) / 3, 1 / 6: 1 / 3,
                                   4 / 6: (1 + 2 * 3 / 4) / 3})
    assert audit_budget_curve([5.0, 3.0], [4.0, 3.0], budgets=(0.25, 0.75)) == pytest.approx(
        {0.25: 0.5, 0.75: 0.75})
    # everything tied: the expected share is the budget's share of episodes
    assert audit_budget_curve([1.0] * 3, [1.0] * 7, budgets=(0.3,)) == pytest.approx({0.3: 0.3})


def test_audit_budget_curve_default_budgets_and_no_negatives():
    positives = np.arange(100.0, 200.0)
    negatives = np.arange(100.0)
    assert audit_budget_curve(positives, negatives) == pytest.approx(
        {0.01: 0.02, 0.02: 0.04, 0.05: 0.1})
    assert audit_budget_curve([1.0, 2.0, 3.0, 4.0], [], budgets=(0.5,)) == {0.5: 0.5}


def test_audit_budget_curve_rounding_of_the_budget():
    positives, negatives = [3.0, 2.0], [1.0]
    just_above_a_third = float(np.nextafter(1 / 3, 1.0))
    curve = audit_budget_curve(positives, negatives, budgets=(1 / 3, just_above_a_third))
    assert curve[1 / 3] == 0.5                 # one episode of three
    assert curve[just_above_a_third] == 1.0   # more than a third: two
    # 0.07 * 100 rounds up to just above 7: still seven episodes
    curve = audit_budget_curve(np.arange(93.0, 100.0), np.arange(93.0), budgets=(0.07,))
    assert curve[0.07] == 1.0


def test_audit_budget_curve_errors():
    with pytest.raises(ValueError, match="positive_scores"):
        audit_budget_curve([], [1.0])
    with pytest.raises(ValueError, match="negative_scores.*NaN"):
        audit_budget_curve([1.0], [math.nan])
    with pytest.raises(ValueError, match="positive_scores.*NaN"):
        audit_budget_curve([math.nan], [1.0])
    for budget in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="budget"):
            audit_budget_curve([1.0], [0.0], budgets=(0.5, budget))


def budget_reference(positives, negatives, budgets):
    """Expected share caught under uniformly random tie-breaking, over every ordering."""
    scores = list(positives) + list(negatives)
    is_positive = [True] * len(positives) + [False] * len(negatives)
    total = len(scores)
    audited = {b: next(k for k in range(total + 1) if k / total >= b) for b in budgets}
    caught = dict.fromkeys(budgets, 0)
    orderings = list(itertools.permutations(range(total)))
    for ordering in orderings:  # ordering[i] = the tie-break rank of episode i
        ranked = sorted(range(total), key=lambda i, o=ordering: (-scores[i], o[i]))
        for budget in budgets:
            caught[budget] += sum(is_positive[i] for i in ranked[:audited[budget]])
    return {b: caught[b] / len(orderings) / len(positives) for b in budgets}


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=1, max_size=3),
       st.lists(st.integers(0, 2), min_size=0, max_size=3))
def test_audit_budget_curve_matches_random_tie_breaking(positives, negatives):
    budgets = (0.0, 0.1, 0.2, 0.25, 1 / 3, 0.4, 0.5, 0.6, 2 / 3, 0.75, 0.8, 0.9, 1.0)
    positives = [float(p) for p in positives]
    negatives = [float(n) for n in negatives]
    curve = audit_budget_curve(positives, negatives, budgets=budgets)
    expected = budget_reference(positives, negatives, budgets)
    assert list(curve) == list(budgets)
    for budget in budgets:
        assert curve[budget] == pytest.approx(expected[budget], abs=1e-12)


@FAST
@given(two_classes(max_size=30), st.randoms(use_true_random=False))
def test_audit_budget_curve_is_order_independent_and_monotone(classes, random):
    positives, negatives = classes
    budgets = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
    curve = audit_budget_curve(positives, negatives, budgets=budgets)
    shuffled_positives, shuffled_negatives = list(positives), list(negatives)
    random.shuffle(shuffled_positives)
    random.shuffle(shuffled_negatives)
    assert audit_budget_curve(shuffled_positives, shuffled_negatives, budgets=budgets) == curve
    values = [curve[b] for b in budgets]
    assert values[0] == 0.0 and values[-1] == 1.0
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(values))


# ---------------------------------------------------------------------------------------------
# Bootstrap confidence intervals


def separated_classes(seed: int = 1, size: int = 100):
    rng = np.random.default_rng(seed)
    return rng.normal(1, 1, size), rng.normal(0, 1, size)


def test_bootstrap_ci_same_seed_same_interval():
    samples = separated_classes()
    first = bootstrap_ci(auroc, samples, resamples=200, seed=7)
    assert bootstrap_ci(auroc, samples, resamples=200, seed=7) == first
    assert bootstrap_ci(auroc, samples, resamples=200, seed=8) != first


def test_bootstrap_ci_contains_the_point_estimate():
    samples = separated_classes()
    low, high = bootstrap_ci(auroc, samples, resamples=300)
    assert 0.5 < low < auroc(*samples) < high < 1.0
    wider = bootstrap_ci(auroc, samples, resamples=300, confidence=0.99)
    assert wider[0] <= low and high <= wider[1]
    values = np.random.default_rng(2).exponential(size=80)
    low, high = bootstrap_ci(np.mean, values, resamples=300)
    assert low < values.mean() < high


def test_bootstrap_ci_coverage_of_a_known_mean():
    rng = np.random.default_rng(12)
    covered = 0
    trials = 200
    for trial in range(trials):
        data = rng.normal(2.0, 1.0, 40)
        low, high = bootstrap_ci(np.mean, data, resamples=200, seed=trial)
        covered += low <= 2.0 <= high
    # the percentile bootstrap of a mean undercovers a little at n = 40 (about 93%)
    assert 0.86 <= covered / trials <= 0.99


def test_bootstrap_ci_stratified_keeps_each_array_and_its_size():
    positives, negatives = np.arange(5.0), np.arange(100.0, 108.0)
    seen = []

    def statistic(p, n):
        seen.append((p.copy(), n.copy()))
        return float(p.mean() - n.mean())

    bootstrap_ci(statistic, (positives, negatives), resamples=50)
    assert len(seen) == 50
    for p, n in seen:
        assert p.shape == (5,) and n.shape == (8,)
        assert set(p) <= set(positives) and set(n) <= set(negatives)


def test_bootstrap_ci_resamples_rows_of_multidimensional_arrays():
    rows = np.arange(12.0).reshape(6, 2)
    seen = []

    def statistic(x):
        seen.append(x.copy())
        return float(x.sum())

    bootstrap_ci(statistic, rows, resamples=20)
    for resample in seen:
        assert resample.shape == (6, 2)
        assert all(any(np.array_equal(row, original) for original in rows) for row in resample)


def test_bootstrap_ci_cluster_resampling_draws_whole_groups():
    group_ids = np.array([5, 0, 5, 1, 0, 5, 2, 1, 0, 5])  # interleaved, sizes 3, 2, 1, 4
    members = {g: sorted(np.flatnonzero(group_ids == g).tolist()) for g in np.unique(group_ids)}
    plain = np.arange(7.0)
    seen = []

    def statistic(indices, other):
        seen.append((indices.copy(), other.copy()))
        return float(len(np.unique(group_ids[indices])))  # distinct groups drawn

    low, high = bootstrap_ci(statistic, (np.arange(10), plain), groups=(group_ids, None),
                             resamples=200, seed=3)
    assert 1 <= low <= high <= 4
    sizes = set()
    for indices, other in seen:
        assert other.shape == plain.shape  # the array without groups keeps its row count
        drawn_groups = 0
        for group, rows in members.items():
            taken = sorted(indices[group_ids[indices] == group].tolist())
            copies, remainder = divmod(len(taken), len(rows))
            assert remainder == 0
            assert taken == sorted(rows * copies)  # every member, once per draw of the group
            drawn_groups += copies
        assert drawn_groups == len(members)  # as many groups as there are
        sizes.add(indices.size)
    assert len(sizes) > 1  # the resample size varies with the groups drawn


@pytest.mark.parametrize("confidence", [0.95, 0.8])
def test_bootstrap_ci_bounds_are_percentiles_of_the_resampled_statistics(confidence):
    values = []

    def statistic(x):
        values.append(float(np.median(x)))
        return values[-1]

    low, high = bootstrap_ci(statistic, np.random.default_rng(4).normal(size=30),
                             resamples=101, confidence=confidence)
    assert len(values) == 101
    tail = (1 - confidence) / 2
    assert (low, high) == pytest.approx(tuple(np.quantile(values, [tail, 1 - tail])))


@pytest.mark.parametrize(("invalid", "expect_nan"), [(10, False), (11, True)])
def test_bootstrap_ci_needs_half_the_resamples_valid(invalid, expect_nan):
    calls = []

    def statistic(x):  # the first `invalid` of 20 resamples are invalid
        calls.append(None)
        if len(calls) <= invalid:
            raise ValueError("invalid resample")
        return float(x.mean())

    low, high = bootstrap_ci(statistic, np.arange(6.0), resamples=20)
    assert math.isnan(low) == math.isnan(high) == expect_nan


def test_bootstrap_ci_with_too_few_valid_resamples_is_nan():
    def always_invalid(x):
        raise ValueError("no")

    assert all(math.isnan(v) for v in bootstrap_ci(always_invalid, np.arange(5.0),
                                                   resamples=20))
    assert all(math.isnan(v) for v in bootstrap_ci(lambda x: math.nan, np.arange(5.0),
                                                   resamples=20))
    # a single positive and negative: a resample is valid, so the interval is defined
    assert bootstrap_ci(auroc, ([1.0], [0.0]), resamples=20) == (1.0, 1.0)


def test_bootstrap_ci_errors_name_the_argument():
    data = np.arange(5.0)
    with pytest.raises(ValueError, match="samples"):
        bootstrap_ci(np.mean, ())
    with pytest.raises(ValueError, match=r"samples\[1\]"):
        bootstrap_ci(auroc, (data, np.array([])))
    with pytest.raises(ValueError, match=r"samples\[0\]"):
        bootstrap_ci(np.mean, np.float64(1.0))
    with pytest.raises(ValueError, match="groups"):
        bootstrap_ci(auroc, (data, data), groups=(None,))
    with pytest.raises(ValueError, match=r"groups\[1\]"):
        bootstrap_ci(auroc, (data, data), groups=(None, np.zeros(4, int)))
    with pytest.raises(ValueError, match=r"groups\[0\]"):
        bootstrap_ci(np.mean, (data,), groups=(np.zeros(5, float),))
    for resamples in (0, -3, 2.5):
        with pytest.raises(ValueError, match="resamples"):
            bootstrap_ci(np.mean, data, resamples=resamples)
    for confidence in (0.0, 1.0, 1.5, math.nan):
        with pytest.raises(ValueError, match="confidence"):
            bootstrap_ci(np.mean, data, confidence=confidence)


def test_nested_bootstrap_estimate_is_the_mean_of_per_group_figures_never_pooled():
    # Two seeds whose detectors score on different scales: each separates perfectly,
    # pooling their scores would not.
    seed0 = (np.array([2.0, 3.0]), np.array([0.0, 1.0]))
    seed1 = (np.array([-50.0, -40.0]), np.array([-100.0, -90.0]))
    pooled = auroc(np.r_[seed0[0], seed1[0]], np.r_[seed0[1], seed1[1]])
    assert pooled == 0.75
    estimate, low, high = nested_bootstrap_ci(auroc, [seed0, seed1], resamples=50)
    assert estimate == 1.0 and low == 1.0 and high == 1.0


def test_nested_bootstrap_draws_seeds_then_episodes_within_each():
    groups = [(np.full(4, float(g)), np.arange(3.0) + 10 * g) for g in range(3)]
    calls = []

    def statistic(values, other):
        calls.append((values.copy(), other.copy()))
        assert np.unique(values).size == 1  # rows never mix seeds
        g = int(values[0])
        assert values.shape == (4,) and other.shape == (3,)  # sizes kept (stratified)
        assert set(other.tolist()) <= set((np.arange(3.0) + 10 * g).tolist())
        return values.mean()

    estimate, low, high = nested_bootstrap_ci(statistic, groups, resamples=200, seed=1)
    assert estimate == 1.0  # mean of the seeds' figures 0, 1, 2
    # Seeds are drawn with replacement: the mean of three draws from {0, 1, 2} varies.
    assert low < 1.0 < high and 0.0 <= low and high <= 2.0
    assert len(calls) == 3 + 200 * 3


def test_nested_bootstrap_with_one_group_matches_the_stratified_bootstrap():
    rng = np.random.default_rng(5)
    positives, negatives = rng.normal(1.0, 1.0, 150), rng.normal(0.0, 1.0, 150)
    estimate, low, high = nested_bootstrap_ci(auroc, [(positives, negatives)], resamples=800)
    flat_low, flat_high = bootstrap_ci(auroc, (positives, negatives), resamples=800)
    assert estimate == auroc(positives, negatives)
    assert low == pytest.approx(flat_low, abs=0.02) and high == pytest.approx(flat_high, abs=0.02)


def test_nested_bootstrap_leaves_undefined_groups_out_of_the_mean():
    def statistic(positives, negatives):  # a seed without positives has no AUROC
        if np.isnan(positives).all():
            raise ValueError("no positives")
        return [auroc(positives[~np.isnan(positives)], negatives), negatives.mean()]

    with_positives = (np.array([1.0, 2.0]), np.array([0.0, 0.5]))
    without = (np.array([math.nan]), np.array([0.2, 0.4]))
    estimate, low, high = nested_bootstrap_ci(statistic, [with_positives, without],
                                              resamples=40)
    # The seed that raised is left out as a whole; the other's figures stand.
    np.testing.assert_array_equal(estimate, [1.0, 0.25])
    assert low[0] == high[0] == 1.0


def test_nested_bootstrap_errors_name_the_argument():
    with pytest.raises(ValueError, match="groups must hold"):
        nested_bootstrap_ci(np.mean, [])
    with pytest.raises(ValueError, match="same, non-zero number"):
        nested_bootstrap_ci(np.mean, [(np.arange(3.0),), (np.arange(3.0), np.arange(2.0))])
    with pytest.raises(ValueError, match=r"groups\[1\]\[0\]"):
        nested_bootstrap_ci(np.mean, [(np.arange(3.0),), (np.array([]),)])
    with pytest.raises(ValueError, match="resamples"):
        nested_bootstrap_ci(np.mean, [(np.arange(3.0),)], resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        nested_bootstrap_ci(np.mean, [(np.arange(3.0),)], confidence=1.0)


# ---------------------------------------------------------------------------------------------
# Many resamples at once: equal to the metric of the repeated scores


def resampled_pairs():
    """Scores of two classes and integer counts of ``K`` resamples (zeros included)."""
    def build(draw):
        positive = draw(score_lists(min_size=1))
        negative = draw(score_lists(min_size=1))
        count = draw(st.integers(1, 4))
        positive_weights = [[draw(st.integers(0, 3)) for _ in positive] for _ in range(count)]
        negative_weights = [[draw(st.integers(0, 3)) for _ in negative] for _ in range(count)]
        return (np.array(positive), np.array(positive_weights, float), np.array(negative),
                np.array(negative_weights, float))
    return st.composite(lambda draw: build(draw))()


def repeated(scores, weights):
    return np.repeat(scores, weights.astype(int))


@FAST
@given(resampled_pairs())
def test_weighted_auroc_is_the_auroc_of_the_repeated_scores_bit_for_bit(case):
    positive, positive_weights, negative, negative_weights = case
    found = metrics.weighted_auroc(positive, positive_weights, negative, negative_weights)
    ranked = metrics.weighted_ranking(positive, positive_weights, negative, negative_weights)
    for k in range(found.size):
        ones, zeros = repeated(positive, positive_weights[k]), repeated(negative,
                                                                         negative_weights[k])
        if ones.size and zeros.size:
            assert found[k] == ranked["auroc"][k] == auroc(ones, zeros)
        else:
            assert math.isnan(found[k]) and math.isnan(ranked["auroc"][k])


@FAST
@given(resampled_pairs())
def test_weighted_average_precision_is_that_of_the_repeated_scores(case):
    positive, positive_weights, negative, negative_weights = case
    found = metrics.weighted_average_precision(positive, positive_weights, negative,
                                               negative_weights)
    for k in range(found.size):
        ones, zeros = repeated(positive, positive_weights[k]), repeated(negative,
                                                                         negative_weights[k])
        if ones.size and zeros.size:
            expected = average_precision_score(np.r_[np.ones(ones.size), np.zeros(zeros.size)],
                                               np.r_[ones, zeros])
            assert found[k] == pytest.approx(expected, rel=1e-12)
            assert found[k] == pytest.approx(average_precision(ones, zeros), rel=1e-12)
        else:
            assert math.isnan(found[k])


@FAST
@given(resampled_pairs(), st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4, unique=True))
def test_weighted_audit_budget_curve_is_that_of_the_repeated_scores_bit_for_bit(case, budgets):
    positive, positive_weights, negative, negative_weights = case
    found = metrics.weighted_audit_budget_curve(positive, positive_weights, negative,
                                                negative_weights, budgets)
    assert found.shape == (positive_weights.shape[0], len(budgets))
    for k in range(found.shape[0]):
        ones, zeros = repeated(positive, positive_weights[k]), repeated(negative,
                                                                         negative_weights[k])
        if ones.size:
            assert found[k].tolist() == list(audit_budget_curve(ones, zeros, budgets).values())
        else:
            assert np.isnan(found[k]).all()


@FAST
@given(resampled_pairs(), st.data())
def test_ranking_scores_that_differ_between_resamples_is_ranking_each_resample_on_its_own(
        case, data):
    """Per-resample scores (p-values recomputed against each resample's calibration):
    resample ``k``'s figures are those of its own scores, ranked alone."""
    positive, positive_weights, negative, negative_weights = case
    count = positive_weights.shape[0]
    # Each resample moves the scores (ties kept possible: a small grid).
    moved = [data.draw(st.lists(st.integers(-2, 2), min_size=positive.size + negative.size,
                                max_size=positive.size + negative.size)) for _ in range(count)]
    moved = np.array(moved, float) / 4
    positives = positive[None, :] + moved[:, :positive.size]
    negatives = negative[None, :] + moved[:, positive.size:]
    budgets = (0.0, 0.3, 1.0)
    found = metrics.weighted_ranking(positives, positive_weights, negatives, negative_weights,
                                     budgets)
    aurocs = metrics.weighted_auroc(positives, positive_weights, negatives, negative_weights)
    for k in range(count):
        alone = metrics.weighted_ranking(positives[k], positive_weights[k:k + 1], negatives[k],
                                         negative_weights[k:k + 1], budgets)
        for name in ("auroc", "audit_budget"):
            np.testing.assert_array_equal(found[name][k], alone[name][0])
        np.testing.assert_allclose(found["average_precision"][k],
                                   alone["average_precision"][0], rtol=1e-12)
        np.testing.assert_array_equal(aurocs[k], alone["auroc"][0])


def test_resampled_p_values_are_those_against_each_resample_of_the_calibration():
    rng = np.random.default_rng(4)
    for _ in range(30):
        n, steps, count = rng.integers(1, 12), rng.integers(1, 6), rng.integers(1, 5)
        calibration = np.maximum.accumulate(rng.integers(0, 5, (n, steps)).astype(float), 1)
        lengths = rng.integers(1, steps + 1, n)
        scores = rng.integers(0, 6, 9).astype(float)
        scores[0] = -np.inf  # nothing observed: p = 1
        prefix = rng.integers(0, steps + 1, 9)
        indices = rng.integers(0, n, (count, n))
        weights = metrics.resample_counts(indices, n)
        for uniform in (None, rng.uniform(0.01, 1.0, 9)):
            found = metrics.resampled_p_values(scores, prefix, calibration, lengths, weights,
                                               uniform=uniform)
            for k in range(count):
                np.testing.assert_array_equal(found[k], metrics.time_matched_p_values(
                    scores, prefix, calibration[indices[k]], lengths[indices[k]],
                    uniform=uniform))
    with pytest.raises(ValueError, match=r"calibration_weights must be \[K, 2\]"):
        metrics.resampled_p_values([0.5], [1], np.zeros((2, 3)), [3, 3], [[1, 1, 1]])
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 3\]"):
        metrics.resampled_p_values([0.5], [4], np.zeros((2, 3)), [3, 3], [[1, 1]])


def test_resample_counts_and_weighted_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="indices must lie in"):
        metrics.resample_counts([[0, 3]], 3)
    with pytest.raises(ValueError, match=r"indices must be \[K, n\]"):
        metrics.resample_counts([0, 1], 3)
    with pytest.raises(ValueError, match=r"positive_scores's weights must be \[K, 2\]"):
        metrics.weighted_auroc([1.0, 2.0], [[1, 1, 1]], [0.0], [[1]])
    with pytest.raises(ValueError, match="negative_scores must not contain NaN"):
        metrics.weighted_auroc([1.0], [[1]], [math.nan], [[1]])


def test_nested_bootstrap_with_a_resampled_statistic_draws_and_reports_the_same():
    rng = np.random.default_rng(3)
    groups = [(rng.normal(g, 1.0, 30 + g), rng.normal(0.0, 1.0, 20)) for g in range(4)]
    groups.append((np.array([math.nan]), rng.normal(0.0, 1.0, 5)))  # a group without positives

    def statistic(positives, negatives):
        if np.isnan(positives).all():
            raise ValueError("no positives")
        return [auroc(positives, negatives), float(np.mean(negatives > 0))]

    def resampled(arrays, indices):
        positives, negatives = arrays
        if np.isnan(positives).all():
            return np.full((indices[0].shape[0], 2), np.nan)
        counts = [metrics.resample_counts(index, len(array))
                  for array, index in zip(arrays, indices, strict=True)]
        share = (counts[1] * (negatives > 0)).sum(axis=1) / counts[1].sum(axis=1)
        return np.stack([metrics.weighted_auroc(positives, counts[0], negatives, counts[1]),
                         share], axis=1)

    plain = nested_bootstrap_ci(statistic, groups, resamples=300, seed=7)
    batched = nested_bootstrap_ci(statistic, groups, resamples=300, seed=7,
                                  resampled_statistic=resampled)
    for expected, found in zip(plain, batched, strict=True):
        np.testing.assert_array_equal(found, expected)


# ---------------------------------------------------------------------------------------------
# Documented examples


DOCTESTS = [test for test in doctest.DocTestFinder().find(metrics) if test.examples]


def test_every_public_metric_has_an_example():
    documented = {test.name.rsplit(".", 1)[-1] for test in DOCTESTS}
    assert {"auroc", "average_precision", "threshold_at_fpr", "tpr_at_threshold",
            "fpr_at_threshold", "caught_before_harm", "audit_budget_curve",
            "bootstrap_ci", "nested_bootstrap_ci", "resample_counts", "weighted_auroc",
            "weighted_average_precision", "weighted_audit_budget_curve",
            "weighted_ranking"} <= documented


@pytest.mark.parametrize("test", DOCTESTS, ids=lambda test: test.name)
def test_docstring_examples(test):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    output = []
    runner.run(test, out=output.append)
    assert runner.failures == 0, "".join(output)


# --------------------------------------------------------------------------- p-values


def test_conformal_p_values_count_calibration_at_or_above():
    calibration = [0.1, 0.5, 0.9, 1.5]
    assert metrics.conformal_p_values([0.5, 2.0, 0.0, -np.inf], calibration).tolist() == [
        4 / 5, 1 / 5, 5 / 5, 1.0]
    with pytest.raises(ValueError, match="calibration_scores is empty"):
        metrics.conformal_p_values([1.0], [])


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000))
def test_conformal_p_values_are_valid_under_exchangeability(seed):
    """P(p <= a) = floor(a (n + 1)) / (n + 1) over draws of calibration set and score.

    The guarantee is marginal (over the calibration set too), so each of 4000 trials draws
    its own 19 calibration scores and one exchangeable score: with n = 19, P(p <= 0.2) is
    exactly 0.2 and P(p <= 0.05) exactly 0.05 (within 4 binomial standard deviations).
    """
    rng = np.random.default_rng(seed)
    trials, n = 4000, 19
    p_values = np.array([metrics.conformal_p_values(score, calibration)[0] for score, calibration
                         in zip(rng.normal(size=(trials, 1)), rng.normal(size=(trials, n)),
                                strict=True)])
    assert ((p_values > 0) & (p_values <= 1)).all()
    for level in (0.05, 0.2):
        spread = 4 * math.sqrt(level * (1 - level) / trials)
        assert abs(np.mean(p_values <= level) - level) < spread


def test_time_matched_p_values_compare_prefixes_of_equal_length():
    calibration = np.array([[0.0, 1.0, 1.0], [2.0, 2.0, 3.0]])
    # 0.5 after one step: one calibration prefix (2.0) is at least as high; after three
    # steps both (1.0 and 3.0) are.
    got = metrics.time_matched_p_values([0.5, 0.5, 9.0, 1.0], [1, 3, 2, 0], calibration)
    assert got.tolist() == [2 / 3, 1.0, 1 / 3, 1.0]
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 3\]"):
        metrics.time_matched_p_values([0.5], [4], calibration)
    with pytest.raises(ValueError, match="lengths must have the shape"):
        metrics.time_matched_p_values([0.5, 0.1], [1], calibration)


def test_smoothed_p_values_are_uniform_whatever_the_ties_and_conservative_ones_are_not():
    """With scores that take 3 values (a detector that reads only the action), each trial's
    score exchangeable with its 19 calibration scores: the smoothed p-value is exactly
    uniform, P(p <= a) = a, while the conservative one is pushed up by the ties."""
    rng = np.random.default_rng(0)
    trials, n = 4000, 19
    values = rng.choice(3, size=(trials, n + 1), p=[0.7, 0.2, 0.1]).astype(float)
    conservative, smoothed = [], []
    for row, draw in zip(values, 1.0 - rng.random(trials), strict=True):
        calibration = row[1:, None]
        conservative.append(metrics.time_matched_p_values(row[:1], [1], calibration)[0])
        smoothed.append(metrics.time_matched_p_values(row[:1], [1], calibration,
                                                      uniform=[draw])[0])
    conservative, smoothed = np.array(conservative), np.array(smoothed)
    for level in (0.1, 0.3, 0.5, 0.8):
        spread = 4 * math.sqrt(level * (1 - level) / trials)
        assert abs(np.mean(smoothed <= level) - level) < spread
    assert abs(smoothed.mean() - 0.5) < 0.02
    assert conservative.mean() > 0.65  # ties count against the scored item
    # Without ties, smoothing replaces the item's own count of 1 by u: (1 + u) / 3, not 2 / 3.
    assert metrics.time_matched_p_values([0.3], [1], np.array([[0.1], [0.5]]),
                                         uniform=[0.5]).tolist() == [0.5]
    with pytest.raises(ValueError, match=r"uniform must hold one draw in \(0, 1\]"):
        metrics.time_matched_p_values([0.3], [1], np.array([[0.1]]), uniform=[0.0])


def test_time_matched_p_values_equal_plain_ones_at_a_single_length():
    rng = np.random.default_rng(3)
    calibration = rng.normal(size=(50, 1))
    scores = rng.normal(size=20)
    np.testing.assert_array_equal(
        metrics.time_matched_p_values(scores, np.ones(20, int), calibration),
        metrics.conformal_p_values(scores, calibration[:, 0]))
