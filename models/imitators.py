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

import functools
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


# --- Neighbourhoods on a grid ------------------------------------------------------
#
# Neighbour j = 3 r + c of cell (h, w) is (h + r - 1, w + c - 1); cells off the grid have
# value 0. The maps below have the grid's two axes first; any axes after them ride along.


def _neighbour_maps(x: jax.Array, transposed: bool = False) -> list[jax.Array]:
    """The nine maps ``x[neighbour j of (h, w)]``, ``j = 0..8``, from one zero padding.

    With ``transposed``, the opposite shifts (``x[(h, w) - offset j]``): what the
    transpose of a neighbour sum sends back to each cell.
    """
    height, width = x.shape[:2]
    padded = jnp.pad(x, [(1, 1), (1, 1)] + [(0, 0)] * (x.ndim - 2))
    if transposed:
        return [padded[2 - r:2 - r + height, 2 - c:2 - c + width]
                for r in range(3) for c in range(3)]
    return [padded[r:r + height, c:c + width] for r in range(3) for c in range(3)]


# --- The reward network's 3x3 convolution ------------------------------------------


@jax.custom_vjp
def _offset_sum(by_offset: jax.Array) -> jax.Array:
    """``[H, W, ...]``: ``sum_j by_offset[neighbour j of (h, w), j]``, from ``[H, W, 9, ...]``.

    Cells off the grid contribute 0. Its gradient stacks the nine shifted cotangents into one
    array. Autodiff's own transposes each slice ``[:, :, j]`` into a zeroed copy of the
    whole padded input and adds the nine: with it the planner imitator's gradient took
    1.7-2.9x as long on 2 CPU cores at batches of 32 to 1,536 observations
    (``benchmarks/perf/planner.py``). Being a ``custom_vjp``, it has no forward-mode
    derivative.
    """
    return sum(neighbour[:, :, j] for j, neighbour in enumerate(_neighbour_maps(by_offset)))


def _offset_sum_forward(by_offset):
    return _offset_sum(by_offset), None


def _offset_sum_backward(_, cotangent):
    return (jnp.stack(_neighbour_maps(cotangent, transposed=True), axis=2),)


_offset_sum.defvjp(_offset_sum_forward, _offset_sum_backward)


# --- Soft value iteration with the batch axis last --------------------------------------
#
# The arrays below carry a trailing batch axis: a value map is [H, W, B], a reward or Q
# map [H, W, A, B], the kernels [A, 9, 1 or B] and the discount [1 or B] (size 1 when
# the batch shares them). Neighbours as in _neighbour_maps.


def _neighbour_sum(value: jax.Array, kernels: jax.Array) -> jax.Array:
    """``[H, W, A, ...]``: ``sum_j kernels[a, j] * value[neighbour j of (h, w)]``.

    ``value`` is ``[H, W, ...]`` and ``kernels`` ``[A, 9, ...]``, their trailing axes
    broadcasting (none for one unbatched map).
    """
    return sum(neighbour[:, :, None] * kernels[:, j]
               for j, neighbour in enumerate(_neighbour_maps(value)))


def _neighbour_sum_transpose(x: jax.Array, kernels: jax.Array) -> jax.Array:
    """``[H, W, B]``: the transpose of :func:`_neighbour_sum` applied to ``x [H, W, A, B]``.

    Each cell sends ``sum_a kernels[a, j] * x[a]`` back to its neighbour ``j``.
    """
    height, width, actions = x.shape[:3]
    total = 0.0
    for r in range(3):
        for c in range(3):
            # Sums over the action axis are written out (here and in _soft_maximum):
            # XLA then fuses them into the elementwise loop, where jnp.sum(axis=2)
            # became a separate reduction over materialised broadcasts, 2-3x slower.
            sent = sum(x[:, :, a] * kernels[a, 3 * r + c] for a in range(actions))
            padded = jnp.pad(sent, [(1, 1), (1, 1), (0, 0)])
            total = total + padded[2 - r:2 - r + height, 2 - c:2 - c + width]
    return total


def _soft_maximum(q: jax.Array, softness: float) -> jax.Array:
    """``softness * logsumexp(q / softness)`` over the action axis (2)."""
    actions = [q[:, :, a] for a in range(q.shape[2])]
    top = functools.reduce(jnp.maximum, actions)
    return top + softness * jnp.log(sum(jnp.exp((a - top) / softness) for a in actions))


