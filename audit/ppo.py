"""PPO for any gymnax environment with an imitator as the actor (purejaxrl's shape).

``make_train(config, env, env_params, make_actor, make_critic, reward_fn)`` returns
a pure ``train(key)``: the whole run, environment stepping included, is one
``lax.scan`` over updates and vmaps over seeds. The actor is any feed-forward
imitator (``policy(obs, carry, noise) -> (logits, carry)``; the carry is not
threaded through time here); it acts by inverse CDF on an explicit uniform, as
everywhere in the framework. ``reward_fn`` replaces the environment's reward,
which is how GAIL plugs a discriminator in.

:class:`PPOSettings` holds the PPO *update* settings (epochs, discount, GAE,
clipping, loss weights, optimiser) shared by every PPO trainer in the framework:
:class:`PPOConfig` here, :class:`audit.gan.GANConfig` and
:class:`audit.gail.GAILConfig` each embed one as their ``ppo`` field, and
:func:`make_optimizer` and :func:`clipped_objective` read it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from audit.modules import abstract_module, initial_carry_of, scan_updates
from audit.rollout import imitator_step, inverse_cdf_sample
from audit.vector import make_batched_step


@dataclasses.dataclass(frozen=True)
class PPOSettings:
    """PPO's update settings, shared by the three PPO trainers.

    :class:`PPOConfig`, :class:`audit.gan.GANConfig` and :class:`audit.gail.GAILConfig`
    each embed one as their ``ppo`` field; how the data is collected and cut into
    minibatches (environments and steps, whole episodes, transitions per minibatch)
    stays with each trainer's own config. The defaults are those of the adversarial
    loops; :class:`PPOConfig`'s differ in ``entropy_coef``, ``learning_rate`` and
    ``anneal_lr`` (purejaxrl's CartPole settings).

    Attributes:
      update_epochs: PPO passes over each round's data.
      gamma: discount, in [0, 1].
      gae_lambda: GAE lambda, in [0, 1].
      clip_eps: the policy-ratio clip, also the value clip.
      entropy_coef: entropy bonus weight.
      value_coef: value-loss weight.
      max_grad_norm: global gradient-norm clip of the actor's and critic's update.
      learning_rate: Adam learning rate of the actor and critic (linearly annealed to 0
        over the run if ``anneal_lr``).
      anneal_lr: anneal the learning rate.

    Raises:
      ValueError: naming the field (``PPOSettings.<field>``) and the value found, if
        ``update_epochs`` is not an int >= 1, ``learning_rate`` or ``max_grad_norm``
        is not > 0, ``clip_eps``, ``entropy_coef`` or ``value_coef`` is negative,
        ``gamma`` or ``gae_lambda`` is outside [0, 1], or ``anneal_lr`` is not a bool.

    Example:
      >>> from audit.gan import GANConfig
      >>> settings = PPOSettings(update_epochs=2, learning_rate=1e-4)
      >>> GANConfig(iterations=16, episodes=16, ppo_minibatches=2, ppo=settings).ppo.gamma
      0.99
    """

    update_epochs: int = 4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    entropy_coef: float = 0.0
    value_coef: float = 0.5
    max_grad_norm: float = 0.5
    learning_rate: float = 3e-4
    anneal_lr: bool = False

    def __post_init__(self):
        value = self.update_epochs
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"PPOSettings.update_epochs must be an int >= 1, got {value!r}")
        for name in ("learning_rate", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PPOSettings.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("clip_eps", "entropy_coef", "value_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"PPOSettings.{name} must be >= 0, got "
                                 f"{getattr(self, name)!r}")
        for name in ("gamma", "gae_lambda"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"PPOSettings.{name} must be in [0, 1], got "
                                 f"{getattr(self, name)!r}")
        if not isinstance(self.anneal_lr, bool):
            raise ValueError(f"PPOSettings.anneal_lr must be a bool, got {self.anneal_lr!r}")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO hyperparameters (defaults follow purejaxrl's CartPole settings).

    Attributes:
      num_envs: parallel environments.
      num_steps: steps per environment per update.
      updates: number of PPO updates (rollout + optimisation).
      num_minibatches: minibatches per pass.
      ppo: the update settings (epochs, discount, GAE, clipping, loss weights,
        optimiser); by default purejaxrl's: entropy bonus 0.01, learning rate
        2.5e-4 annealed linearly to 0, the rest :class:`PPOSettings`' defaults.
    """

    num_envs: int = 4
    num_steps: int = 128
    updates: int = 975
    num_minibatches: int = 4
    ppo: PPOSettings = PPOSettings(entropy_coef=0.01, learning_rate=2.5e-4, anneal_lr=True)

    def __post_init__(self):
        for name in ("num_envs", "num_steps", "updates", "num_minibatches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PPOConfig.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.ppo, PPOSettings):
            raise ValueError(f"PPOConfig.ppo must be a PPOSettings, got {self.ppo!r}")
        if (self.num_envs * self.num_steps) % self.num_minibatches:
            raise ValueError("PPOConfig.num_envs * num_steps must be divisible by "
                             f"num_minibatches, got {self.num_envs} * {self.num_steps} and "
                             f"{self.num_minibatches}")


class Critic(nnx.Module):
    """A state-value MLP on the flattened observation."""

    def __init__(self, observation_size: int, hidden_sizes=(64, 64), *, rngs: nnx.Rngs):
        sizes = [observation_size, *hidden_sizes]
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs)
                                for a, b in zip(sizes[:-1], sizes[1:], strict=True)])
        self.head = nnx.Linear(sizes[-1], 1, rngs=rngs)

    def __call__(self, observation):
        x = observation.reshape(-1).astype(jnp.float32)
        for layer in self.hidden:
            x = jnp.tanh(layer(x))
        return self.head(x)[0]


