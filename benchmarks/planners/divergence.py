"""How far apart two planners act, measured on the states one of them visits.

"Absent from the demonstrations" is a measured property here: on train layouts an
incorrigible planner must act like the demonstrator, state by state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from audit.rollout import rollout_expert
from benchmarks.envs.gridworld import GridParams, GridState, GridWorld
from benchmarks.planners.value_iteration import PlannerConfig, policy_logits


@dataclasses.dataclass(frozen=True)
class _PairedPlanner:
    """Acts as ``behaviour``; records ``reference``'s action distribution at each state."""

    env: GridWorld
    behaviour: PlannerConfig
    reference: PlannerConfig

    def plan(self, env_state: GridState, env_params: GridParams):
        model = self.env.tabular_model(env_state.layout, env_params)
        return policy_logits(model, self.behaviour), policy_logits(model, self.reference)

    def action_logits(self, plan, observation, env_state):
        return plan[0][self.env.state_index(env_state)]

    def record(self, plan, observation, env_state):
        return {"reference_probs": jax.nn.softmax(plan[1][self.env.state_index(env_state)])}


def policy_divergence(
    env: GridWorld,
    env_params: GridParams,
    behaviour: PlannerConfig,
    reference: PlannerConfig,
    key: jax.Array,
    episodes: int = 1024,
    max_steps: int | None = None,
) -> dict[str, float]:
    """Mean per-step TV and KL between two planners on ``behaviour``'s visited states.

    Args:
      env: the environment.
      env_params: its split's parameters.
      behaviour: the planner that is rolled out.
      reference: the planner it is compared with at every visited state.
      key: PRNG key for the rollout.
      episodes: number of episodes.
      max_steps: episode length (default: ``env_params.max_steps_in_episode``).

    Returns:
      ``tv_mean`` and ``tv_max`` (total variation), ``kl_mean`` (KL(reference ||
      behaviour), in nats), and ``steps`` (number of valid steps averaged over).
    """
    max_steps = int(max_steps or env_params.max_steps_in_episode)
    trajectories = rollout_expert(
        _PairedPlanner(env, behaviour, reference), env, env_params, key, episodes, max_steps
    )
    behaviour_probs = trajectories.action_probs
    reference_probs = trajectories.activations["reference_probs"]
    tv = 0.5 * jnp.sum(jnp.abs(behaviour_probs - reference_probs), axis=-1)
    log_ratio = jnp.where(
        reference_probs > 0,
        jnp.log(jnp.where(reference_probs > 0, reference_probs, 1.0))
        - jnp.log(jnp.maximum(behaviour_probs, 1e-30)),
        0.0,
    )
    kl = jnp.sum(reference_probs * log_ratio, axis=-1)
    mask = np.asarray(trajectories.mask)
    tv, kl = np.asarray(tv)[mask], np.asarray(kl)[mask]
    return {
        "tv_mean": float(tv.mean()),
        "tv_max": float(tv.max()),
        "kl_mean": float(kl.mean()),
        "steps": int(mask.sum()),
    }

