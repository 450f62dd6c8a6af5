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

:func:`feature_layout` says which features are which (the parts' names and slices),
for discriminators whose structure depends on it
(:class:`models.discriminators.AIRLDiscriminator`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from audit.trajectories import Trajectories

VIEWS = ("actions", "transitions", "activations", "activations+noise")
NORM_CLIP = 10.0  # standardised features are clipped to this magnitude (as SB3's VecNormalize)
VARIANCE_FLOOR = 1e-8  # features with less variance than this count as constant
# The scale a feature that never varied is standardised with: the unit scale every other
# standardised feature has, so that its change is neither hidden (0) nor amplified. (A floor
# of 0.1 made a change of 1 read as 10 standard deviations, the clip; in the quick suite the
# model-specific reactions to such inputs failed the honest-vs-honest control.)
SCALE_FLOOR = 1.0
# The parts of the step features each view reads, in feature order.
VIEW_PARTS = {
    "actions": ("action",),
    "transitions": ("observation", "action"),
    "activations": ("observation", "action", "activations"),
    "activations+noise": ("observation", "action", "activations", "noise"),
}


def check_view(view: str) -> str:
    """Returns ``view`` or raises ValueError listing the valid views."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose from: {', '.join(VIEWS)}")
    return view


@dataclasses.dataclass(frozen=True)
class FeaturePart:
    """One part of a view's step features: ``features[..., start:stop]``.

    Attributes:
      name: ``"observation"``, ``"action"``, ``"activation:<name>"`` (one per activation,
        ``<name>`` as recorded, e.g. ``logits`` or ``path/logits``) or ``"noise"``.
      start: its first feature index.
      stop: one past its last feature index.
      shape: the part's shape before it was flattened, where known (the observation's
        ``[N, N, C]`` grid, for discriminators that read it as an image); ``()`` if not.
    """

    name: str
    start: int
    stop: int
    shape: tuple[int, ...] = dataclasses.field(default=(), repr=False)

    @property
    def size(self) -> int:
        """The number of features of the part."""
        return self.stop - self.start

    @property
    def indices(self) -> tuple[int, ...]:
        """Its feature indices, ``start, ..., stop - 1``."""
        return tuple(range(self.start, self.stop))


@dataclasses.dataclass(frozen=True)
class FeatureLayout:
    """Which features of a view are which: its parts, in feature order (hashable).

    Built by :func:`feature_layout` from trajectories' shapes, or by hand with
    :meth:`from_sizes`.

    Attributes:
      parts: the :class:`FeaturePart` entries, contiguous from feature 0.

    Example:
      >>> layout = FeatureLayout.from_sizes([("observation", 3), ("action", 2)])
      >>> layout.names, layout.size
      (('observation', 'action'), 5)
      >>> layout.part("action")
      FeaturePart(name='action', start=3, stop=5)
    """

    parts: tuple[FeaturePart, ...]

    def __post_init__(self):
        object.__setattr__(self, "parts", tuple(self.parts))
        position = 0
        for part in self.parts:
            if not isinstance(part, FeaturePart) or part.start != position \
                    or part.stop < part.start:
                raise ValueError(f"FeatureLayout.parts must be contiguous FeatureParts from "
                                 f"feature 0; got {self.parts!r}")
            position = part.stop
        names = self.names
        if len(set(names)) != len(names):
            raise ValueError(f"FeatureLayout.parts must have distinct names; got {names}")

    @classmethod
    def from_sizes(cls, sizes: Sequence[tuple[str, int]]) -> FeatureLayout:
        """The layout of consecutive parts ``[(name, size), ...]``.

        Raises:
          ValueError: for a negative size or a repeated name.
        """
        parts, start = [], 0
        for name, size in sizes:
            if int(size) < 0:
                raise ValueError(f"FeatureLayout.from_sizes: part {name!r} has negative size "
                                 f"{size}")
            parts.append(FeaturePart(str(name), start, start + int(size)))
            start += int(size)
        return cls(tuple(parts))

    @property
    def size(self) -> int:
        """The total number of features (the ``F`` of ``features [T, F]``)."""
        return self.parts[-1].stop if self.parts else 0

    @property
    def names(self) -> tuple[str, ...]:
        """The parts' names, in feature order."""
        return tuple(part.name for part in self.parts)

    def part(self, name: str) -> FeaturePart | None:
        """The part named ``name``, or None if the layout has none."""
        for part in self.parts:
            if part.name == name:
                return part
        return None

    def __iter__(self) -> Iterator[FeaturePart]:
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)


ACTIVATION_PART_PREFIX = "activation:"  # a layout part "activation:<name>" per activation


def feature_layout(trajectories: Trajectories, view: str, num_actions: int,
                   activation_names: Sequence[str] | None = None) -> FeatureLayout:
    """The :class:`FeatureLayout` of ``view_features(trajectories, view, ...)``.

    One part per block of the features, in feature order: ``"observation"``
    (flattened), ``"action"`` (one-hot), ``"activation:<name>"`` for each activation
    (flattened, sorted by name) and ``"noise"``, as far as ``view`` reads them. Only the
    shapes of ``trajectories`` are read (``jax.ShapeDtypeStruct`` leaves will do).

    Args:
      trajectories: the batch (or its shapes).
      view: one of :data:`VIEWS`.
      num_actions: size of the action one-hot.
      activation_names: activations included (default: all, sorted by name).

    Returns:
      The layout; its ``size`` is the feature size of the view.

    Raises:
      ValueError: as :func:`view_features` (unknown view, missing activations).

    Example:
      >>> layout = feature_layout(trajectories, "activations", 6, ["logits"])
      >>> layout.names  # with observations [B, T, 9, 9, 8] and logits [B, T, 6]
      ('observation', 'action', 'activation:logits')
      >>> layout.part("activation:logits")
      FeaturePart(name='activation:logits', start=654, stop=660)
    """
    check_view(view)
    sizes = {
        "observation": lambda: [("observation", math.prod(trajectories.observations.shape[2:]))],
        "action": lambda: [("action", num_actions)],
        "activations": lambda: [
            (ACTIVATION_PART_PREFIX + name, math.prod(trajectories.activations[name].shape[2:]))
            for name in _activation_names(trajectories, view, activation_names)],
        "noise": lambda: [("noise", 1)],
    }
    layout = FeatureLayout.from_sizes([entry for part in VIEW_PARTS[view]
                                       for entry in sizes[part]()])
    observation_shape = tuple(int(n) for n in trajectories.observations.shape[2:])
    return FeatureLayout(tuple(dataclasses.replace(part, shape=observation_shape)
                               if part.name == "observation" else part for part in layout))