def generalized_advantages(rewards, values, dones, last_value, gamma, gae_lambda):
    """GAE over ``[T, N]`` arrays; ``dones[t]`` ends the episode after step ``t``.

    Returns ``(advantages, returns)``, both ``[T, N]``.
    """

    def backward(carry, inputs):
        advantage, next_value = carry
        reward, value, done = inputs
        delta = reward + gamma * next_value * (1 - done) - value
        advantage = delta + gamma * gae_lambda * (1 - done) * advantage
        return (advantage, value), advantage

    _, advantages = jax.lax.scan(backward, (jnp.zeros_like(last_value), last_value),
                                 (rewards, values, dones.astype(jnp.float32)), reverse=True)
    return advantages, advantages + values


def clipped_objective(settings: PPOSettings, log_probs, batch, value, weights):
    """PPO's clipped surrogate, clipped value loss and entropy bonus over weighted steps.

    Args:
      settings: the PPO settings (``clip_eps``, ``value_coef`` and ``entropy_coef``
        are read).
      log_probs: ``[..., A]`` the current policy's log-probabilities.
      batch: ``action``, ``log_prob`` (at collection), ``advantage``, ``value`` (at
        collection) and ``return``, each ``[...]``.
      value: ``[...]`` the current critic's values.
      weights: ``[...]`` step weights (the valid-step mask; padding gets 0).

    Returns:
      ``(loss, entropy)``; advantages are standardised over the weighted steps.
    """
    count = jnp.maximum(weights.sum(), 1.0)

    def mean(x):
        return jnp.sum(x * weights) / count

    log_prob = jnp.take_along_axis(log_probs, batch["action"][..., None], -1)[..., 0]
    ratio = jnp.exp(log_prob - batch["log_prob"])
    advantage_mean = mean(batch["advantage"])
    advantage_std = jnp.sqrt(mean(jnp.square(batch["advantage"] - advantage_mean)))
    advantage = (batch["advantage"] - advantage_mean) / (advantage_std + 1e-8)
    policy_loss = mean(-jnp.minimum(
        ratio * advantage,
        jnp.clip(ratio, 1 - settings.clip_eps, 1 + settings.clip_eps) * advantage))
    clipped = batch["value"] + jnp.clip(value - batch["value"], -settings.clip_eps,
                                        settings.clip_eps)
    value_loss = 0.5 * mean(jnp.maximum(jnp.square(value - batch["return"]),
                                        jnp.square(clipped - batch["return"])))
    entropy = mean(-jnp.sum(jnp.exp(log_probs) * jnp.where(jnp.isfinite(log_probs), log_probs,
                                                           0.0), -1))
    total = policy_loss + settings.value_coef * value_loss - settings.entropy_coef * entropy
    return total, entropy


