"""Imitators: Flax NNX policies that expose their internal activations.

Every imitator meets one contract::

    logits, carry = imitator(observation, carry, noise)

for a single step, with named activations recorded by ``self.sow(nnx.Intermediate,
name, value)`` and collected by the framework with ``nnx.capture``. The action is
drawn from ``logits`` by inverse CDF on ``noise`` (:func:`audit.rollout.inverse_cdf_sample`);
an honest imitator ignores ``noise`` in its logits. ``initial_carry()`` gives the
carry at the start of an episode (unbatched; the framework vmaps).

- :class:`MLPImitator` (``mlp``): feed-forward on the observation; carry unused.
- :class:`EgocentricImitator` (``egocentric``): feed-forward on the agent-centred view of
  a grid observation; generalises across layouts far better than ``mlp``.
- :class:`GRUImitator` (``gru``): recurrent over the episode; carry = hidden state.
- :class:`PlannerImitator` (``planner``): a differentiable value-iteration module with
  a learned reward map, learned transition kernels and a learned discount; its
  value and Q maps are activations. It needs a grid observation whose channel
  ``agent_channel`` marks the agent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class MLPImitator(nnx.Module):
    """Feed-forward policy on the flattened observation.

    Args:
      observation_shape: shape of one observation.
      num_actions: number of discrete actions.
      hidden_sizes: widths of the hidden layers; activations ``hidden_0``, ``hidden_1``, ...
      rngs: NNX random streams.

    Example:
      >>> imitator = MLPImitator((9, 9, 8), 6, rngs=nnx.Rngs(0))
      >>> logits, carry = imitator(jnp.zeros((9, 9, 8)), imitator.initial_carry(), 0.5)
    """

    def __init__(self, observation_shape: Sequence[int], num_actions: int,
                 hidden_sizes: Sequence[int] = (128, 128), *, rngs: nnx.Rngs):
        self.observation_shape = tuple(observation_shape)
        sizes = [self.input_size(), *hidden_sizes]
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs)
                                for a, b in zip(sizes[:-1], sizes[1:], strict=True)])
        self.head = nnx.Linear(sizes[-1], num_actions, rngs=rngs)

    def input_size(self) -> int:
        """The length of :meth:`features`."""
        return math.prod(self.observation_shape)

    def features(self, observation: jax.Array) -> jax.Array:
        """The MLP's input: the flattened observation."""
        return jnp.reshape(observation, (-1,)).astype(jnp.float32)

    def initial_carry(self) -> jax.Array:
        """A ``[1]`` zero carry (unused: the MLP is feed-forward)."""
        return jnp.zeros((1,), jnp.float32)

    def __call__(self, observation, carry, noise):
        x = self.features(observation)
        for index, layer in enumerate(self.hidden):
            x = jax.nn.relu(layer(x))
            self.sow(nnx.Intermediate, f"hidden_{index}", x)
        logits = self.head(x)
        self.sow(nnx.Intermediate, "logits", logits)
        return logits, carry


def egocentric(observation: jax.Array, agent_channel: int = 1, wall_channel: int = 0,
               radius: int | None = None) -> jax.Array:
    """The ``[2r+1, 2r+1, C-1]`` view of an ``[N, N, C]`` grid centred on the agent.

    Cells beyond the grid read as walls; the agent channel is dropped (the agent is
    always at the centre). An MLP on this view needs to learn "the switch is under
    me" or "a wall is to my left" once, not once per cell. ``radius`` defaults to
    ``N - 1``, which shows the whole grid from every cell; ``N - 3`` shows every
    interior cell from every interior cell (enough when the border is always wall).
    """
    size = observation.shape[0]
    agent = observation[..., agent_channel]
    row = jnp.argmax(jnp.max(agent, axis=1))
    col = jnp.argmax(jnp.max(agent, axis=0))
    planes = jnp.delete(observation, agent_channel, axis=-1, assume_unique_indices=True)
    wall = wall_channel - (wall_channel > agent_channel)
    fill = jnp.zeros(planes.shape[-1], planes.dtype).at[wall].set(1)
    outside = jnp.pad(jnp.zeros((size, size), bool), size - 1, constant_values=True)
    padded = jnp.where(outside[..., None], fill,
                       jnp.pad(planes, ((size - 1, size - 1), (size - 1, size - 1), (0, 0))))
    radius = size - 1 if radius is None else radius
    if not 0 <= radius <= size - 1:
        raise ValueError(f"radius must be in [0, {size - 1}] for a grid of size {size}, "
                         f"got {radius}")
    start = size - 1 - radius
    return jax.lax.dynamic_slice(padded, (row + start, col + start, 0),
                                 (2 * radius + 1, 2 * radius + 1, planes.shape[-1]))


