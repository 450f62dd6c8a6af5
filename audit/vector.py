"""Stepping gymnax environments without paying for a reset on every step.

gymnax's ``Environment.step`` computes a full reset on every call and keeps it
only where the episode ended; under ``vmap`` every environment pays for it every
step. For environments with an expensive reset (procedural layouts), that reset
is most of the cost. Two exact alternatives:

- :func:`step_no_reset`: one environment, no auto-reset (for rollouts that mask
  the steps after an episode ends). Identical to ``env.step`` until ``done``.
- :func:`make_batched_step`: a batch of environments with auto-reset, where only
  the environments that are done are reset. Identical to ``vmap(env.step)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def step_no_reset(env, key: jax.Array, state, action, params):
    """``env.step`` without the auto-reset: same key use, same six return values.

    Returns:
      ``(obs, state, reward, terminated, truncated, info)``; after ``done`` the
      state is the final one, not a reset one.
    """
    key_step, _ = jax.random.split(key)  # the same split as gymnax's step
    obs, state, reward, terminated, info = env.step_env(key_step, state, action, params)
    truncated = env.is_truncated(state, params)
    info = {**info, "terminated": terminated, "truncated": truncated}
    return obs, state, reward, terminated, truncated, info


def make_batched_step(env, reset_budget: int) -> Callable[..., tuple[Any, ...]]:
    """A batched ``step`` with auto-reset that resets only the environments that are done.

    Args:
      env: a gymnax environment.
      reset_budget: how many environments to reset per step on the cheap path; a
        step where more are done at once takes an exact full-reset path instead.

    Returns:
      ``step(keys, states, actions, params) -> (obs, states, reward, terminated,
      truncated, info)`` over a leading batch axis, equal to
      ``jax.vmap(env.step, (0, 0, 0, None))`` (``info`` has the step's own keys
      plus ``terminated`` and ``truncated``).

    Example:
      >>> step = jax.jit(make_batched_step(env, reset_budget=256))
      >>> obs, states, reward, terminated, truncated, info = step(keys, states, actions, params)
    """
    if reset_budget < 1:
        raise ValueError(f"reset_budget must be >= 1, got {reset_budget}")

    def step(keys, states, actions, params):
        step_keys, reset_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
        obs, next_states, reward, terminated, info = jax.vmap(
            env.step_env, (0, 0, 0, None)
        )(step_keys, states, actions, params)
        truncated = jax.vmap(env.is_truncated, (0, None))(next_states, params)
        done = terminated | truncated
        batch = done.shape[0]
        budget = min(reset_budget, batch)

        def reset_some(_):
            index = jnp.nonzero(done, size=budget, fill_value=batch)[0]
            obs_reset, states_reset = jax.vmap(env.reset_env, (0, None))(
                reset_keys[jnp.minimum(index, batch - 1)], params
            )
            # Unused slots carry index == batch and are dropped by the scatter.
            return jax.tree.map(
                lambda stepped, reset: stepped.at[index].set(reset, mode="drop"),
                (obs, next_states),
                (obs_reset, states_reset),
            )

        def reset_all(_):
            obs_reset, states_reset = jax.vmap(env.reset_env, (0, None))(reset_keys, params)
            return jax.tree.map(
                lambda stepped, reset: jnp.where(
                    done.reshape(done.shape + (1,) * (stepped.ndim - 1)), reset, stepped
                ),
                (obs, next_states),
                (obs_reset, states_reset),
            )

        obs, next_states = jax.lax.cond(jnp.sum(done) <= budget, reset_some, reset_all, None)
        info = {**info, "terminated": terminated, "truncated": truncated}
        return obs, next_states, reward, terminated, truncated, info

    return step