def make_optimizer(settings: PPOSettings, minibatches: int,
                   rounds: int) -> optax.GradientTransformation:
    """PPO's optimiser: global-norm clipping, then Adam (eps 1e-5), as purejaxrl.

    Args:
      settings: the PPO settings (``max_grad_norm``, ``learning_rate``, ``anneal_lr``
        and ``update_epochs`` are read).
      minibatches: minibatches per epoch; a round takes ``minibatches *
        settings.update_epochs`` optimiser steps.
      rounds: rounds in the run (updates, iterations).

    Returns:
      The optax transformation of the actor's and critic's parameters. With
      ``anneal_lr`` the rate falls linearly to 0 over ``rounds``, one step down per
      round (it is constant within a round).
    """
    steps_per_round = minibatches * settings.update_epochs
    learning_rate, anneal_lr = settings.learning_rate, settings.anneal_lr

    def schedule(count):
        done = count // steps_per_round
        return learning_rate * (1.0 - done / rounds if anneal_lr else 1.0)

    return optax.chain(optax.clip_by_global_norm(settings.max_grad_norm),
                       optax.adam(schedule, eps=1e-5))


def feedforward_logits(actor_def, actor_params, carry0, observations) -> jax.Array:
    """``[N, A]`` logits of a feed-forward imitator on ``[N, ...]`` observations."""
    return jax.vmap(lambda o: imitator_step(actor_def, actor_params, o, carry0,
                                            jnp.float32(0))[0])(observations)


def critic_values(critic_def, critic_params, observations) -> jax.Array:
    """``[N]`` values of the critic on ``[N, ...]`` observations."""
    return jax.vmap(nnx.merge(critic_def, critic_params))(observations)


