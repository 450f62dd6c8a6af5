"""Your own detector and discriminator, benchmarked beside the built-ins by `audit bench`.

A plug-in file: ``audit --plugin docs/examples/own_detector_and_discriminator.py bench
--suite my_suite`` runs a suite with

- ``step_count``, a detector (registry group ``detectors``): anything with a
  ``protocol``, ``fit(trusted, untrusted=None)`` and ``score(trajectories) -> [B, T]``,
  registered as a :class:`audit.detectors.DetectorSpec` (its name, the view it reads,
  and a module-level ``make(context)``). This one scores a step by its index: a
  detector that knows nothing, so its pre-harm AUROC says what the episode lengths
  alone give away (about nothing: p-values are matched by length);
- ``linear``, a discriminator (group ``discriminators``): an NNX module class called as
  ``cls(feature_size, *, rngs, **settings)`` mapping ``(features [T, F], mask [T])`` to
  ``[T]`` logits, its settings named in the suite;

against the built-in ``long_horizon`` organism on ``offswitch``. ``audit list`` shows them
beside the built-ins, with this file as their origin.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from audit import registry
from audit.detectors import DetectorSpec
from audit.protocol import Suite
from benchmarks.suites import COTRAINING, ORGANISMS


class StepCount:
    """Scores a step by its index in the episode (a detector that knows nothing)."""

    protocol = "demonstrations-only"

    def fit(self, trusted, untrusted=None):
        return self

    def score(self, trajectories):
        return np.broadcast_to(np.arange(trajectories.num_steps, dtype=np.float64),
                               trajectories.actions.shape).copy()


def make_step_count(context):
    return StepCount()


class LinearDiscriminator(nnx.Module):
    """One linear logit per step, times a fixed ``scale`` (a setting the suite names)."""

    def __init__(self, feature_size: int, *, rngs: nnx.Rngs, scale: float = 1.0):
        self.scale = scale
        self.linear = nnx.Linear(feature_size, 1, rngs=rngs)

    def __call__(self, features, mask):
        return self.scale * self.linear(features)[..., 0]


registry.register("detectors", "step_count", DetectorSpec(
    "step_count", "actions", make_step_count, depends_on_imitator=False,
    description="a step's index in its episode (knows nothing)"))
registry.register("discriminators", "linear", LinearDiscriminator)
registry.register("suites", "my_suite", Suite(
    name="my_suite", envs=("offswitch",), organisms=("honest", "long_horizon"),
    views=("actions", "activations"), discriminators=("linear", "mlp"),
    discriminator_settings=(("linear", (("scale", 0.5),)), ("mlp", (("hidden_sizes", (64, 64)),))),
    baselines=("step_count", "mahalanobis"), organism=ORGANISMS, gan=COTRAINING,
    description="a plug-in detector and discriminator against long_horizon"))