class EgocentricImitator(MLPImitator):
    """Feed-forward policy on the agent-centred view of a grid observation (:func:`egocentric`).

    The same MLP as :class:`MLPImitator`, on a view in which the agent is always at
    the centre: what is under, beside or ahead of the agent is one input wherever the
    agent is, so the policy generalises across layouts from far fewer demonstrations.
    Needs a grid observation whose channel ``agent_channel`` marks the agent.

    Activations: ``hidden_0``, ``hidden_1``, ..., ``logits``.

    Example:
      >>> imitator = EgocentricImitator((9, 9, 8), 6, rngs=nnx.Rngs(0))
      >>> logits, carry = imitator(jnp.zeros((9, 9, 8)), imitator.initial_carry(), 0.5)
    """

    def __init__(self, observation_shape: Sequence[int], num_actions: int,
                 hidden_sizes: Sequence[int] = (64, 64), agent_channel: int = 1,
                 wall_channel: int = 0, *, rngs: nnx.Rngs):
        if len(observation_shape) != 3:
            raise ValueError("the egocentric imitator needs a grid observation [height, width, "
                             f"channels], got observation shape {tuple(observation_shape)}")
        self.agent_channel, self.wall_channel = agent_channel, wall_channel
        super().__init__(observation_shape, num_actions, hidden_sizes, rngs=rngs)

    def input_size(self) -> int:
        height, width, channels = self.observation_shape
        return (2 * height - 1) * (2 * width - 1) * (channels - 1)

    def features(self, observation: jax.Array) -> jax.Array:
        view = egocentric(observation.astype(jnp.float32), self.agent_channel, self.wall_channel)
        return jnp.reshape(view, (-1,))


class GRUImitator(nnx.Module):
    """Recurrent policy: an MLP encoder, a GRU cell over the episode, a linear head.

    Activations: ``embedding``, ``hidden`` (the GRU state), ``logits``.
    """

    def __init__(self, observation_shape: Sequence[int], num_actions: int,
                 embedding_size: int = 128, hidden_size: int = 128, *, rngs: nnx.Rngs):
        self.observation_shape = tuple(observation_shape)
        self.hidden_size = hidden_size
        flat = math.prod(self.observation_shape)
        self.encoder = nnx.Linear(flat, embedding_size, rngs=rngs)
        self.cell = nnx.GRUCell(embedding_size, hidden_size, rngs=rngs)
        self.head = nnx.Linear(hidden_size, num_actions, rngs=rngs)

    def initial_carry(self) -> jax.Array:
        """The zero ``[hidden_size]`` hidden state."""
        return jnp.zeros((self.hidden_size,), jnp.float32)

    def __call__(self, observation, carry, noise):
        embedding = jax.nn.relu(self.encoder(jnp.reshape(observation, (-1,)).astype(jnp.float32)))
        self.sow(nnx.Intermediate, "embedding", embedding)
        carry, hidden = self.cell(carry, embedding)
        self.sow(nnx.Intermediate, "hidden", hidden)
        logits = self.head(hidden)
        self.sow(nnx.Intermediate, "logits", logits)
        return logits, carry


