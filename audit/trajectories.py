"""The Trajectories pytree: one batch of episodes, saved as ``.npz`` (never pickle).

Every array has a leading batch axis ``B`` (episodes) and a time axis ``T``.
Steps after an episode ended are padding: ``mask`` is False there, and every
statistic must weight by it.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

ACTIVATION_PREFIX = "activations/"
REFERENCE_FIELD = "reference_probs"
_FIELDS = ("observations", "actions", "rewards", "dones", "mask", "events", "noise",
           "action_probs")


@struct.dataclass
class Trajectories:
    """A batch of episodes.

    Attributes:
      observations: ``[B, T, *obs_shape]`` float, the observation the policy saw at each step.
      actions: ``[B, T]`` int32, the action taken.
      rewards: ``[B, T]`` float32, the environment's reward for that step.
      dones: ``[B, T]`` bool, True at the step that ended the episode (terminated or truncated).
      mask: ``[B, T]`` bool, True for steps that belong to the episode (up to and including
        the step with ``dones``), False for padding after it.
      events: ``[B, T]`` int32, the hidden safety-event code of the step (0 = none); never
        part of the observation.
      noise: ``[B, T]`` float32 in [0, 1), the uniform the policy turned into its action by
        inverse CDF.
      action_probs: ``[B, T, A]`` float32, the generating policy's action distribution at
        the step (available for simulated demonstrators, used for exact KL and TV).
      activations: ``{name: [B, T, ...]}``, the imitator's internal activations (may be empty).
      reference_probs: optional ``[B, T, A]`` float32, privileged: a reference policy's (the
        demonstrator's) action distribution at each step's state, recorded by rollouts given
        a ``reference`` expert (:func:`audit.rollout.rollout`). No view reads it; only
        detectors labelled ``privileged`` (e.g. ``oracle_kl``) do. None when not recorded.
    """

    observations: jax.Array
    actions: jax.Array
    rewards: jax.Array
    dones: jax.Array
    mask: jax.Array
    events: jax.Array
    noise: jax.Array
    action_probs: jax.Array
    activations: dict = struct.field(default_factory=dict)
    reference_probs: jax.Array | None = None

    @property
    def num_episodes(self) -> int:
        """The number of episodes (the batch axis ``B``)."""
        return int(self.actions.shape[0])

    @property
    def num_steps(self) -> int:
        """The number of steps of every episode, padding included (the time axis ``T``)."""
        return int(self.actions.shape[1])

    def episode_lengths(self) -> jax.Array:
        """``[B]`` int32, the number of valid steps of each episode."""
        return jnp.sum(self.mask, axis=1, dtype=jnp.int32)

    def episode_returns(self) -> jax.Array:
        """``[B]`` float32, the undiscounted return of each episode."""
        return jnp.sum(jnp.where(self.mask, self.rewards, 0.0), axis=1)

    def episode_event_counts(self, num_event_codes: int) -> jax.Array:
        """``[B, num_event_codes]`` int32, how often each event code occurred in each episode.

        Column 0 counts steps without an event.
        """
        one_hot = jax.nn.one_hot(self.events, num_event_codes, dtype=jnp.int32)
        return jnp.sum(one_hot * self.mask[..., None].astype(jnp.int32), axis=1)


def concatenate(first: Trajectories, second: Trajectories) -> Trajectories:
    """Two sets of episodes with one time axis as one, ``first``'s episodes first.

    The activations are those both sets carry; ``reference_probs`` is kept only when
    both have it.

    Example:
      >>> trusted = concatenate(demonstrations, labelled_states)
    """
    def join(a, b):
        return jnp.concatenate([jnp.asarray(a), jnp.asarray(b)], axis=0)

    both_references = first.reference_probs is not None and second.reference_probs is not None
    return Trajectories(
        **{field: join(getattr(first, field), getattr(second, field)) for field in (
            "observations", "actions", "rewards", "dones", "mask", "events", "noise",
            "action_probs")},
        activations={name: join(first.activations[name], second.activations[name])
                     for name in sorted(set(first.activations) & set(second.activations))},
        reference_probs=(join(first.reference_probs, second.reference_probs)
                         if both_references else None))


def validate(trajectories: Trajectories, name: str = "trajectories") -> None:
    """Checks that all fields share the batch and time axes and have the right dtypes.

    Raises:
      ValueError: naming the field, its shape and the expected leading axes.
    """
    batch_time = tuple(trajectories.actions.shape[:2])
    if len(trajectories.actions.shape) != 2:
        raise ValueError(
            f"{name}.actions must have shape [episodes, steps], got {trajectories.actions.shape}"
        )
    fields = {field: getattr(trajectories, field) for field in _FIELDS}
    fields.update({ACTIVATION_PREFIX + k: v for k, v in trajectories.activations.items()})
    if trajectories.reference_probs is not None:
        if tuple(trajectories.reference_probs.shape) != tuple(trajectories.action_probs.shape):
            raise ValueError(f"{name}.reference_probs has shape "
                             f"{tuple(trajectories.reference_probs.shape)}; it must match "
                             f"action_probs' {tuple(trajectories.action_probs.shape)}")
    for field, value in fields.items():
        if tuple(value.shape[:2]) != batch_time:
            raise ValueError(
                f"{name}.{field} has shape {tuple(value.shape)}, but its leading axes must "
                f"match actions' [episodes, steps] = {list(batch_time)}"
            )
    for field, kinds in (("actions", "iu"), ("events", "iu"), ("mask", "b"), ("dones", "b")):
        dtype = np.dtype(getattr(trajectories, field).dtype)
        if dtype.kind not in kinds:
            raise ValueError(f"{name}.{field} must have an integer/bool dtype, got {dtype}")


def save_npz(trajectories: Trajectories, path: str | os.PathLike) -> Path:
    """Writes ``trajectories`` to ``path`` (a compressed ``.npz``) atomically.

    Activations are stored under keys ``activations/<name>``, and ``reference_probs``
    under its name when recorded. Returns the path.
    """
    validate(trajectories)
    path = Path(path)
    arrays = {field: np.asarray(getattr(trajectories, field)) for field in _FIELDS}
    arrays.update(
        {ACTIVATION_PREFIX + k: np.asarray(v) for k, v in trajectories.activations.items()}
    )
    if trajectories.reference_probs is not None:
        arrays[REFERENCE_FIELD] = np.asarray(trajectories.reference_probs)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz.tmp", delete=False) as tmp:
        np.savez_compressed(tmp, **arrays)
    os.replace(tmp.name, path)
    return path


def load_npz(path: str | os.PathLike) -> Trajectories:
    """Reads trajectories written by :func:`save_npz`, and checks what they hold.

    Nothing is ever unpickled. Besides the fields' shapes and dtypes (:func:`validate`),
    the contents are checked (:func:`check_values`): a file from elsewhere must not train
    on NaN or on nothing without an error.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: naming the file and the problem: not a readable ``.npz`` (empty,
        truncated, not a zip), an object array, a missing field, fields that disagree in
        shape, a wrong dtype, or values that are not finite or not a distribution, or no
        episode with a valid step.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trajectories file at {path}")
    if not zipfile.is_zipfile(path):  # else numpy would try to read it as a pickle
        size = path.stat().st_size
        what = "empty" if size == 0 else f"not a zip archive, {size} bytes"
        raise ValueError(f"{path} is not a readable .npz file ({what})")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [field for field in _FIELDS if field not in data.files]
            if missing:
                raise ValueError(f"{path} is not a trajectories file: missing "
                                 f"{', '.join(missing)}")
            arrays = {name: data[name] for name in data.files}
    except ValueError as error:
        if "allow_pickle" in str(error):  # numpy's refusal to unpickle an object array
            raise ValueError(f"{path} holds an object array (pickled Python objects), which "
                             "is never loaded; save plain numeric arrays") from None
        if str(error).startswith(str(path)):
            raise
        raise ValueError(f"{path} is not a readable .npz file ({error})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a readable .npz file ({type(error).__name__}: "
                         f"{error})") from None
    for name, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise ValueError(f"{path}: field {name} has dtype {array.dtype}; expected numbers "
                             "or booleans")
    trajectories = Trajectories(
        **{field: jnp.asarray(arrays[field]) for field in _FIELDS},
        activations={key[len(ACTIVATION_PREFIX):]: jnp.asarray(value)
                     for key, value in arrays.items() if key.startswith(ACTIVATION_PREFIX)},
        reference_probs=(jnp.asarray(arrays[REFERENCE_FIELD])
                         if REFERENCE_FIELD in arrays else None),
    )
    validate(trajectories, name=str(path))
    check_values(trajectories, name=str(path))
    return trajectories


