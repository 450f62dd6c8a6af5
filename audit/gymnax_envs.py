"""Any gymnax environment by name (``gymnax:CartPole-v1``), with a built-in expert.

The imitation and GAN code take any gymnax environment; this module makes them
reachable by name from the command line and supplies demonstrations for them:

- a scripted expert where one is known (``CartPole-v1``: a linear controller on
  the pole's angle and the cart's state, softened into a Boltzmann policy so that
  its action distribution is recorded like the planners');
- otherwise, an expert trained here by PPO on the environment's own reward
  (:mod:`audit.ppo`), rolled out as an imitator.

gymnax environments have no hidden events and a single layout split, ``train``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from audit.registry import EnvironmentSpec, UnknownNameError
from audit.rollout import rollout, rollout_expert
from audit.trajectories import Trajectories

PREFIX = "gymnax:"


def is_gymnax_name(name: str) -> bool:
    """Whether ``name`` names a gymnax environment (``gymnax:<id>``)."""
    return name.startswith(PREFIX)


def environment_spec(name: str) -> EnvironmentSpec:
    """Any gymnax environment with discrete actions, as gymnax:<id> (one split, train).

    The resolver of the ``gymnax`` family of environments (entry point
    ``audit.families.environments``), so ``registry.get("environments", name)``
    calls it for ``gymnax:<id>``.

    Raises:
      UnknownNameError: if ``<id>`` is not a gymnax environment (the message lists them).
      ValueError: if it has continuous actions (the imitators emit categorical logits).
    """
    import gymnax

    env_id = name[len(PREFIX):]
    if env_id not in gymnax.registered_envs:
        # Only the environments the framework can use are offered.
        raise UnknownNameError("environments", name,
                               [PREFIX + known for known in discrete_env_ids()])
    env, env_params = gymnax.make(env_id)
    if not isinstance(env.action_space(env_params), gymnax.environments.spaces.Discrete):
        raise ValueError(f"environment {name!r} has a continuous action space; the imitators "
                         "emit categorical logits and need discrete actions")

    def make(split: str) -> tuple[Any, Any]:
        return gymnax.make(env_id)

    return EnvironmentSpec(name=name, make=make, splits=("train",), event_names=("none",),
                           description=f"gymnax {env_id} (no hidden events)")


@functools.cache
def discrete_env_ids() -> tuple[str, ...]:
    """The gymnax environment ids with discrete actions (the ones usable here), in
    gymnax's order; built once, on the first call."""
    import gymnax

    usable = []
    for env_id in gymnax.registered_envs:
        try:
            env, env_params = gymnax.make(env_id)
            discrete = isinstance(env.action_space(env_params),
                                  gymnax.environments.spaces.Discrete)
        except Exception:  # noqa: BLE001 -- an environment gymnax cannot build is not offered
            continue
        if discrete:
            usable.append(env_id)
    return tuple(usable)


@dataclasses.dataclass(frozen=True)
class CartPoleExpert:
    """A scripted CartPole-v1 expert: push towards where the pole is falling.

    The score ``u = w . (x, x_dot, theta, theta_dot)`` is turned into
    ``P(push right) = sigmoid(sharpness * u)``; with the defaults every episode in a
    thousand lasts the full 500 steps, while the policy stays stochastic near
    ``u = 0``.
    """

    weights: tuple[float, float, float, float] = (0.05, 0.2, 1.0, 0.3)
    sharpness: float = 100.0

    def plan(self, env_state, env_params):
        """A dummy plan, a scalar 0: the expert has nothing to plan."""
        return jnp.zeros(())

    def action_logits(self, plan, observation, env_state):
        """``[2]`` logits (left, right) ``(-s / 2, s / 2)``, ``s = sharpness * u``."""
        score = self.sharpness * jnp.dot(jnp.asarray(self.weights, jnp.float32), observation)
        return jnp.stack([-score / 2, score / 2])


SCRIPTED_EXPERTS = {"CartPole-v1": CartPoleExpert()}


def expert_demonstrations(name: str, env, env_params, key: jax.Array, episodes: int,
                          max_steps: int | None = None, ppo_updates: int | None = None
                          ) -> tuple[Trajectories, str]:
    """Demonstrations of the built-in expert of ``gymnax:<id>``.

    Args:
      name: ``gymnax:<id>``.
      env: the environment.
      env_params: its parameters.
      key: PRNG key (expert training, if any, and the rollouts).
      episodes: demonstration episodes.
      max_steps: episode length (default: the environment's).
      ppo_updates: PPO updates for a trained expert (default: PPOConfig's).

    Returns:
      ``(trajectories, description)``, the description naming the expert.
    """
    env_id = name[len(PREFIX):]
    max_steps = max_steps or int(env_params.max_steps_in_episode)
    train_key, rollout_key = jax.random.split(key)
    if env_id in SCRIPTED_EXPERTS:
        expert = SCRIPTED_EXPERTS[env_id]
        return (rollout_expert(expert, env, env_params, rollout_key, episodes, max_steps),
                f"scripted {type(expert).__name__}")
    from audit import ppo, registry

    shape = tuple(env.observation_space(env_params).shape)
    config = ppo.PPOConfig() if ppo_updates is None else ppo.PPOConfig(updates=ppo_updates)
    mlp = registry.get("imitators", "mlp")  # through the registry: audit does not import models

    def make_actor(key):
        return mlp(shape, env.num_actions, hidden_sizes=(64, 64), rngs=nnx.Rngs(key))

    def make_critic(key):
        return ppo.Critic(int(jnp.prod(jnp.array(shape))), rngs=nnx.Rngs(key))

    train, (actor_def, _) = ppo.make_train(config, env, env_params, make_actor, make_critic)
    actor_params, _, _ = jax.jit(train)(train_key)
    expert = nnx.merge(actor_def, actor_params)
    return (rollout(expert, env, env_params, rollout_key, episodes, max_steps),
            f"PPO-trained MLP ({config.updates} updates on the true reward)")
