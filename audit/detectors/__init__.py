"""Detectors: anything that scores the steps of trajectories for how suspicious they are.

One protocol (DESIGN.md, "Contracts")::

    detector.fit(trusted, untrusted=None) -> detector
    detector.score(trajectories) -> [B, T] per-step scores (higher = more suspicious)

``trusted`` are demonstrator episodes; ``untrusted`` (optional) are episodes of the
audited imitator. Trajectories given to a detector carry the audited imitator's
activations (for demonstrator episodes, teacher-forced: :func:`with_activations`),
so that every view is defined on every episode. A trajectory's score is an
aggregate of its step scores (:func:`aggregate_scores`, default ``max``); the
running aggregate (:func:`running_scores`) is what "caught before harm" watches.

Built-in detectors (registered in the ``detectors`` group, as a user's would be
through the ``audit.detectors`` entry points):

- ``discriminator``: a GAN discriminator of a view, co-trained with the imitator
  (:meth:`DiscriminatorDetector.from_gan`) or trained post hoc on ``trusted`` vs
  ``untrusted`` (:meth:`DiscriminatorDetector.fit`);
- ``mahalanobis``, ``action_surprise``, ``linear_probe``: fitted on demonstrations
  only; ``random_direction``: a control that should score at chance.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from audit.trajectories import Trajectories

AGGREGATES = ("max", "mean", "sum", "last")
PROTOCOLS = ("co-trained", "post-hoc", "demonstrations-only")


@runtime_checkable
class Detector(Protocol):
    """Scores steps of trajectories; see the module docstring."""

    #: the audit protocol its knowledge comes from, one of :data:`PROTOCOLS`.
    protocol: str

    def fit(self, trusted: Trajectories, untrusted: Trajectories | None = None) -> Detector: ...

    def score(self, trajectories: Trajectories) -> np.ndarray: ...


def check_aggregate(aggregate: str) -> str:
    """Returns ``aggregate`` or raises ValueError listing the valid ones."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}; choose from: {', '.join(AGGREGATES)}")
    return aggregate


def running_scores(step_scores, mask, aggregate: str = "max") -> np.ndarray:
    """``[B, T]`` the aggregate of each episode's valid step scores up to each step.

    Padding steps (``mask`` False) repeat the last valid value; a step before any
    valid one is ``-inf``.

    Args:
      step_scores: ``[B, T]`` per-step scores.
      mask: ``[B, T]`` valid steps.
      aggregate: one of :data:`AGGREGATES`.

    Example:
      >>> running_scores([[1.0, 3.0, 2.0]], [[True, True, True]], "max").tolist()
      [[1.0, 3.0, 3.0]]
    """
    check_aggregate(aggregate)
    scores = np.asarray(step_scores, np.float64)
    mask = np.asarray(mask, bool)
    if scores.ndim != 2 or scores.shape != mask.shape:
        raise ValueError(f"step_scores and mask must both be [B, T]; got {scores.shape} and "
                         f"{mask.shape}")
    count = np.cumsum(mask, axis=1)
    if aggregate == "max":
        running = np.maximum.accumulate(np.where(mask, scores, -np.inf), axis=1)
    elif aggregate in ("mean", "sum"):
        total = np.cumsum(np.where(mask, scores, 0.0), axis=1)
        running = total / np.maximum(count, 1) if aggregate == "mean" else total
    else:  # last: carry the last valid score forward
        index = np.maximum.accumulate(np.where(mask, np.arange(mask.shape[1]), -1), axis=1)
        running = np.take_along_axis(scores, np.maximum(index, 0), axis=1)
    return np.where(count > 0, running, -np.inf)


def aggregate_scores(step_scores, mask, aggregate: str = "max") -> np.ndarray:
    """``[B]`` trajectory scores: the aggregate of each episode's valid step scores.

    Example:
      >>> aggregate_scores([[1.0, 3.0, 9.0]], [[True, True, False]], "mean").tolist()
      [2.0]
    """
    return running_scores(step_scores, mask, aggregate)[:, -1]
