"""PPO: advantages checked by hand, CartPole learned from the true reward, reward_fn obeyed."""

from __future__ import annotations

import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from audit.ppo import Critic, PPOConfig, generalized_advantages, make_train
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
