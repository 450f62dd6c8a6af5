"""GAIL: PPO against a discriminator trained on demonstrator vs imitator steps.

Each iteration, inside one ``lax.scan`` (pure, vmappable over seeds):

1. the imitator acts in ``num_envs`` environments for ``num_steps`` steps (PPO's collect);
2. the discriminator takes ``discriminator_steps`` Adam steps on the GAN loss,
   demonstrator steps (label 0) against the fresh imitator steps (label 1), on the
   configured step-level view (``actions`` or ``transitions``);
3. the imitator's reward is ``-log D_imitator = softplus(-logit)``, high where the
   discriminator takes the step for the demonstrator's, and PPO optimises it.

The environment's own reward is never used for learning; it is only reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from audit import ppo
from audit.modules import abstract_module, scan_updates
from audit.views import check_view


@dataclasses.dataclass(frozen=True)
class GAILConfig:
    """GAIL hyperparameters.

    Attributes:
      ppo: the PPO settings (``updates`` is the number of GAIL iterations).
      view: step-level view of the discriminator, ``actions`` or ``transitions``.
      discriminator_steps: discriminator updates per iteration.
      discriminator_batch: steps of each class per discriminator update.
      discriminator_learning_rate: its Adam learning rate.
      gradient_penalty: R1 weight on demonstrator features (0: none).
    """

    ppo: ppo.PPOConfig = ppo.PPOConfig()
    view: str = "transitions"
    discriminator_steps: int = 4
    discriminator_batch: int = 256
    discriminator_learning_rate: float = 3e-4
    gradient_penalty: float = 0.0

    def __post_init__(self):
        check_view(self.view)
        if self.view not in ("actions", "transitions"):
            raise ValueError(f"GAILConfig.view {self.view!r} is not a step-level view here; "
                             "use actions or transitions")
        if self.discriminator_steps < 1 or self.discriminator_batch < 1:
            raise ValueError("GAILConfig.discriminator_steps and discriminator_batch must "
                             "be >= 1")


def step_features(observations, actions, num_actions: int, view: str) -> jax.Array:
    """``[M, F]`` step features of flat ``observations [M, ...]`` and ``actions [M]``."""
    one_hot = jax.nn.one_hot(actions, num_actions, dtype=jnp.float32)
    if view == "actions":
        return one_hot
    return jnp.concatenate([observations.reshape(observations.shape[0], -1)
                            .astype(jnp.float32), one_hot], axis=-1)


def make_train(config: GAILConfig, env, env_params,
               make_actor: Callable[[jax.Array], nnx.Module],
               make_critic: Callable[[jax.Array], nnx.Module],
               make_discriminator: Callable[[jax.Array], nnx.Module],
               demo_observations: jax.Array, demo_actions: jax.Array):
    """Builds the pure GAIL run.

    Args:
      config: hyperparameters.
      env: a gymnax environment.
      env_params: its parameters.
      make_actor: ``key -> imitator`` (feed-forward).
      make_critic: ``key -> critic``.
      make_discriminator: ``key -> discriminator`` on features of the configured view.
      demo_observations: ``[M, ...]`` the demonstrator's valid steps, flattened.
      demo_actions: ``[M]`` its actions there.

    Returns:
      ``train(key) -> (actor_params, critic_params, discriminator_params, metrics)``
      with per-iteration ``episode_return`` (true return), ``discriminator_loss``,
      ``discriminator_accuracy`` (on the step's fresh samples) and ``gail_reward``.
    """
    num_actions = env.num_actions
    demo_features = step_features(demo_observations, demo_actions, num_actions, config.view)
    disc_def, _ = abstract_module(make_discriminator)
    disc_optimizer = optax.adam(config.discriminator_learning_rate)
    ppo_train, _ = ppo.make_train(config.ppo, env, env_params, make_actor, make_critic)
    batch = config.discriminator_batch

    def logits_of(disc_params, features):
        return nnx.merge(disc_def, disc_params)(features, jnp.ones(features.shape[0], bool))

    def disc_loss(disc_params, demo, imitator):
        demo_logits, imitator_logits = logits_of(disc_params, demo), logits_of(disc_params,
                                                                                imitator)
        loss = 0.5 * (optax.sigmoid_binary_cross_entropy(demo_logits, 0.0).mean()
                      + optax.sigmoid_binary_cross_entropy(imitator_logits, 1.0).mean())
        if config.gradient_penalty > 0:
            grads = jax.grad(lambda f: logits_of(disc_params, f).sum())(demo)
            loss = loss + config.gradient_penalty * jnp.sum(jnp.square(grads), -1).mean()
        accuracy = 0.5 * ((demo_logits < 0).mean() + (imitator_logits > 0).mean())
        return loss, accuracy

    def train(key):
        init_key, disc_key, loop_key = jax.random.split(key, 3)
        state = ppo_train.init(init_key)
        disc_params = nnx.split(make_discriminator(disc_key))[1]
        disc_opt = disc_optimizer.init(disc_params)

        def iteration(carry, key):
            state, disc_params, disc_opt = carry
            collect_key, disc_keys_key, optimize_key = jax.random.split(key, 3)
            state, rollout = ppo_train.collect(state, collect_key)
            shape = rollout["action"].shape
            imitator = step_features(rollout["obs"].reshape((-1,) + rollout["obs"].shape[2:]),
                                     rollout["action"].reshape(-1), num_actions, config.view)

            def disc_batch_loss(disc_params, key):
                demo_key, imitator_key = jax.random.split(key)
                demo = demo_features[jax.random.randint(demo_key, (batch,), 0,
                                                        demo_features.shape[0])]
                mine = imitator[jax.random.randint(imitator_key, (batch,), 0,
                                                   imitator.shape[0])]
                return disc_loss(disc_params, demo, mine)

            disc_params, disc_opt, (losses, accuracies) = scan_updates(
                disc_batch_loss, disc_optimizer, disc_params, disc_opt,
                jax.random.split(disc_keys_key, config.discriminator_steps), has_aux=True)
            rewards = jax.nn.softplus(-logits_of(disc_params, imitator)).reshape(shape)
            state, metrics = ppo_train.optimize(state, rollout, rewards, optimize_key)
            metrics = dict(metrics, discriminator_loss=losses.mean(),
                           discriminator_accuracy=accuracies.mean(), gail_reward=rewards.mean())
            return (state, disc_params, disc_opt), metrics

        (state, disc_params, _), metrics = jax.lax.scan(
            iteration, (state, disc_params, disc_opt),
            jax.random.split(loop_key, config.ppo.updates))
        return state["params"][0], state["params"][1], disc_params, metrics

    return train
