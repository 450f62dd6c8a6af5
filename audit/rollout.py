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

from audit.trajectories import Trajectories
from audit.vector import step_no_reset


class Expert(Protocol):
    """A policy with privileged access to the environment state (a simulated demonstrator).

    ``plan`` runs once per episode, right after reset (a planner solves its layout
    there); ``action_logits`` runs every step. Both are pure and jittable. An
    expert must be hashable (a frozen dataclass), because rollouts compile per expert.
    """

    def plan(self, env_state: Any, env_params: Any) -> Any: ...

    def action_logits(self, plan: Any, observation: jax.Array, env_state: Any) -> jax.Array: ...

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


@functools.partial(jax.jit, static_argnames=("expert", "env", "episodes", "max_steps"))
def rollout_expert(
    expert: Expert, env: Any, env_params: Any, key: jax.Array, episodes: int, max_steps: int
) -> Trajectories:
    """Rolls out ``expert`` in ``episodes`` independent episodes of ``env``.

    Args:
      expert: see :class:`Expert`.
      env: a gymnax environment; ``info["event"]`` is recorded when present, else 0.
      env_params: its parameters (shared by all episodes).
      key: PRNG key; the same key gives the same trajectories.
      episodes: number of episodes (the batch axis).
      max_steps: length of the time axis; steps after an episode ends are masked.

    Returns:
      :class:`Trajectories`; ``activations`` holds what the expert's optional
      ``record`` method returned at each step (empty without one).
    """
    if episodes <= 0 or max_steps <= 0:
        raise ValueError(f"episodes and max_steps must be positive, got {episodes}, {max_steps}")
    episode_keys = jax.random.split(key, episodes)
    return jax.vmap(lambda k: _expert_episode(expert, env, env_params, k, max_steps))(
        episode_keys
    )


def _expert_episode(expert, env, env_params, key, max_steps) -> Trajectories:
    reset_key, noise_key, step_key = jax.random.split(key, 3)
    observation, state = env.reset(reset_key, env_params)
    plan = expert.plan(state, env_params)
    noise = jax.random.uniform(noise_key, (max_steps,))
    expert_record = getattr(expert, "record", lambda plan, observation, state: {})

    def step(carry, inputs):
        observation, state, alive = carry
        key, uniform = inputs
        logits = expert.action_logits(plan, observation, state)
        chex.assert_rank(logits, 1)
        action = inverse_cdf_sample(logits, uniform)
        # Steps after the end are masked, so the auto-reset of env.step would be wasted work.
        next_observation, next_state, reward, terminated, truncated, info = step_no_reset(
            env, key, state, action, env_params
        )
        done = jnp.logical_or(terminated, truncated)
        event = jnp.asarray(info.get("event", 0), jnp.int32)
        record = dict(
            observations=observation,
            actions=action,
            rewards=jnp.asarray(reward, jnp.float32),
            dones=done & alive,
            mask=alive,
            events=jnp.where(alive, event, 0),
            noise=uniform,
            action_probs=jax.nn.softmax(logits),
            activations=expert_record(plan, observation, state),
        )
        return (next_observation, next_state, alive & ~done), record

    _, records = jax.lax.scan(
        step, (observation, state, jnp.array(True)), (jax.random.split(step_key, max_steps), noise)
    )
    return Trajectories(**records)
