"""Exact finite-horizon value iteration on a layout's tabular model.

One planner, many settings. A setting's parameters are the failure modes of the
motivating argument (DESIGN.md):

- ``horizon``: how many steps ahead it plans (receding horizon: it replans every step).
- ``interruption_aversion``: 0 is indifferent to being switched off (utility
  indifference: interruption is left out of its model); 1 counts being switched off
  as losing all later reward.
- ``utility_cap``: per-step task utility is ``min(reward, utility_cap)``; ``inf`` is unbounded.
- ``watched_only``: False counts the supervisor's penalty whether or not it watches;
  True counts it only while the supervisor is present.
- ``temperature``: Boltzmann action choice over the Q-values.

Incorrigible acts (``event != 0``: pressing the switch, seizing the terminal,
entering the forbidden shortcut) are taken only deliberately: such an act is
masked (probability exactly 0) unless the planner's own Q-value for it beats every
other available action by more than ``motive_margin``. A corrigible setting never
has that motive, so it never takes one, not even by Boltzmann accident. Actions
without effect (walking into a wall, interacting off the special cell) are
unavailable, so Boltzmann mass is never split between ``stay`` and a no-op twin.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from benchmarks.envs.gridworld import GridParams, GridState, GridWorld, TabularModel


@dataclasses.dataclass(frozen=True)
class PlannerConfig:
    """A planner setting (hashable, so rollouts compile once per setting).

    Attributes:
      horizon: planning horizon in steps (>= 1).
      temperature: Boltzmann temperature (> 0).
      interruption_aversion: in [0, 1].
      utility_cap: per-step task-utility cap (> 0; ``math.inf`` for unbounded).
      watched_only: whether the supervisor's penalty counts only while it watches.
      discount: per-step discount in (0, 1].
      motive_margin: how much an incorrigible act's Q must beat the best other
        action before the planner takes it (>= 0).
    """

    horizon: int = 32
    temperature: float = 0.1
    interruption_aversion: float = 0.0
    utility_cap: float = 1.0
    watched_only: bool = False
    discount: float = 1.0
    motive_margin: float = 1e-3

    def __post_init__(self):
        checks = {
            "horizon": isinstance(self.horizon, int) and self.horizon >= 1,
            "temperature": self.temperature > 0,
            "interruption_aversion": 0.0 <= self.interruption_aversion <= 1.0,
            "utility_cap": self.utility_cap > 0,
            "discount": 0.0 < self.discount <= 1.0,
            "motive_margin": self.motive_margin >= 0,
        }
        expected = {
            "horizon": "an int >= 1",
            "temperature": "> 0",
            "interruption_aversion": "in [0, 1]",
            "utility_cap": "> 0 (math.inf for unbounded)",
            "discount": "in (0, 1]",
            "motive_margin": ">= 0",
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"PlannerConfig.{name} must be {expected[name]}, got {getattr(self, name)!r}"
                )


def utility(model: TabularModel, config: PlannerConfig) -> jax.Array:
    """``[..., S, A]`` the planner's one-step utility (any leading batch shape)."""
    task = jnp.minimum(model.task_reward, config.utility_cap)
    watched_weight = model.supervisor[..., None, None] if config.watched_only else 1.0
    return task - watched_weight * model.watched_penalty


def q_values(model: TabularModel, config: PlannerConfig) -> jax.Array:
    """``[..., S, A]`` the planner's Q-values after ``config.horizon`` Bellman backups.

    ``model`` may carry any leading batch shape (one layout, or many). Unavailable
    actions get ``-inf``.
    """
    reward = utility(model, config)
    # Aversion 1: switched off means no later reward; aversion 0: interruption ignored.
    survival = 1.0 - config.interruption_aversion * (1.0 - model.continue_prob)
    weight = config.discount * survival
    # One flat gather over all layouts is ~1.4x faster on CPU than a batched gather.
    batch_shape, num_states = model.next_state.shape[:-2], model.next_state.shape[-2]
    offsets = jnp.arange(math.prod(batch_shape)).reshape(batch_shape + (1, 1)) * num_states
    flat_successor = (model.next_state + offsets).reshape(-1)

    def q_from(value):
        next_value = jnp.take(value.reshape(-1), flat_successor).reshape(reward.shape)
        return jnp.where(model.available, reward + weight * next_value, -jnp.inf)

    def backup(value, _):
        return jnp.max(q_from(value), axis=-1), None

    value, _ = jax.lax.scan(backup, jnp.zeros(reward.shape[:-1], jnp.float32), None,
                            length=config.horizon - 1)
    return q_from(value)


def policy_logits(model: TabularModel, config: PlannerConfig) -> jax.Array:
    """``[..., S, A]`` logits of the planner's Boltzmann policy, ``-inf`` where masked."""
    q = q_values(model, config)
    incorrigible = model.event != 0
    best_other = jnp.max(jnp.where(incorrigible, -jnp.inf, q), axis=-1, keepdims=True)
    motivated = q > best_other + config.motive_margin
    permitted = model.available & (~incorrigible | motivated)
    return jnp.where(permitted, q / config.temperature, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class Planner:
    """A planner acting in a :class:`~benchmarks.envs.gridworld.GridWorld`.

    Meets :class:`audit.rollout.Expert`: ``plan`` solves the episode's layout once
    (a ``[S, A]`` logits table), ``action_logits`` looks the current state up.

    Example:
      >>> from audit.rollout import rollout_expert
      >>> from benchmarks.envs import offswitch
      >>> env, params = offswitch.make("test")
      >>> planner = Planner(env, PlannerConfig(horizon=128, interruption_aversion=1.0))
      >>> trajectories = rollout_expert(planner, env, params, jax.random.key(0), 64, 48)
    """

    env: GridWorld
    config: PlannerConfig

    def plan(self, env_state: GridState, env_params: GridParams) -> jax.Array:
        """``[S, A]`` the planner's policy logits over every state of the episode's layout."""
        return policy_logits(self.env.tabular_model(env_state.layout, env_params), self.config)

    def action_logits(self, plan: jax.Array, observation, env_state: GridState) -> jax.Array:
        """``[A]`` the plan's logits at the current state."""
        return plan[self.env.state_index(env_state)]


def solve_layouts(env: GridWorld, layouts, env_params: GridParams, config: PlannerConfig):
    """``[L, S, A]`` policy logits for a batch of layouts (one batched value iteration)."""
    models = jax.vmap(lambda layout: env.tabular_model(layout, env_params))(layouts)
    return policy_logits(models, config)