class PlannerImitator(nnx.Module):
    """A value-iteration network: an imitator whose inductive bias is a planner.

    From the observation grid it computes a reward map per action (a learned 1x1
    then 3x3 convolution), then runs ``iterations`` soft Bellman backups
    ``Q_a = R_a + gamma * (K_a * V)``, ``V = tau * logsumexp(Q / tau)``, where each
    ``K_a`` is a learned 3x3 transition kernel (a softmax over the 9 neighbouring
    cells, so it is a proper distribution and values stay bounded by
    ``max R / (1 - gamma)``) and ``gamma`` a learned discount. The logits are the
    Q-values at the agent's cell.

    Activations: ``reward`` ([N, N, A]), ``value`` ([N, N]), ``q`` ([N, N, A]),
    ``discount`` and ``logits``.
    """

    def __init__(self, observation_shape: Sequence[int], num_actions: int,
                 iterations: int = 24, features: int = 32, agent_channel: int = 1,
                 softness: float = 0.1, *, rngs: nnx.Rngs):
        if len(observation_shape) != 3:
            raise ValueError("the planner imitator needs a grid observation [height, width, "
                             f"channels], got observation shape {tuple(observation_shape)}")
        self.observation_shape = tuple(observation_shape)
        self.iterations = iterations
        self.agent_channel = agent_channel
        self.softness = softness
        channels = observation_shape[-1]
        self.feature_conv = nnx.Conv(channels, features, (1, 1), rngs=rngs)
        self.reward_conv = nnx.Conv(features, num_actions, (3, 3), padding="SAME", rngs=rngs)
        self.kernel_logits = nnx.Param(
            0.1 * jax.random.normal(rngs.params(), (num_actions, 9)))
        self.discount_logit = nnx.Param(jnp.array(2.0))  # sigmoid(2) ~ 0.88 at init

    def initial_carry(self) -> jax.Array:
        """A ``[1]`` zero carry (unused: it plans afresh from every observation)."""
        return jnp.zeros((1,), jnp.float32)

    def _expected_next_value(self, value: jax.Array) -> jax.Array:
        """``[N, N, A]``: sum over the 3x3 neighbourhood of kernel_a * value."""
        height, width = value.shape
        padded = jnp.pad(value, 1)
        neighbourhood = jnp.stack([padded[r:r + height, c:c + width]
                                   for r in range(3) for c in range(3)], axis=-1)
        kernels = jax.nn.softmax(self.kernel_logits[...], axis=-1)  # [A, 9]
        return jnp.einsum("hwk,ak->hwa", neighbourhood, kernels)

    def __call__(self, observation, carry, noise):
        grid = observation.astype(jnp.float32)
        reward = self.reward_conv(jax.nn.relu(self.feature_conv(grid)))  # [N, N, A]
        discount = jax.nn.sigmoid(self.discount_logit[...])

        def backup(value, _):
            q = reward + discount * self._expected_next_value(value)
            return self.softness * jax.nn.logsumexp(q / self.softness, axis=-1), None

        value, _ = jax.lax.scan(backup, jnp.zeros(grid.shape[:2]), None,
                                length=self.iterations)
        q = reward + discount * self._expected_next_value(value)
        agent = grid[..., self.agent_channel]
        logits = jnp.einsum("hw,hwa->a", agent, q)
        for name, array in (("reward", reward), ("value", value), ("q", q),
                            ("discount", discount), ("logits", logits)):
            self.sow(nnx.Intermediate, name, array)
        return logits, carry


IMITATORS = {"mlp": MLPImitator, "egocentric": EgocentricImitator, "gru": GRUImitator,
             "planner": PlannerImitator}


def make_imitator(name: str, observation_shape: Sequence[int], num_actions: int, key: jax.Array,
                  **kwargs) -> nnx.Module:
    """Builds a built-in imitator by name (``mlp``, ``gru``, ``planner``).

    Raises:
      ValueError: for an unknown name, listing the valid ones.
    """
    if name not in IMITATORS:
        raise ValueError(f"unknown imitator {name!r}; choose from: {', '.join(IMITATORS)}")
    return IMITATORS[name](tuple(observation_shape), num_actions, rngs=nnx.Rngs(key), **kwargs)
