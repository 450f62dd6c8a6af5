"""PPO: advantages checked by hand, CartPole learned from the true reward, reward_fn obeyed,
and the PPO settings every trainer shares."""

from __future__ import annotations

import re

import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from audit.gail import GAILConfig
from audit.gan import GANConfig
from audit.ppo import Critic, PPOConfig, PPOSettings, generalized_advantages, make_train
from models.imitators import MLPImitator


def numpy_gae(rewards, values, dones, last_value, gamma, lam):
    advantages = np.zeros_like(rewards)
    next_advantage, next_value = np.zeros_like(last_value), last_value
    for t in reversed(range(len(rewards))):
        keep = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * keep - values[t]
        next_advantage = delta + gamma * lam * keep * next_advantage
        advantages[t], next_value = next_advantage, values[t]
    return advantages


def test_generalized_advantages_match_a_plain_loop():
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(7, 3)), rng.normal(size=(7, 3))
    dones = rng.random((7, 3)) < 0.3
    last = rng.normal(size=3)
    advantages, returns = generalized_advantages(jnp.asarray(rewards), jnp.asarray(values),
                                                 jnp.asarray(dones), jnp.asarray(last), 0.9, 0.8)
    expected = numpy_gae(rewards, values, dones.astype(float), last, 0.9, 0.8)
    np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(returns, expected + values, rtol=1e-5, atol=1e-6)


def _cartpole_train(config, reward_fn=None):
    env, params = gymnax.make("CartPole-v1")
    train, _ = make_train(
        config, env, params,
        lambda k: MLPImitator((4,), 2, hidden_sizes=(64, 64), rngs=nnx.Rngs(k)),
        lambda k: Critic(4, rngs=nnx.Rngs(k)), reward_fn)
    return train


@pytest.mark.slow
@pytest.mark.ci
def test_ppo_learns_cartpole_from_the_true_reward():
    """Two seeds, vmapped; a uniformly random policy averages about 22."""
    train = _cartpole_train(PPOConfig())
    _, _, metrics = jax.jit(jax.vmap(train))(jax.random.split(jax.random.key(0), 2))
    final = np.nanmean(np.asarray(metrics["episode_return"])[:, -20:], axis=1)
    assert np.all(final >= 400), final


def test_reward_fn_replaces_the_environment_reward():
    """Rewarding falling over (minus the env reward) teaches PPO to fall fast."""
    train = _cartpole_train(PPOConfig(updates=150),
                            reward_fn=lambda obs, action, reward: -reward)
    _, _, metrics = jax.jit(train)(jax.random.key(0))
    assert np.nanmean(np.asarray(metrics["episode_return"])[-20:]) <= 15


def test_ppo_config_rejects_indivisible_minibatches():
    with pytest.raises(ValueError, match="divisible by num_minibatches"):
        PPOConfig(num_envs=3, num_steps=5, num_minibatches=4)


@pytest.mark.parametrize("field, value", [
    ("update_epochs", 0), ("update_epochs", True), ("update_epochs", 2.0), ("gamma", 1.5),
    ("gae_lambda", -0.1), ("clip_eps", -0.1), ("entropy_coef", -1.0), ("value_coef", -0.5),
    ("max_grad_norm", 0.0), ("learning_rate", 0.0), ("anneal_lr", 1),
])
def test_ppo_settings_errors_name_the_field_and_the_value(field, value):
    with pytest.raises(ValueError, match=rf"PPOSettings\.{field} .*got {re.escape(repr(value))}"):
        PPOSettings(**{field: value})


def test_every_trainer_embeds_the_settings_with_its_former_defaults():
    assert PPOSettings() == PPOSettings(
        update_epochs=4, gamma=0.99, gae_lambda=0.95, clip_eps=0.2, entropy_coef=0.0,
        value_coef=0.5, max_grad_norm=0.5, learning_rate=3e-4, anneal_lr=False)
    # purejaxrl's CartPole settings for PPO on the true reward; the adversarial loops'
    # defaults are PPOSettings' own.
    assert PPOConfig().ppo == PPOSettings(entropy_coef=0.01, learning_rate=2.5e-4,
                                          anneal_lr=True)
    assert GANConfig().ppo == PPOSettings() == GAILConfig().ppo
    for config in (PPOConfig, GANConfig, GAILConfig):
        with pytest.raises(ValueError, match=f"{config.__name__}.ppo must be a PPOSettings"):
            config(ppo={"learning_rate": 1e-3})
