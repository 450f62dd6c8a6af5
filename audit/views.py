"""Discriminator views: what information about a trajectory a discriminator reads.

| view | features per step |
| --- | --- |
| ``actions`` | the action (one-hot) |
| ``transitions`` | the observation (flattened) and the action |
| ``activations`` | the above and the selected imitator activations (flattened) |
| ``activations+noise`` | the above and the uniform noise the policy was handed |

For demonstrator trajectories the activations are the imitator's teacher-forced
activations (:func:`audit.rollout.teacher_forced_activations`), so both classes
carry the same kind of features and only the plan differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from audit.trajectories import Trajectories

VIEWS = ("actions", "transitions", "activations", "activations+noise")


def check_view(view: str) -> str:
    """Returns ``view`` or raises ValueError listing the valid views."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose from: {', '.join(VIEWS)}")
    return view


def view_features(trajectories: Trajectories, view: str, num_actions: int,
                  activation_names: Sequence[str] | None = None) -> jax.Array:
    """``[B, T, F]`` float32 features of ``view``.

    Args:
      trajectories: the batch; for the activation views its ``activations`` must hold
        the selected names.
      view: one of :data:`VIEWS`.
      num_actions: size of the action one-hot.
      activation_names: activations to include (default: all, sorted by name).

    Raises:
      ValueError: for an unknown view, or an activation view without activations or
        with a name that is missing (the message lists what is there).
    """
    check_view(view)
    batch, steps = trajectories.actions.shape
    parts = [jax.nn.one_hot(trajectories.actions, num_actions, dtype=jnp.float32)]
    if view != "actions":
        parts.insert(0, trajectories.observations.reshape(batch, steps, -1).astype(jnp.float32))
    if view.startswith("activations"):
        available = sorted(trajectories.activations)
        names = sorted(activation_names) if activation_names is not None else available
        missing = [name for name in names if name not in trajectories.activations]
        if not names or missing:
            raise ValueError(
                f"view {view!r} needs activations {missing or '(any)'}; the trajectories have: "
                f"{', '.join(available) or 'none'}"
            )
        parts.extend(trajectories.activations[name].reshape(batch, steps, -1).astype(jnp.float32)
                     for name in names)
    if view == "activations+noise":
        parts.append(trajectories.noise[..., None].astype(jnp.float32))
    return jnp.concatenate(parts, axis=-1)


@struct.dataclass
class RunningNorm:
    """Running mean and variance of features (Chan et al.'s parallel update).

    Example:
      >>> norm = RunningNorm.create(features.shape[-1]).update(features, mask)
      >>> normalised = norm.normalize(features)
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array

    @classmethod
    def create(cls, size: int) -> RunningNorm:
        return cls(jnp.zeros(size), jnp.ones(size), jnp.zeros(()))

    def update(self, features: jax.Array, mask: jax.Array) -> RunningNorm:
        """Folds the valid rows (``mask``) of ``[..., F]`` features into the statistics."""
        weights = mask.reshape(-1).astype(jnp.float32)
        flat = features.reshape(-1, features.shape[-1])
        count = jnp.sum(weights)
        mean = jnp.sum(flat * weights[:, None], 0) / jnp.maximum(count, 1)
        var = jnp.sum(jnp.square(flat - mean) * weights[:, None], 0) / jnp.maximum(count, 1)
        total = self.count + count
        delta = mean - self.mean
        new_mean = self.mean + delta * count / jnp.maximum(total, 1)
        m2 = (self.var * self.count + var * count
              + jnp.square(delta) * self.count * count / jnp.maximum(total, 1))
        return RunningNorm(new_mean, m2 / jnp.maximum(total, 1), total)

    def normalize(self, features: jax.Array) -> jax.Array:
        return (features - self.mean) / jnp.sqrt(self.var + 1e-6)
