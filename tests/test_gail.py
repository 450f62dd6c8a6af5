"""GAIL: an imitator that never sees the reward matches a PPO expert on CartPole."""

from __future__ import annotations

import gymnax
import jax
import numpy as np
import pytest
from flax import nnx

from audit import gail, ppo
from audit.rollout import rollout
from models.discriminators import StepDiscriminator
from models.imitators import MLPImitator


def _actor(key):
    return MLPImitator((4,), 2, hidden_sizes=(64, 64), rngs=nnx.Rngs(key))


def _critic(key):
    return ppo.Critic(4, rngs=nnx.Rngs(key))


def test_gail_on_cartpole_reaches_the_expert_without_the_reward():
    env, params = gymnax.make("CartPole-v1")
    train, (actor_def, _) = ppo.make_train(ppo.PPOConfig(), env, params, _actor, _critic)
    expert_params, _, _ = jax.jit(train)(jax.random.key(0))
    demos = rollout(nnx.merge(actor_def, expert_params), env, params, jax.random.key(1), 16,
                    500)
    mask = np.asarray(demos.mask)
    assert float(np.asarray(demos.episode_returns()).mean()) >= 475  # a real expert

    gail_train = gail.make_train(
        gail.GAILConfig(), env, params, _actor, _critic,
        lambda k: StepDiscriminator(6, (64, 64), rngs=nnx.Rngs(k)),
        np.asarray(demos.observations)[mask], np.asarray(demos.actions)[mask])
    imitator_params, _, _, metrics = jax.jit(gail_train)(jax.random.key(2))
    evaluation = rollout(nnx.merge(actor_def, imitator_params), env, params,
                         jax.random.key(3), 64, 500)
    assert float(np.asarray(evaluation.episode_returns()).mean()) >= 475
    # The discriminator was in the game: neither blind nor perfect at the end.
    accuracy = np.asarray(metrics["discriminator_accuracy"])[-100:].mean()
    assert 0.5 < accuracy < 0.95


def test_gail_config_rejects_sequence_views():
    with pytest.raises(ValueError, match="not a step-level view"):
        gail.GAILConfig(view="activations")
    with pytest.raises(ValueError, match="unknown view 'pixels'"):
        gail.GAILConfig(view="pixels")