def _value_iterates(reward, kernels, discount, softness: float, iterations: int):
    """``[iterations + 1, H, W, B]``: the values ``V_0 = 0, V_1, ..., V_n`` of the soft
    Bellman backups ``V_k = softness * logsumexp_a(Q_k / softness)``,
    ``Q_k = R + gamma * (K * V_{k-1})``."""

    def backup(value, _):
        value = _soft_maximum(reward + discount * _neighbour_sum(value, kernels), softness)
        return value, value

    start = jnp.zeros(reward.shape[:2] + reward.shape[3:], reward.dtype)
    _, values = jax.lax.scan(backup, start, length=iterations)
    return jnp.concatenate([start[None], values])


def _value_iterates_vjp(reward, kernels, discount, values, cotangent, softness: float):
    """``(d reward, d kernels, d discount)`` of ``V_n`` from its cotangent ``[H, W, B]``.

    The backward pass of soft value iteration is itself a linear recursion, run here
    from ``k = n`` down to 1: with the policy ``pi_k = softmax_a(Q_k / softness) =
    exp((Q_k - V_k) / softness)``, ``dQ_k = pi_k * dV_k``; then ``dR += dQ_k``,
    ``dV_{k-1} = gamma * K^T dQ_k``, ``dK_aj += gamma * sum dQ_ka * V_{k-1}[neighbour j]``
    and ``d gamma += sum dQ_k * (K * V_{k-1})``. ``Q_k`` is recomputed from the stored
    ``V_{k-1}``, so the forward pass keeps only the value maps. The kernel and discount
    gradients are per example (``[A, 9, B]``, ``[B]``), as vmap's semantics require; it
    sums them where the parameters are shared.
    """
    height = values.shape[1]

    def back(carry, pair):
        d_value, d_reward, products = carry
        before, after = pair
        q = reward + discount * _neighbour_sum(before, kernels)
        d_q = jnp.exp((q - after[:, :, None]) / softness) * d_value[:, :, None]
        neighbours = jnp.stack(_neighbour_maps(before), axis=2)
        # Accumulated per column [W, A, 9, B] (the rows summed as written-out adds, which
        # XLA fuses into the loop's elementwise pass) and over columns after the loop.
        # Per cell [H, W, A, 9, B] it was 15% slower in BC (a larger array read and
        # written every backup); jnp.sum over the rows, or over rows and columns, in
        # every backup became a separate reduction, up to 2x slower.
        products = products + sum(d_q[h, :, :, None] * neighbours[h, :, None]
                                  for h in range(height))
        return (discount * _neighbour_sum_transpose(d_q, kernels), d_reward + d_q,
                products), None

    batch = jnp.broadcast_shapes(reward.shape[3:], values.shape[3:], cotangent.shape[2:])
    start = (cotangent, jnp.zeros(reward.shape[:3] + batch, reward.dtype),
             jnp.zeros(reward.shape[1:3] + (9,) + batch, reward.dtype))
    (_, d_reward, products), _ = jax.lax.scan(back, start, (values[:-1], values[1:]),
                                              reverse=True)
    # correlation[a, j] = sum over backups and cells of dQ_a * V_{k-1}[neighbour j]
    correlation = jnp.sum(products, axis=0)
    d_kernels = discount * correlation
    d_discount = jnp.sum(kernels * correlation, axis=(0, 1))
    return d_reward, d_kernels, d_discount


def _batch_last(function):
    """``function`` of one example, run on a whole batch at once under ``jax.vmap``.

    ``function`` takes and returns arrays with a trailing batch axis (inputs of size 1
    there broadcast). Unbatched, the wrapper calls it on a batch of one; under vmap it
    moves the batch axis last instead of first, where XLA would put it, so the
    elementwise loops run over a contiguous batch of maps rather than over the 6
    actions or 9 columns of one map (the value iteration ran 2-3x faster so on CPU).
    """

    @jax.custom_batching.custom_vmap
    def one(*args):
        outs = function(*(jnp.asarray(arg)[..., None] for arg in args))
        return tuple(out[..., 0] for out in outs)

    @one.def_vmap
    def batched(axis_size, in_batched, *args):
        args = [jnp.moveaxis(arg, 0, -1) if is_batched else jnp.asarray(arg)[..., None]
                for arg, is_batched in zip(args, in_batched, strict=True)]
        outs = tuple(jnp.moveaxis(jnp.broadcast_to(out, out.shape[:-1] + (axis_size,)), -1, 0)
                     for out in function(*args))
        return outs, (True,) * len(outs)

    return one