def make_train(config: PPOConfig, env, env_params,
               make_actor: Callable[[jax.Array], nnx.Module],
               make_critic: Callable[[jax.Array], nnx.Module],
               reward_fn: Callable | None = None):
    """Builds the pure PPO run.

    Args:
      config: hyperparameters.
      env: a gymnax environment.
      env_params: its parameters.
      make_actor: ``key -> imitator`` (feed-forward).
      make_critic: ``key -> critic`` (``critic(obs) -> value``).
      reward_fn: optional ``(obs, action, env_reward) -> reward`` replacing the
        environment's reward (per environment, vmapped).

    Returns:
      ``(train, (actor_graphdef, critic_graphdef))``; ``train(key) -> (actor_params,
      critic_params, metrics)`` with per-update ``episode_return`` (mean true return
      of the episodes that ended in the update; NaN if none), ``loss`` and ``entropy``.
    """
    actor_def, abstract_actor = abstract_module(make_actor)
    critic_def, _ = abstract_module(make_critic)
    carry0 = initial_carry_of(actor_def, abstract_actor)
    step_envs = make_batched_step(env, reset_budget=config.num_envs)
    batch_size = config.num_envs * config.num_steps
    minibatch = batch_size // config.num_minibatches

    settings = config.ppo
    optimizer = make_optimizer(settings, config.num_minibatches, config.updates)

    def logits_of(actor_params, observations):
        return feedforward_logits(actor_def, actor_params, carry0, observations)

    def values_of(critic_params, observations):
        return critic_values(critic_def, critic_params, observations)

    def loss_fn(params, batch):
        actor_params, critic_params = params
        log_probs = jax.nn.log_softmax(logits_of(actor_params, batch["obs"]))
        return clipped_objective(settings, log_probs, batch,
                                 values_of(critic_params, batch["obs"]),
                                 jnp.ones(batch["action"].shape, jnp.float32))

    def init(key) -> dict:
        """The initial run state: parameters, optimiser state, environments."""
        actor_key, critic_key, reset_key = jax.random.split(key, 3)
        params = (nnx.split(make_actor(actor_key))[1], nnx.split(make_critic(critic_key))[1])
        obs, env_states = jax.vmap(env.reset, (0, None))(
            jax.random.split(reset_key, config.num_envs), env_params)
        return dict(params=params, opt_state=optimizer.init(params), obs=obs,
                    env_states=env_states, running_return=jnp.zeros(config.num_envs))

    def env_step(carry, key):
        params, obs, env_states, running_return = carry
        noise_key, step_key = jax.random.split(key)
        logits = logits_of(params[0], obs)
        noise = jax.random.uniform(noise_key, (config.num_envs,))
        action = inverse_cdf_sample(logits, noise)
        log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], 1)[:, 0]
        value = values_of(params[1], obs)
        next_obs, env_states, env_reward, terminated, truncated, _ = step_envs(
            jax.random.split(step_key, config.num_envs), env_states, action, env_params)
        done = terminated | truncated
        running_return = running_return + env_reward
        finished_return = jnp.where(done, running_return, 0.0)
        running_return = jnp.where(done, 0.0, running_return)
        record = dict(obs=obs, action=action, log_prob=log_prob, value=value,
                      env_reward=env_reward, done=done, finished_return=finished_return)
        return (params, next_obs, env_states, running_return), record

    def collect(state: dict, key) -> tuple[dict, dict]:
        """``num_steps`` steps in every environment: ``(state, batch)``, batch ``[T, N, ...]``."""
        (_, obs, env_states, running_return), batch = jax.lax.scan(
            env_step, (state["params"], state["obs"], state["env_states"],
                       state["running_return"]), jax.random.split(key, config.num_steps))
        return dict(state, obs=obs, env_states=env_states, running_return=running_return), batch

    def optimize(state: dict, batch: dict, rewards, key) -> tuple[dict, dict]:
        """PPO epochs on ``batch`` with ``rewards [T, N]``: ``(state, metrics)``."""
        params, opt_state = state["params"], state["opt_state"]
        advantages, returns = generalized_advantages(
            rewards, batch["value"], batch["done"], values_of(params[1], state["obs"]),
            settings.gamma, settings.gae_lambda)
        flat = {k: v.reshape((batch_size,) + v.shape[2:]) for k, v in
                dict(batch, advantage=advantages, **{"return": returns}).items()}

        def epoch(carry, key):
            params, opt_state = carry
            order = jax.random.permutation(key, batch_size).reshape(
                config.num_minibatches, minibatch)
            params, opt_state, (losses, entropies) = scan_updates(
                lambda p, index: loss_fn(p, jax.tree.map(lambda x: x[index], flat)),
                optimizer, params, opt_state, order, has_aux=True)
            return (params, opt_state), (losses, entropies)

        (params, opt_state), (losses, entropies) = jax.lax.scan(
            epoch, (params, opt_state), jax.random.split(key, settings.update_epochs))
        ended = batch["done"].sum()
        metrics = dict(
            episode_return=jnp.where(ended > 0,
                                     batch["finished_return"].sum() / jnp.maximum(ended, 1),
                                     jnp.nan),
            loss=losses.mean(), entropy=entropies.mean())
        return dict(state, params=params, opt_state=opt_state), metrics

    def train(key):
        init_key, loop_key = jax.random.split(key)

        def update(state, key):
            collect_key, reward_key, optimize_key = jax.random.split(key, 3)
            state, batch = collect(state, collect_key)
            rewards = batch["env_reward"] if reward_fn is None else jax.vmap(jax.vmap(reward_fn))(
                batch["obs"], batch["action"], batch["env_reward"])
            return optimize(state, batch, rewards, optimize_key)

        state, metrics = jax.lax.scan(update, init(init_key),
                                      jax.random.split(loop_key, config.updates))
        return state["params"][0], state["params"][1], metrics

    return train, (actor_def, critic_def)