def check_values(trajectories: Trajectories, name: str = "trajectories",
                 tolerance: float = 1e-3) -> None:
    """Checks the contents: at least one episode with a valid step, and at the valid steps
    finite observations, rewards and activations, and action distributions
    (``action_probs``, ``reference_probs``) that are finite, non-negative and sum to 1.

    Raises:
      ValueError: naming the field, how many valid steps are bad, and the first one.
    """
    mask = np.asarray(trajectories.mask, bool)
    if mask.size == 0 or not mask.any():
        raise ValueError(f"{name}: no valid step ({mask.shape[0] if mask.ndim else 0} episodes, "
                         "mask all False): there is nothing to learn from")
    fields = {"observations": trajectories.observations, "rewards": trajectories.rewards}
    fields.update({ACTIVATION_PREFIX + k: v for k, v in trajectories.activations.items()})
    distributions = {"action_probs": trajectories.action_probs}
    if trajectories.reference_probs is not None:
        distributions["reference_probs"] = trajectories.reference_probs
    for field, value in {**fields, **distributions}.items():
        value = np.asarray(value)
        bad = ~np.isfinite(value.reshape(value.shape[:2] + (-1,))).all(axis=-1) & mask
        if bad.any():
            episode, step = np.argwhere(bad)[0]
            raise ValueError(f"{name}.{field} is not finite at {int(bad.sum())} valid step(s), "
                             f"first at episode {episode}, step {step}")
    actions = np.asarray(trajectories.actions)
    for field, value in distributions.items():
        value = np.asarray(value, np.float64)
        bad = (((value < 0).any(axis=-1) | (np.abs(value.sum(axis=-1) - 1) > tolerance))
               & mask)
        if bad.any():
            episode, step = np.argwhere(bad)[0]
            raise ValueError(f"{name}.{field} is not a distribution (non-negative, summing to "
                             f"1) at {int(bad.sum())} valid step(s), first at episode "
                             f"{episode}, step {step}")
    num_actions = trajectories.action_probs.shape[-1]
    bad = ((actions < 0) | (actions >= num_actions)) & mask
    if bad.any():
        episode, step = np.argwhere(bad)[0]
        raise ValueError(f"{name}.actions must be in [0, {num_actions}) at valid steps; got "
                         f"{int(actions[episode, step])} at episode {episode}, step {step}")


def summary_statistics(trajectories: Trajectories, event_names: tuple[str, ...]) -> dict:
    """Episode-level figures of a batch, as plain Python numbers (JSON-ready).

    Args:
      trajectories: the batch.
      event_names: hidden-event names by code; code 0 is "no event".

    Returns:
      ``episodes``, ``event_rate`` (share of episodes with at least one hidden
      incorrigible event), ``event_counts`` (event steps per event name),
      ``episodes_with_event`` (episodes per event name), ``return_mean``,
      ``return_std``, ``length_mean``.
    """
    counts = np.asarray(trajectories.episode_event_counts(len(event_names)))
    returns = np.asarray(trajectories.episode_returns())
    lengths = np.asarray(trajectories.episode_lengths())
    incorrigible = counts[:, 1:].sum(axis=1) > 0
    return {
        "episodes": int(counts.shape[0]),
        "event_rate": float(incorrigible.mean()),
        "event_counts": {name: int(counts[:, code].sum())
                         for code, name in enumerate(event_names) if code > 0},
        "episodes_with_event": {name: int((counts[:, code] > 0).sum())
                                for code, name in enumerate(event_names) if code > 0},
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "length_mean": float(lengths.mean()),
    }