@functools.lru_cache
def _soft_value_iteration(softness: float, iterations: int):
    """``(reward [H, W, A], kernels [A, 9], discount) -> V_n [H, W]``, one example.

    Its VJP is :func:`_value_iterates_vjp` rather than autodiff through the scan; forward
    and backward both run batch-last under vmap (:func:`_batch_last`). ``custom_vjp``
    wraps the ``custom_vmap`` functions, the order JAX supports, so grad of vmap (BC),
    vmap of grad (per-example gradients) and nested vmaps all work.
    """
    iterates = _batch_last(lambda *args: (_value_iterates(*args, softness, iterations),))
    iterates_vjp = _batch_last(lambda *args: _value_iterates_vjp(*args, softness))

    @jax.custom_vjp
    def value_iteration(reward, kernels, discount):
        return iterates(reward, kernels, discount)[0][-1]

    def forward(reward, kernels, discount):
        (values,) = iterates(reward, kernels, discount)
        return values[-1], (reward, kernels, discount, values)

    def backward(residuals, cotangent):
        return iterates_vjp(*residuals, cotangent)

    value_iteration.defvjp(forward, backward)
    return value_iteration


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

    How it computes (the function is the plain one above, up to float32 rounding; a test
    pins values and gradients to that plain definition): the two convolutions run as
    matrix products (:meth:`_reward`); the value iteration runs with the batch axis
    *last* under vmap (:func:`_batch_last`), so its elementwise loops are vectorised
    over examples instead of over 6 actions or 9 columns; and its gradient is the
    hand-written backward recursion :func:`_value_iterates_vjp`, which stores only the
    value maps, instead of autodiff through the scan. Together about 4x faster BC
    training and 3x faster rollouts on 2 CPU cores than the plain form
    (``benchmarks/perf/imitation.py``; piece by piece ``benchmarks/perf/planner.py``).
    What that costs: the value iteration has reverse-mode derivatives only (``jax.grad``
    and ``jax.vjp`` of any vmap order); ``jax.jvp`` and ``jax.jacfwd`` through it raise
    JAX's error for a ``custom_vjp``, and a gradient of a gradient works under ``vmap``
    (as cloning and the monitors run it) but not for one unbatched observation (JAX
    cannot linearise its ``custom_vmap``). The reward network (the ``reward``
    activation) has reverse-mode derivatives of any order but no forward-mode ones
    either (its shifted sum is a ``custom_vjp`` too).
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

    def _reward(self, grid: jax.Array) -> jax.Array:
        """``reward_conv(relu(feature_conv(grid)))`` computed as two matrix products.

        The 1x1 convolution is a product over channels. The 3x3 one (cross-correlation,
        zero padding) multiplies every cell's features by all 9 slices of the kernel at
        once (``[N*N, features] @ [features, 9 * A]``), then adds to each cell the
        slice ``j`` result of its neighbour ``j`` (:func:`_offset_sum`). On 2 CPU cores
        its gradient took 2-5x less time than that of the form before, a product of the
        9 shifted feature maps side by side (``[N*N, 9 * features]``), at batches of 32
        to 1,536 observations (``benchmarks/perf/planner.py``).
        """
        height, width = grid.shape[:2]
        features = jax.nn.relu(grid @ self.feature_conv.kernel[0, 0]
                               + self.feature_conv.bias[...])
        kernel = self.reward_conv.kernel[...]  # [3, 3, features, actions]
        by_offset = features @ jnp.moveaxis(kernel, 2, 0).reshape(kernel.shape[2], -1)
        return (_offset_sum(by_offset.reshape(height, width, 9, kernel.shape[-1]))
                + self.reward_conv.bias[...])

    def __call__(self, observation, carry, noise):
        grid = observation.astype(jnp.float32)
        reward = self._reward(grid)  # [N, N, A]
        discount = jax.nn.sigmoid(self.discount_logit[...])
        kernels = jax.nn.softmax(self.kernel_logits[...], axis=-1)  # [A, 9]
        value = _soft_value_iteration(self.softness, self.iterations)(reward, kernels, discount)
        q = reward + discount * _neighbour_sum(value, kernels)
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
