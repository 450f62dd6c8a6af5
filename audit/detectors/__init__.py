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

GAN discriminators are detectors (:class:`audit.detectors.discriminator.DiscriminatorDetector`:
co-trained with the imitator, :meth:`~DiscriminatorDetector.from_gan`, or trained post
hoc on ``trusted`` vs ``untrusted``, :meth:`~DiscriminatorDetector.fit`); the suites
build them from the ``discriminators`` registry group.

Every other detector is registered by name as a :class:`DetectorSpec` in the
``detectors`` group, the built-ins exactly as a user's would be, through the
``audit.detectors`` entry points (``pyproject.toml``)::

    [project.entry-points."audit.detectors"]
    my_detector = "my_package.detectors:SPEC"

or in code with ``audit.registry.register("detectors", "my_detector", SPEC)``. A suite
then lists the name in ``Suite.baselines``. Built-ins
(:mod:`audit.detectors.baselines`): ``mahalanobis``, ``action_surprise``,
``linear_probe`` and ``noise_consistency``, fitted on demonstrations only, the
controls ``null`` and ``random_direction``, which should score at chance, and the
privileged ceiling ``oracle_kl``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

from audit.trajectories import Trajectories
from audit.views import check_view

AGGREGATES = ("max", "mean", "sum", "last")
# ``privileged``: a ceiling that reads what no deployed monitor has (the demonstrator's
# action distribution at the audited model's own states); labelled so in every table.
PROTOCOLS = ("co-trained", "post-hoc", "demonstrations-only", "privileged")


@runtime_checkable
class Detector(Protocol):
    """Scores steps of trajectories; see the module docstring."""

    #: the audit protocol its knowledge comes from, one of :data:`PROTOCOLS`.
    protocol: str

    def fit(self, trusted: Trajectories, untrusted: Trajectories | None = None) -> Detector:
        """Fits on ``trusted`` (and ``untrusted``, if its protocol reads them); returns self."""

    def score(self, trajectories: Trajectories) -> np.ndarray:
        """``[B, T]`` per-step scores of ``trajectories`` (higher = more suspicious)."""


@dataclasses.dataclass(frozen=True)
class DetectorContext:
    """What a suite knows when it builds a detector for one audited imitator.

    Attributes:
      num_actions: the environment's number of actions.
      observation_shape: the shape of one observation.
      seed: the seed of the run; a detector with randomness draws it from here.
      make_model: ``key -> imitator module`` of the suite's imitator architecture,
        for detectors that fit a model of the demonstrator (e.g. action surprise).
      zero_constant_features: whether features that never varied in the fitting data
        are held at 0 when scoring (see :meth:`audit.views.RunningNorm.normalize`);
        detectors that standardise features should follow it.
    """

    num_actions: int
    observation_shape: tuple[int, ...]
    seed: int = 0
    make_model: Callable[[jax.Array], Any] | None = None
    zero_constant_features: bool = False


@dataclasses.dataclass(frozen=True)
class DetectorSpec:
    """A named detector, as the ``detectors`` registry group holds it.

    Attributes:
      name: registry name, used as the ``detector`` of results rows.
      view: the view the detector reads (one of :data:`audit.views.VIEWS`), the
        results tables' column for it.
      make: ``make(context: DetectorContext) -> Detector``, an unfitted detector.
        A module-level function, so that suites can send the spec to worker
        processes.
      depends_on_imitator: False if the detector reads nothing of the audited
        imitator (e.g. a model of the demonstrator's actions): a suite then fits it
        once per data set and scores every audited imitator with it.
      description: one line for listings.
      privileged: True if it reads ``Trajectories.reference_probs`` (the demonstrator's
        action distribution at each state): a suite then records it in every audited
        model's rollouts. Such a detector is a ceiling, not a monitor; its protocol
        should be ``privileged``.

    Example:
      >>> from audit.detectors.baselines import MahalanobisDetector
      >>> def make_my_detector(context):
      ...     return MahalanobisDetector()
      >>> spec = DetectorSpec("my_detector", "activations", make_my_detector)
      >>> spec.build(DetectorContext(num_actions=6, observation_shape=(9, 9, 8))).protocol
      'demonstrations-only'
    """

    name: str
    view: str
    make: Callable[[DetectorContext], Detector]
    depends_on_imitator: bool = True
    description: str = ""
    privileged: bool = False

    def __post_init__(self):
        check_view(self.view)

    def build(self, context: DetectorContext) -> Detector:
        """``make(context)``, checked to meet the :class:`Detector` protocol."""
        detector = self.make(context)
        if not isinstance(detector, Detector) or detector.protocol not in PROTOCOLS:
            raise TypeError(f"detector {self.name!r}: make() must return an object with "
                            f"fit, score and a protocol in {PROTOCOLS}; got {detector!r}")
        return detector


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