def view_features(trajectories: Trajectories, view: str, num_actions: int,
                  activation_names: Sequence[str] | None = None) -> jax.Array:
    """``[B, T, F]`` float32 features of ``view``.

    The parts come in a fixed order: observation (flattened), action (one-hot),
    activations (flattened, sorted by name), noise; a view has a prefix-free subset of
    them (``actions`` has the action alone).

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
    parts = _view_parts(trajectories, view, num_actions, activation_names)
    return jnp.concatenate([part for _, part in parts], axis=-1)


def _view_parts(trajectories: Trajectories, view: str, num_actions: int,
                activation_names: Sequence[str] | None) -> list[tuple[str, jax.Array]]:
    """``[(part name, [B, T, size])]`` of ``view`` in feature order."""
    batch, steps = trajectories.actions.shape
    arrays = {
        "observation": lambda: [trajectories.observations.reshape(batch, steps, -1)],
        "action": lambda: [jax.nn.one_hot(trajectories.actions, num_actions)],
        "activations": lambda: [trajectories.activations[name].reshape(batch, steps, -1)
                                for name in _activation_names(trajectories, view,
                                                              activation_names)],
        "noise": lambda: [trajectories.noise[..., None]],
    }
    return [(part, array.astype(jnp.float32)) for part in VIEW_PARTS[view]
            for array in arrays[part]()]


def _activation_names(trajectories: Trajectories, view: str,
                      activation_names: Sequence[str] | None) -> list[str]:
    available = sorted(trajectories.activations)
    names = sorted(activation_names) if activation_names is not None else available
    missing = [name for name in names if name not in trajectories.activations]
    if not names or missing:
        raise ValueError(
            f"view {view!r} needs activations {missing or '(any)'}; the trajectories have: "
            f"{', '.join(available) or 'none'}"
        )
    return names


def richest_view(views: Sequence[str]) -> str:
    """The view whose features contain every other view's in ``views``.

    The views are nested (each reads everything the one before it reads), so this is
    the last of ``views`` in the order of :data:`VIEWS`.
    """
    if not views:
        raise ValueError("views must name at least one view")
    for view in views:
        check_view(view)
    return max(views, key=VIEWS.index)


def view_mask(view: str, features_view: str, trajectories: Trajectories, num_actions: int,
              activation_names: Sequence[str] | None = None) -> np.ndarray:
    """``[F]`` float32 mask of the features of ``view`` within those of ``features_view``.

    ``view_features(t, features_view, ...) * view_mask(view, features_view, t, ...)`` has
    the features of ``view`` in place and zeros elsewhere, so one discriminator input
    serves every view nested in ``features_view``: a first layer whose inputs are always
    zero gets zero gradient on them, and behaves as if they were absent. Only the
    shapes of ``trajectories`` are read (``jax.ShapeDtypeStruct`` leaves will do).

    Raises:
      ValueError: if ``view`` reads something ``features_view`` lacks.
    """
    check_view(view)
    check_view(features_view)
    if VIEWS.index(view) > VIEWS.index(features_view):
        raise ValueError(f"view {view!r} reads more than {features_view!r} provides")
    layout = feature_layout(trajectories, features_view, num_actions, activation_names)
    return np.concatenate([np.full(part.size, _view_part_of(part.name) in VIEW_PARTS[view],
                                   np.float32) for part in layout])


def _view_part_of(name: str) -> str:
    """The entry of :data:`VIEW_PARTS` a layout part belongs to."""
    return "activations" if name.startswith(ACTIVATION_PART_PREFIX) else name


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
        return _update_norm(self, features, mask)

    def _update(self, features: jax.Array, mask: jax.Array) -> RunningNorm:
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

    def normalize(self, features: jax.Array, zero_constant: bool = False) -> jax.Array:
        """Standardised features, clipped to +-``NORM_CLIP``.

        A feature that never varied in the statistics (an action never taken in
        training, an observation plane that was constant) is standardised with the
        scale :data:`SCALE_FLOOR`: it is 0 wherever it keeps its old value, and a later
        change in it (the first "interact", a supervisor who is absent) is visible, as a
        large input. With ``zero_constant`` such a feature is held at 0 instead, so that
        no change in it can move a model's output through weights that were never
        trained on it (novelty is then invisible to everything that reads these
        features).
        """
        constant = self.var <= VARIANCE_FLOOR
        scale = jnp.where(constant, SCALE_FLOOR, jnp.sqrt(self.var + 1e-6))
        scaled = jnp.clip((features - self.mean) / scale, -NORM_CLIP, NORM_CLIP)
        return jnp.where(constant, 0.0, scaled) if zero_constant else scaled


# Jitted (it runs eagerly, op by op, when a detector is fitted outside a traced loop).
_update_norm = jax.jit(RunningNorm._update)
