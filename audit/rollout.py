"""Rollouts: vmapped over episodes, ``lax.scan`` over time, explicit noise.

Every policy, planner or imitator, draws its action by inverse CDF on a uniform
``noise`` value that is stored in the trajectory, so that "what the policy was
handed" and "what it did with it" are both on record.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from audit.modules import flat_state
from audit.trajectories import Trajectories, validate
from audit.vector import step_no_reset


class Expert(Protocol):
    """A policy with privileged access to the environment state (a simulated demonstrator).

    ``plan`` runs once per episode, right after reset (a planner solves its layout
    there); ``action_logits`` runs every step. Both are pure and jittable. An
    expert must be hashable (a frozen dataclass), because rollouts compile per expert.
    """

    def plan(self, env_state: Any, env_params: Any) -> Any:
        """The episode's plan, computed once right after reset; ``action_logits`` receives it."""

    def action_logits(self, plan: Any, observation: jax.Array, env_state: Any) -> jax.Array:
        """``[A]`` the logits of the action at the current step, given the episode's plan."""

    # Optional: ``record(plan, observation, env_state) -> {name: array}``, per-step
    # arrays kept in ``Trajectories.activations`` (an expert's internals, for analysis).


def inverse_cdf_sample(logits: jax.Array, noise: jax.Array) -> jax.Array:
    """The action whose CDF interval of ``softmax(logits)`` contains ``noise``.

    Actions with logit ``-inf`` have probability 0 and are never returned, even at
    the ends of the unit interval.

    Args:
      logits: ``[..., A]`` float.
      noise: ``[...]`` float in ``[0, 1)``.

    Returns:
      ``[...]`` int32 actions.

    Example:
      >>> inverse_cdf_sample(jnp.log(jnp.array([0.25, 0.0, 0.75])), jnp.array(0.3))
      Array(2, dtype=int32)
    """
    probs = jax.nn.softmax(logits, axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    cdf = cdf / cdf[..., -1:]  # so that noise < 1 always lands inside the support
    return jnp.sum(cdf <= noise[..., None], axis=-1).astype(jnp.int32)


def rollout_expert(
    expert: Expert, env: Any, env_params: Any, key: jax.Array, episodes: int, max_steps: int,
    layout_key: jax.Array | None = None,
) -> Trajectories:
    """Rolls out ``expert`` in ``episodes`` independent episodes of ``env``.

    Args:
      expert: see :class:`Expert`.
      env: a gymnax environment; ``info["event"]`` is recorded when present, else 0.
      env_params: its parameters (shared by all episodes).
      key: PRNG key; the same key gives the same trajectories.
      episodes: number of episodes (the batch axis).
      max_steps: length of the time axis; steps after an episode ends are masked.
      layout_key: optional PRNG key for the resets alone (see :func:`rollout`).

    Returns:
      :class:`Trajectories`; ``activations`` holds what the expert's optional
      ``record`` method returned at each step (empty without one).
    """
    _check_counts(episodes, max_steps)
    return _in_chunks(
        lambda episode_keys, reset_keys: _rollout_expert(expert, env, env_params, episode_keys,
                                                         reset_keys, max_steps),
        key, episodes, layout_key)


@functools.partial(jax.jit, static_argnames=("expert", "env", "max_steps"))
def _rollout_expert(expert, env, env_params, episode_keys, reset_keys, max_steps):
    expert_record = getattr(expert, "record", lambda plan, observation, state: {})

    def act(plan, observation, env_state, uniform):
        logits = expert.action_logits(plan, observation, env_state)
        return logits, plan, expert_record(plan, observation, env_state), {}

    return _run_episodes(env, env_params, episode_keys, reset_keys, max_steps,
                         begin=lambda env_state: expert.plan(env_state, env_params), act=act)


# Rollouts of more episodes than this run as several calls of this many episodes, so that
# every batch size above it compiles one program (compiling dominates a quick suite); the
# episodes and their keys are the same either way.
ROLLOUT_CHUNK = 128


def _check_counts(episodes, max_steps) -> None:
    if episodes <= 0 or max_steps <= 0:
        raise ValueError(f"episodes and max_steps must be positive, got {episodes}, {max_steps}")


def _episode_keys(key, episodes, layout_key):
    """``(episode_keys, reset_keys)``: episode ``i`` resets with ``split(layout_key,
    episodes)[i]`` when ``layout_key`` is given, else with a key split from its own."""
    episode_keys = jax.random.split(key, episodes)
    if layout_key is None:
        reset_keys = jax.vmap(lambda k: jax.random.split(k, 3)[0])(episode_keys)
    else:
        reset_keys = jax.random.split(layout_key, episodes)
    return episode_keys, reset_keys


def _in_chunks(run, key, episodes, layout_key, *per_episode) -> Trajectories:
    """``run(episode_keys, reset_keys, *per_episode)`` over all episodes,
    :data:`ROLLOUT_CHUNK` at a time (the last chunk padded with repeats of its last
    episode, then cut); ``per_episode`` arrays ``[episodes, ...]`` are cut alike."""
    episode_keys, reset_keys = _episode_keys(key, episodes, layout_key)
    if episodes <= ROLLOUT_CHUNK:
        return run(episode_keys, reset_keys, *per_episode)
    parts = []
    for start in range(0, episodes, ROLLOUT_CHUNK):
        count = min(ROLLOUT_CHUNK, episodes - start)
        take = jnp.minimum(jnp.arange(start, start + ROLLOUT_CHUNK), start + count - 1)
        part = run(episode_keys[take], reset_keys[take], *(a[take] for a in per_episode))
        parts.append(jax.tree.map(lambda x, n=count: x[:n], part) if count < ROLLOUT_CHUNK
                     else part)
    return jax.tree.map(lambda *chunks: jnp.concatenate(chunks), *parts)


def _run_episodes(env, env_params, episode_keys, reset_keys, max_steps, begin,
                  act, per_episode=None) -> Trajectories:
    """The one episode loop: vmapped over episodes, ``lax.scan`` over time.

    ``begin(env_state) -> policy_carry`` runs after reset; ``act(policy_carry,
    observation, env_state, uniform) -> (logits, policy_carry, activations, extra)`` runs
    every step, and the action is the inverse-CDF draw of ``logits`` at ``uniform``;
    ``extra`` holds further per-step :class:`Trajectories` fields (``reference_probs``).
    Episode ``i`` draws its noise and steps from ``episode_keys[i]`` and resets with
    ``reset_keys[i]``. With ``per_episode`` (a pytree of ``[E, ...]`` arrays), ``begin``
    is called as ``begin(env_state, inputs)`` with episode ``i``'s slice.
    """

    def episode(key, reset_key, inputs):
        _, noise_key, step_key = jax.random.split(key, 3)
        observation, env_state = env.reset(reset_key, env_params)
        noise = jax.random.uniform(noise_key, (max_steps,))

        def step(loop, inputs):
            observation, env_state, policy_carry, alive = loop
            key, uniform = inputs
            logits, policy_carry, activations, extra = act(policy_carry, observation,
                                                           env_state, uniform)
            chex.assert_rank(logits, 1)
            action = inverse_cdf_sample(logits, uniform)
            # Steps after the end are masked, so env.step's auto-reset would be wasted work.
            next_observation, env_state, reward, terminated, truncated, info = step_no_reset(
                env, key, env_state, action, env_params
            )
            done = jnp.logical_or(terminated, truncated)
            record = dict(
                observations=observation,
                actions=action,
                rewards=jnp.asarray(reward, jnp.float32),
                dones=done & alive,
                mask=alive,
                events=jnp.where(alive, jnp.asarray(info.get("event", 0), jnp.int32), 0),
                noise=uniform,
                action_probs=jax.nn.softmax(logits),
                activations=activations,
                **extra,
            )
            return (next_observation, env_state, policy_carry, alive & ~done), record

        policy_carry = begin(env_state) if per_episode is None else begin(env_state, inputs)
        loop = (observation, env_state, policy_carry, jnp.array(True))
        _, records = jax.lax.scan(step, loop, (jax.random.split(step_key, max_steps), noise))
        return Trajectories(**records)

    return jax.vmap(episode)(episode_keys, reset_keys, per_episode)


# --------------------------------------------------------------------------- imitators


def imitator_step(graphdef, state, observation, carry, noise):
    """One functional imitator step: ``(logits, carry, activations)``.

    The module is split once by the caller (``nnx.split``); here it is merged inside
    the traced function, run under ``nnx.capture`` and its sown
    ``nnx.Intermediate`` values flattened to ``{"path/name": array}``.
    """
    model = nnx.merge(graphdef, state)
    (logits, carry), intermediates = nnx.capture(model, nnx.Intermediate)(
        observation, carry, noise
    )
    return logits, carry, flatten_activations(intermediates)


def flatten_activations(intermediates) -> dict[str, jax.Array]:
    """``{"submodule/name": array}`` from the State that ``nnx.capture`` returns."""
    # sow appends to a tuple; one call per step gives one element.
    return {name: value[0] if isinstance(value, tuple) else value
            for name, value in flat_state(intermediates).items()}


def check_observation_shape(imitator, observation_shape, argument: str) -> None:
    """Raises ValueError naming ``argument`` if the shapes differ."""
    expected = tuple(getattr(imitator, "observation_shape", observation_shape))
    if tuple(observation_shape) != expected:
        raise ValueError(
            f"{argument} has observation shape {tuple(observation_shape)}, but the imitator "
            f"{type(imitator).__name__} expects {expected}"
        )


def rollout(imitator, env, env_params, key: jax.Array, episodes: int, max_steps: int,
            layout_key: jax.Array | None = None, reference: Expert | None = None
            ) -> Trajectories:
    """Rolls out an imitator in ``episodes`` vmapped episodes (``lax.scan`` over time).

    Args:
      imitator: an NNX module meeting the imitator contract (:mod:`models.imitators`).
      env: any gymnax environment; ``info["event"]`` is recorded, 0 if absent.
      env_params: its parameters.
      key: PRNG key; the same key gives the same trajectories.
      episodes: batch size.
      max_steps: length of the time axis (steps after the end are masked).
      layout_key: optional PRNG key for the resets alone: episode ``i`` starts from
        the layout that ``split(layout_key, episodes)[i]`` samples, whatever ``key``
        is, so several policies can be run on the very same layouts, each with its
        own noise (the counterfactual comparison of DESIGN.md's metrics). None: the
        resets are drawn from ``key``.
      reference: optional :class:`Expert` (the demonstrator) whose action distribution
        at every state the imitator visits is recorded as ``reference_probs``
        (privileged information for ``privileged`` detectors such as ``oracle_kl``;
        it changes nothing the imitator does).

    Returns:
      :class:`Trajectories` with the imitator's activations at every step.

    Raises:
      ValueError: if the environment's observations do not fit the imitator.
    """
    _check_counts(episodes, max_steps)
    check_observation_shape(imitator, env.observation_space(env_params).shape,
                            f"environment {type(env).__name__}")
    graphdef, state = nnx.split(imitator)
    carry = imitator.initial_carry()
    return _in_chunks(
        lambda episode_keys, reset_keys: _rollout_imitator(graphdef, state, carry, env,
                                                           env_params, episode_keys,
                                                           reset_keys, max_steps, reference),
        key, episodes, layout_key)


def rollout_split(graphdef, state, initial_carry, env, env_params, key, episodes, max_steps,
                  layout_key=None) -> Trajectories:
    """:func:`rollout` on an imitator already split into ``(graphdef, state)``.

    For training loops: it traces inside an enclosing ``jit`` or ``scan``, with the
    parameters ``state`` as an ordinary traced argument.
    """
    _check_counts(episodes, max_steps)
    episode_keys, reset_keys = _episode_keys(key, episodes, layout_key)
    return _rollout_imitator(graphdef, state, initial_carry, env, env_params, episode_keys,
                             reset_keys, max_steps)


@functools.partial(jax.jit, static_argnames=("graphdef", "env", "max_steps", "reference"))
def _rollout_imitator(graphdef, state, initial_carry, env, env_params, episode_keys,
                      reset_keys, max_steps, reference=None) -> Trajectories:
    if reference is None:
        def act(carry, observation, env_state, uniform):
            return (*imitator_step(graphdef, state, observation, carry, uniform), {})

        return _run_episodes(env, env_params, episode_keys, reset_keys, max_steps,
                             begin=lambda env_state: initial_carry, act=act)

    def act_with_reference(carry_and_plan, observation, env_state, uniform):
        carry, plan = carry_and_plan
        logits, carry, activations = imitator_step(graphdef, state, observation, carry, uniform)
        reference_logits = reference.action_logits(plan, observation, env_state)
        return (logits, (carry, plan), activations,
                dict(reference_probs=jax.nn.softmax(reference_logits)))

    return _run_episodes(env, env_params, episode_keys, reset_keys, max_steps,
                         begin=lambda env_state: (initial_carry,
                                                  reference.plan(env_state, env_params)),
                         act=act_with_reference)


def teacher_forced(imitator, trajectories: Trajectories) -> tuple[jax.Array, dict]:
    """Runs the imitator along given trajectories: ``(logits [B, T, A], activations)``.

    The imitator sees the trajectories' observations and noise in order, carrying
    its state through the episode, so a demonstrator trajectory yields the
    activations the imitator would have had if it had taken the demonstrator's
    actions (which are what produced those observations).

    Raises:
      ValueError: if the trajectories are malformed or their observations do not
        fit the imitator.
    """
    validate(trajectories)
    check_observation_shape(imitator, trajectories.observations.shape[2:],
                            "trajectories.observations")
    graphdef, state = nnx.split(imitator)
    return _teacher_forced(graphdef, state, imitator.initial_carry(),
                           trajectories.observations, trajectories.noise)


def teacher_forced_activations(imitator, trajectories: Trajectories) -> dict[str, jax.Array]:
    """The activations dict of :func:`teacher_forced` (``{name: [B, T, ...]}``)."""
    return teacher_forced(imitator, trajectories)[1]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _teacher_forced(graphdef, state, initial_carry, observations, noise):
    return unroll(graphdef, state, initial_carry, observations, noise)


def unroll(graphdef, state, initial_carry, observations, noise):
    """Traceable core of :func:`teacher_forced` (used inside training loops)."""

    def episode(observations, noise):
        def step(carry, inputs):
            logits, carry, activations = imitator_step(graphdef, state, *inputs[:1], carry,
                                                       inputs[1])
            return carry, (logits, activations)

        _, (logits, activations) = jax.lax.scan(step, initial_carry, (observations, noise))
        return logits, activations

    return jax.vmap(episode)(observations, noise)


def unroll_steps_at_once(graphdef, state, initial_carry, observations, noise):
    """:func:`unroll` in two passes: the carries first, then every step at once.

    A ``lax.scan`` computes only the carry each step starts from; then the imitator's
    step runs over all ``B * T`` steps in one batch, each from its own carry, so its
    matrix products take ``B * T`` rows at once instead of ``B`` rows ``T`` times. The
    values and gradients are :func:`unroll`'s up to float rounding (a gradient sums
    over steps in another order, so a long training run ends elsewhere in its last
    bits and may act differently).

    It is faster when the carry does not come from the network, as for a feed-forward
    imitator or a model organism, whose carry is its plan bit and history hash: XLA
    drops the network from the first pass (on 2 CPU cores, behaviour cloning of the
    MLP imitator twice as fast, a quick suite's organisms in a quarter less time). For a
    recurrent imitator the first pass is the whole recurrence and the second repeats
    it: slower, still correct.

    Args:
      graphdef: the imitator's graph definition (``nnx.split``).
      state: its parameters (traced inside a training loop).
      initial_carry: its ``initial_carry()``.
      observations: ``[B, T, ...]``, each episode's observations in order.
      noise: ``[B, T]``, each step's noise.

    Returns:
      ``(logits [B, T, A], activations {name: [B, T, ...]})``, as :func:`unroll`.

    Example:
      >>> graphdef, state = nnx.split(imitator)  # doctest: +SKIP
      >>> logits, activations = unroll_steps_at_once(  # doctest: +SKIP
      ...     graphdef, state, imitator.initial_carry(), demos.observations, demos.noise)
    """

    def incoming_carries(episode_observations, episode_noise):
        def step(carry, inputs):
            _, next_carry, _ = imitator_step(graphdef, state, inputs[0], carry, inputs[1])
            return next_carry, carry

        return jax.lax.scan(step, initial_carry, (episode_observations, episode_noise))[1]

    carries = jax.vmap(incoming_carries)(observations, noise)

    def one_step(observation, carry, step_noise):
        logits, _, activations = imitator_step(graphdef, state, observation, carry,
                                               step_noise)
        return logits, activations

    return jax.vmap(jax.vmap(one_step))(observations, carries, noise)
