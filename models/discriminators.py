"""Discriminators: Flax NNX modules mapping a view of an episode to a logit per step.

Every discriminator is called as ``logits = discriminator(features, mask)`` on one
episode, ``features [T, F]`` (see :mod:`audit.views`) and ``mask [T]``, and returns
``[T]`` logits, positive for "imitator". Sequence discriminators are causal: the
logit at step ``t`` depends only on steps ``<= t``, so a plan can be flagged
before it is carried out. The exception is :class:`AIRLDiscriminator`, whose logit at
step ``t`` also reads step ``t + 1``'s observation (the ``s'`` of AIRL's
``f(s, a, s')``); it says so with the class attribute ``causal = False``.

- :class:`StepDiscriminator` (``mlp``): an MLP on each step's features alone.
- :class:`GRUDiscriminator` (``gru``): a GRU over the episode prefix.
- :class:`AttentionDiscriminator` (``attention``): causal self-attention over the prefix.
- :class:`AIRLDiscriminator` (``airl``): AIRL's structured discriminator, a reward
  term, a state-only shaping potential and the imitator's own ``log pi(a|s)``.
- :class:`EgocentricDiscriminator` (``egocentric``): an MLP on each step's grid
  re-centred on the agent, and the step's other features.
- :class:`PlannerDiscriminator` (``planner``): a learned bounded reward map and a
  differentiable value iteration over the grid; scores how unlikely the step's action
  is under the planner with the fitted reward.

A discriminator that can read episodes of a bounded length only (the attention
model's learned positions) says so in an integer attribute ``max_steps``; the
command line checks the environment's episode length against it before training.

Two optional parts of the contract, honoured wherever the framework builds and feeds
a discriminator (:mod:`audit.discriminator`): a class with a keyword-only ``layout``
parameter is given the :class:`audit.views.FeatureLayout` of the features it will
read (which features are the observation, the action, each activation, the noise),
and a module with an attribute ``raw_features`` (a tuple of feature indices) reads
those features as they are, not standardised by the running statistics.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from models.imitators import egocentric

if TYPE_CHECKING:
    from audit.views import FeatureLayout, FeaturePart


class StepDiscriminator(nnx.Module):
    """Per-step MLP discriminator."""

    def __init__(self, feature_size: int, hidden_sizes: Sequence[int] = (128, 128), *,
                 rngs: nnx.Rngs):
        sizes = [feature_size, *hidden_sizes]
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs)
                                for a, b in zip(sizes[:-1], sizes[1:], strict=True)])
        self.head = nnx.Linear(sizes[-1], 1, rngs=rngs)

    def __call__(self, features: jax.Array, mask: jax.Array) -> jax.Array:
        x = features
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        return self.head(x)[..., 0]


class GRUDiscriminator(nnx.Module):
    """Recurrent discriminator: an encoder, a GRU over the prefix, a linear head."""

    def __init__(self, feature_size: int, hidden_size: int = 128, *, rngs: nnx.Rngs):
        self.hidden_size = hidden_size
        self.encoder = nnx.Linear(feature_size, hidden_size, rngs=rngs)
        self.cell = nnx.GRUCell(hidden_size, hidden_size, rngs=rngs)
        self.head = nnx.Linear(hidden_size, 1, rngs=rngs)

    def __call__(self, features: jax.Array, mask: jax.Array) -> jax.Array:
        encoded = jax.nn.relu(self.encoder(features))
        graphdef, state = nnx.split(self.cell)

        def step(carry, x):
            carry, hidden = nnx.merge(graphdef, state)(carry, x)
            return carry, hidden

        _, hidden = jax.lax.scan(step, jnp.zeros((self.hidden_size,)), encoded)
        return self.head(hidden)[..., 0]


class AttentionDiscriminator(nnx.Module):
    """Causal self-attention discriminator with learned positional embeddings.

    It has one learned position per step, so it reads episodes of at most
    ``max_steps`` steps (default 512); longer ones are a ``ValueError`` when traced.
    """

    def __init__(self, feature_size: int, model_size: int = 64, heads: int = 4,
                 max_steps: int = 512, *, rngs: nnx.Rngs):
        self.encoder = nnx.Linear(feature_size, model_size, rngs=rngs)
        self.position = nnx.Embed(max_steps, model_size, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(num_heads=heads, in_features=model_size,
                                                decode=False, rngs=rngs)
        self.norm = nnx.LayerNorm(model_size, rngs=rngs)
        self.mlp = nnx.Linear(model_size, model_size, rngs=rngs)
        self.head = nnx.Linear(model_size, 1, rngs=rngs)
        self.max_steps = max_steps

    def __call__(self, features: jax.Array, mask: jax.Array) -> jax.Array:
        steps = features.shape[0]
        if steps > self.max_steps:
            raise ValueError(f"AttentionDiscriminator: an episode of {steps} steps exceeds its "
                             f"max_steps={self.max_steps}; build it with max_steps >= {steps}")
        x = self.encoder(features) + self.position(jnp.arange(steps))
        causal = nnx.make_causal_mask(jnp.ones((steps,)))
        valid = nnx.make_attention_mask(mask, mask)
        x = x + self.attention(x, mask=nnx.combine_masks(causal, valid))
        x = x + jax.nn.relu(self.mlp(self.norm(x)))
        return self.head(x)[..., 0]


ACTIVATION_PART_PREFIX = "activation:"  # as audit.views.ACTIVATION_PART_PREFIX


class AIRLDiscriminator(nnx.Module):
    """AIRL's structured discriminator (Fu et al. 2018), positive for "imitator".

    AIRL's discriminator is ``D = exp(f) / (exp(f) + pi(a|s))``, the probability that a
    step is the demonstrator's, with ``f(s, a, s') = g(s, a) + gamma h(s') - h(s)``: a
    reward term ``g`` and a state-only shaping potential ``h``. This module returns the
    log-odds of "imitator", ``logit_t = log pi(a_t|s_t) - f_t``, where

    - ``g`` is an MLP on the step's features, all of them (observation, action,
      activations, noise: whatever the view gives);
    - ``h`` is an MLP on the layout's ``"observation"`` part alone, and ``h(s')`` is
      that of the next step, ``f_t = g(x_t) + gamma h(obs_{t+1}) mask_{t+1} -
      h(obs_t)``: after an episode's last valid step the next state counts as terminal
      (``h = 0``), truncated episodes included;
    - ``log pi(a_t|s_t) = log_softmax(logits_t)[argmax(action_t)]``, where ``logits``
      is the imitator's activation named ``logits_name``: the layout part
      ``"activation:<logits_name>"``, or else the one part whose activation name ends
      in ``"/<logits_name>"`` (activations are recorded as ``logits`` or
      ``path/logits``). The logits and the action one-hot are listed in
      ``raw_features``, so the framework hands them over unstandardised.

    Only the activation views carry the logits (with ``activation_names`` that include
    them). On the ``actions`` and ``transitions`` views, or where a view mask zeroes
    the logits (``log_softmax(0)[a] = -log A``, a constant), the ``pi`` term is a
    constant, and the AIRL form reduces to a structured ``D = sigmoid(-f)`` up to a
    bias: a reward and a shaping potential, no policy term. On the ``actions`` view
    (no observation) ``h`` is absent as well. Without a ``layout`` (the registry's
    contract check builds discriminators from ``feature_size`` alone) ``g`` reads all
    the features and ``h`` and the ``pi`` term are absent: ``logit = -g(x)``.

    Not causal (``causal = False``): the logit of step ``t`` reads the observation of
    step ``t + 1``, the state the step's action led to. The audit's pre-harm windows
    end before the event step, so what it reads at their last step is the observation
    the last pre-harm action led to, still before the harm.

    Args:
      feature_size: ``F`` of the ``features [T, F]`` it reads.
      hidden_sizes: the hidden layer widths of ``g`` and of ``h`` (the capacity).
      gamma: the discount of the shaping term, in ``[0, 1]``.
      logits_name: the activation holding the imitator's action logits.
      layout: the features' :class:`audit.views.FeatureLayout` (None: unknown).
      rngs: initialisation.

    Raises:
      ValueError: for a ``gamma`` outside ``[0, 1]``, empty or non-positive
        ``hidden_sizes``, a ``layout`` whose size is not ``feature_size``, or logits
        that match several activations or differ in size from the action one-hot.

    Example:
      >>> layout = FeatureLayout.from_sizes([("observation", 3), ("action", 2),
      ...                                    ("activation:logits", 2)])
      >>> model = AIRLDiscriminator(7, (32, 32), layout=layout, rngs=nnx.Rngs(0))
      >>> logits = model(features, mask)  # features [T, 7], mask [T] -> [T]
    """

    causal = False  # the logit of step t reads step t + 1's observation

    def __init__(self, feature_size: int, hidden_sizes: Sequence[int] = (128, 128),
                 gamma: float = 0.99, logits_name: str = "logits", *,
                 layout: FeatureLayout | None = None, rngs: nnx.Rngs):
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"AIRLDiscriminator: gamma must be in [0, 1], got {gamma!r}")
        hidden_sizes = tuple(hidden_sizes)
        if not hidden_sizes or not all(_is_positive_int(size) for size in hidden_sizes):
            raise ValueError(f"AIRLDiscriminator: hidden_sizes must be one or more ints >= 1, "
                             f"got {hidden_sizes!r}")
        if layout is not None:
            if not hasattr(layout, "parts") or not hasattr(layout, "size"):
                raise ValueError(f"AIRLDiscriminator: layout must be an audit.views."
                                 f"FeatureLayout, got {type(layout).__name__}")
            if layout.size != feature_size:
                raise ValueError(f"AIRLDiscriminator: layout covers {layout.size} features, "
                                 f"but feature_size is {feature_size}")
        self.gamma = float(gamma)
        self.g = StepDiscriminator(feature_size, hidden_sizes, rngs=rngs)
        observation = _layout_part(layout, "observation")
        self.observation = (observation.start, observation.stop) if observation else None
        self.h = (StepDiscriminator(observation.size, hidden_sizes, rngs=rngs)
                  if observation else None)
        action = _layout_part(layout, "action")
        logits = _logits_part(layout, logits_name)
        if action and logits and action.size != logits.size:
            raise ValueError(f"AIRLDiscriminator: the logits activation {logits.name!r} has "
                             f"{logits.size} features but the action one-hot {action.size} "
                             f"(logits_name={logits_name!r})")
        with_policy = bool(action and logits)
        self.action = (action.start, action.stop) if with_policy else None
        self.policy_logits = (logits.start, logits.stop) if with_policy else None
        self.raw_features = ((*action.indices, *logits.indices) if with_policy else ())

    def __call__(self, features: jax.Array, mask: jax.Array) -> jax.Array:
        f = self.g(features, mask)
        if self.h is not None:
            start, stop = self.observation
            potential = self.h(features[..., start:stop], mask)
            valid = mask.astype(potential.dtype)
            next_potential = jnp.concatenate(
                [potential[..., 1:] * valid[..., 1:], jnp.zeros_like(potential[..., :1])], -1)
            f = f + self.gamma * next_potential - potential
        if self.policy_logits is None:
            return -f
        start, stop = self.policy_logits
        log_pi = jax.nn.log_softmax(features[..., start:stop])
        start, stop = self.action
        taken = jnp.argmax(features[..., start:stop], axis=-1)
        return jnp.take_along_axis(log_pi, taken[..., None], axis=-1)[..., 0] - f


class EgocentricDiscriminator(nnx.Module):
    """Per-step MLP discriminator on the agent-centred view of the grid.

    The observation grid of each step is re-centred on the agent
    (:func:`models.imitators.egocentric`: a ``[2r+1, 2r+1, C-1]`` window, cells beyond
    the grid read as walls, the agent's channel dropped), flattened and concatenated
    with the step's other features (activations and noise, as the view gives them). An
    MLP maps that to one output per action, and the step's logit is the output of the
    action taken, ``logit_t = MLP(s_t)[a_t]``: the discriminator has the structure of a
    policy's logits, so the demonstrator's ``log pi(a|s)`` against the imitator's is in
    its function class as readily as in a behaviour-cloned policy's. (With
    ``action_head=False`` the action one-hot is one more input instead.) What the
    demonstrator does relative to the goal, a wall or a switch ("the goal is up and to
    the right, and I move up") is then one pattern wherever it happens on the grid, not
    one per cell.

    It needs the raw grid: the layout's ``observation`` part with its ``[N, N, C]``
    shape, listed in ``raw_features`` with the action one-hot (handed over
    unstandardised); the other features are standardised as usual. Without a grid (no
    ``layout``, as the registry's contract check builds it, or a view without one) it is
    :class:`StepDiscriminator` on the features.

    Args:
      feature_size: ``F`` of the ``features [T, F]`` it reads.
      hidden_sizes: the MLP's hidden layer widths (the capacity).
      radius: the window's radius ``r`` (default ``N - 1``: the whole grid from every cell).
      agent_channel: the grid channel that marks the agent.
      wall_channel: the grid channel of walls (what lies beyond the grid reads as).
      action_head: one output per action, read at the action taken (else the action is
        an input and there is one output).
      layout: the features' :class:`audit.views.FeatureLayout` (None: unknown).
      rngs: initialisation.

    Raises:
      ValueError: for empty or non-positive ``hidden_sizes``, a ``layout`` whose size is
        not ``feature_size``, channels outside the grid or a radius outside ``[0, N-1]``.

    Example:
      >>> layout = feature_layout(trajectories, "transitions", 6)  # a 9 x 9 x 8 grid
      >>> model = EgocentricDiscriminator(layout.size, layout=layout, rngs=nnx.Rngs(0))
      >>> logits = model(features, mask)  # [T]
    """

    def __init__(self, feature_size: int, hidden_sizes: Sequence[int] = (128, 128),
                 radius: int | None = None, agent_channel: int = 1, wall_channel: int = 0,
                 action_head: bool = True, *, layout: FeatureLayout | None = None,
                 rngs: nnx.Rngs):
        hidden_sizes = tuple(hidden_sizes)
        if not hidden_sizes or not all(_is_positive_int(size) for size in hidden_sizes):
            raise ValueError(f"EgocentricDiscriminator: hidden_sizes must be one or more ints "
                             f">= 1, got {hidden_sizes!r}")
        if layout is not None and layout.size != feature_size:
            raise ValueError(f"EgocentricDiscriminator: layout covers {layout.size} features, "
                             f"but feature_size is {feature_size}")
        observation = _layout_part(layout, "observation")
        grid = tuple(getattr(observation, "shape", ())) if observation else ()
        if len(grid) != 3 or grid[0] != grid[1]:
            self.grid = None
            self.raw_features = ()
            self.mlp = StepDiscriminator(feature_size, hidden_sizes, rngs=rngs)
            return
        size, channels = grid[0], grid[-1]
        for name, channel in (("agent_channel", agent_channel), ("wall_channel", wall_channel)):
            if not 0 <= channel < channels or isinstance(channel, bool):
                raise ValueError(f"EgocentricDiscriminator: {name} {channel!r} is not a channel "
                                 f"of the {grid} grid")
        if agent_channel == wall_channel:
            raise ValueError("EgocentricDiscriminator: agent_channel and wall_channel must "
                             f"differ, both are {agent_channel}")
        radius = size - 1 if radius is None else radius
        if isinstance(radius, bool) or not isinstance(radius, int) or not 0 <= radius < size:
            raise ValueError(f"EgocentricDiscriminator: radius must be an int in [0, "
                             f"{size - 1}] for a grid of size {size}, got {radius!r}")
        self.grid, self.radius = grid, int(radius)
        self.agent_channel, self.wall_channel = int(agent_channel), int(wall_channel)
        self.observation = (observation.start, observation.stop)
        window = (2 * self.radius + 1) ** 2 * (channels - 1)
        action = _layout_part(layout, "action") if action_head else None
        self.action = (action.start, action.stop) if action else None
        # Other features than the grid and (with the action head) the action one-hot.
        self.rest = tuple(index for index in range(feature_size)
                          if not observation.start <= index < observation.stop
                          and not (action and action.start <= index < action.stop))
        sizes = [window + len(self.rest), *hidden_sizes]
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs)
                                for a, b in zip(sizes[:-1], sizes[1:], strict=True)])
        self.head = nnx.Linear(sizes[-1], action.size if action else 1, rngs=rngs)
        self.raw_features = tuple(observation.indices) + (tuple(action.indices) if action
                                                           else ())

    def __call__(self, features: jax.Array, mask: jax.Array) -> jax.Array:
        if self.grid is None:
            return self.mlp(features, mask)
        start, stop = self.observation
        grids = features[..., start:stop].reshape(-1, *self.grid)
        views = jax.vmap(lambda grid: egocentric(grid, self.agent_channel, self.wall_channel,
                                                 self.radius))(grids)
        x = jnp.concatenate([views.reshape(*features.shape[:-1], -1),
                             features[..., jnp.asarray(self.rest, jnp.int32)]], axis=-1)
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        outputs = self.head(x)
        if self.action is None:
            return outputs[..., 0]
        start, stop = self.action
        taken = jnp.argmax(features[..., start:stop], axis=-1)
        return jnp.take_along_axis(outputs, taken[..., None], axis=-1)[..., 0]


def _is_positive_int(value) -> bool:
    try:
        return not isinstance(value, bool) and operator.index(value) >= 1
    except TypeError:
        return False


def _layout_part(layout: FeatureLayout | None, name: str) -> FeaturePart | None:
    """The non-empty part ``name`` of ``layout`` (None: no layout, or no such part)."""
    if layout is None:
        return None
    part = layout.part(name)
    return part if part is not None and part.size > 0 else None


def _logits_part(layout: FeatureLayout | None, logits_name: str) -> FeaturePart | None:
    """The layout part of the activation ``logits_name``: ``activation:<logits_name>``
    exactly, else the one activation whose name ends in ``/<logits_name>``.

    Raises:
      ValueError: if several activations end in ``/<logits_name>``.
    """
    exact = _layout_part(layout, ACTIVATION_PART_PREFIX + logits_name)
    if exact is not None or layout is None:
        return exact
    matches = [part for part in layout if part.name.startswith(ACTIVATION_PART_PREFIX)
               and part.name.endswith("/" + logits_name) and part.size > 0]
    if len(matches) > 1:
        raise ValueError(f"AIRLDiscriminator: logits_name={logits_name!r} matches several "
                         f"activations: {', '.join(p.name for p in matches)}; name one in full")
    return matches[0] if matches else None


class PlannerDiscriminator(nnx.Module):
    """A discriminator with a planner's structure: a learned, bounded reward map and a
    differentiable value iteration over the observation grid.

    From the episode's layout (its first observation grid, the agent's channel cleared)
    it computes a reward per cell and action, capped at ``utility_cap``
    (``utility_cap * tanh``: a bounded utility), runs ``iterations``
    soft Bellman backups ``Q_a = R_a + gamma (K_a * V)``, ``V = tau logsumexp(Q / tau)``
    with learned 3x3 transition kernels ``K_a`` and a learned discount ``gamma`` (the
    machinery of :class:`models.imitators.PlannerImitator`; ``iterations`` is its
    horizon), and reads each step's Q-values at the agent's cell as a planner's policy
    ``pi_plan = softmax(Q / tau)``. Its logit, positive for "imitator", is how far the step's
    action is from what that bounded planner would do::

        logit_t = softplus(w) * (-log pi_plan(a_t | s_t)) + b

    Trained as a GAN discriminator, the reward map is fitted so that the
    demonstrator's actions are likely under the planner and the imitator's are not; a
    reward that explains the demonstrations can carry over to a new layout, where an
    MLP's decision boundary need not.

    It needs the raw grid and the action: the layout's ``observation`` part (with its
    ``[N, N, C]`` shape) and ``action`` part, both listed in ``raw_features`` (handed
    over unstandardised). Without them (no ``layout``, as the registry's contract check
    builds it, or a view without a grid) it is a linear score of the features. On the
    ``actions`` view inside richer features (the grid masked to zeros) its planner sees
    no agent and the score is constant. Causal: step ``t``'s logit reads steps 0 (the
    layout) and ``t`` (the agent and its action).

    Args:
      feature_size: ``F`` of the ``features [T, F]`` it reads.
      iterations: value-iteration backups (the planner's horizon).
      features: channels of the reward map's hidden convolution (the capacity).
      utility_cap: the bound on the reward of a cell and action.
      softness: the ``tau`` of the soft backups.
      agent_channel: the grid channel that marks the agent.
      layout: the features' :class:`audit.views.FeatureLayout` (None: unknown).
      rngs: initialisation.

    Raises:
      ValueError: for non-positive ``iterations``, ``features``, ``utility_cap`` or
        ``softness``, a ``layout`` whose size is not ``feature_size``, or an
        ``agent_channel`` outside the grid's channels.

    Example:
      >>> layout = feature_layout(trajectories, "transitions", 6)  # a 9 x 9 x 8 grid
      >>> model = PlannerDiscriminator(layout.size, layout=layout, rngs=nnx.Rngs(0))
      >>> logits = model(features, mask)  # [T]
    """

    def __init__(self, feature_size: int, iterations: int = 12, features: int = 16,
                 utility_cap: float = 1.0, softness: float = 0.1, agent_channel: int = 1, *,
                 layout: FeatureLayout | None = None, rngs: nnx.Rngs):
        for name, value in (("iterations", iterations), ("features", features)):
            if not _is_positive_int(value):
                raise ValueError(f"PlannerDiscriminator: {name} must be an int >= 1, got "
                                 f"{value!r}")
        for name, value in (("utility_cap", utility_cap), ("softness", softness)):
            if not float(value) > 0:
                raise ValueError(f"PlannerDiscriminator: {name} must be > 0, got {value!r}")
        if layout is not None and layout.size != feature_size:
            raise ValueError(f"PlannerDiscriminator: layout covers {layout.size} features, "
                             f"but feature_size is {feature_size}")
        observation = _layout_part(layout, "observation")
        action = _layout_part(layout, "action")
        grid = tuple(getattr(observation, "shape", ())) if observation else ()
        self.iterations, self.utility_cap, self.softness = (int(iterations),
                                                            float(utility_cap), float(softness))
        self.scale = nnx.Param(jnp.array(0.5413))  # softplus(0.5413) = 1
        self.bias = nnx.Param(jnp.array(0.0))
        if len(grid) != 3 or action is None:
            self.grid = None
            self.linear = nnx.Linear(feature_size, 1, rngs=rngs)
            self.raw_features = ()
            return
        if not 0 <= agent_channel < grid[-1]:
            raise ValueError(f"PlannerDiscriminator: agent_channel {agent_channel} is not a "
                             f"channel of the {grid} grid")
        self.grid, self.agent_channel = grid, int(agent_channel)
        self.observation = (observation.start, observation.stop)
        self.action = (action.start, action.stop)
        num_actions = action.size
        self.feature_conv = nnx.Conv(grid[-1], features, (1, 1), rngs=rngs)
        self.reward_conv = nnx.Conv(features, num_actions, (3, 3), padding="SAME", rngs=rngs)
        self.kernel_logits = nnx.Param(0.1 * jax.random.normal(rngs.params(),
                                                                (num_actions, 9)))
        self.discount_logit = nnx.Param(jnp.array(2.0))  # sigmoid(2) ~ 0.88
        self.raw_features = (*observation.indices, *action.indices)

    def planner_log_policy(self, grids: jax.Array) -> jax.Array:
        """``[T, A]`` log of the fitted bounded planner's policy at the agent's cell.

        It plans once per episode, on the layout as first observed (the first grid with
        the agent's channel cleared), and reads each step's Q-values at the agent's
        cell: in these gridworlds nothing but the agent moves, and what the agent itself
        changes (a disabled switch, seized control) comes at or after the harm.
        """
        layout_grid = grids[0].at[..., self.agent_channel].set(0.0)
        reward = self.utility_cap * jnp.tanh(
            self.reward_conv(jax.nn.relu(self.feature_conv(layout_grid))))  # [N, N, A]
        discount = jax.nn.sigmoid(self.discount_logit[...])
        kernels = jax.nn.softmax(self.kernel_logits[...], axis=-1)  # [A, 9]
        height, width = layout_grid.shape[:2]

        def expected_next(value):  # [N, N] -> [N, N, A]
            padded = jnp.pad(value, 1)
            neighbourhood = jnp.stack([padded[r:r + height, c:c + width]
                                       for r in range(3) for c in range(3)], axis=-1)
            return jnp.einsum("hwk,ak->hwa", neighbourhood, kernels)

        def backup(value, _):
            q = reward + discount * expected_next(value)
            return self.softness * jax.nn.logsumexp(q / self.softness, axis=-1), None

        value, _ = jax.lax.scan(backup, jnp.zeros((height, width)), None,
                                length=self.iterations)
        q = reward + discount * expected_next(value)
        logits = jnp.einsum("thw,hwa->ta", grids[..., self.agent_channel], q)
        return jax.nn.log_softmax(logits / self.softness, axis=-1)

    def __call__(self, features: jax.Array, mask: jax.Array) -> jax.Array:
        if self.grid is None:
            return self.linear(features)[..., 0]
        start, stop = self.observation
        grids = features[..., start:stop].reshape(*features.shape[:-1], *self.grid)
        start, stop = self.action
        taken = jnp.argmax(features[..., start:stop], axis=-1)
        log_policy = self.planner_log_policy(grids)
        surprise = -jnp.take_along_axis(log_policy, taken[..., None], axis=-1)[..., 0]
        return jax.nn.softplus(self.scale[...]) * surprise + self.bias[...]


DISCRIMINATORS = {"mlp": StepDiscriminator, "gru": GRUDiscriminator,
                  "attention": AttentionDiscriminator, "airl": AIRLDiscriminator,
                  "planner": PlannerDiscriminator, "egocentric": EgocentricDiscriminator}


def make_discriminator(name: str, feature_size: int, key: jax.Array, **kwargs) -> nnx.Module:
    """Builds a built-in discriminator by name (``mlp``, ``gru``, ``attention``, ``airl``,
    ``planner``, ``egocentric``).

    Raises:
      ValueError: for an unknown name, listing the valid ones.
    """
    if name not in DISCRIMINATORS:
        raise ValueError(f"unknown discriminator {name!r}; choose from: "
                         f"{', '.join(DISCRIMINATORS)}")
    return DISCRIMINATORS[name](feature_size, rngs=nnx.Rngs(key), **kwargs)
