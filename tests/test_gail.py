"""Streaming GAIL (audit.gail) learns a task from demonstrations alone."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from audit import gail, gymnax_envs
from audit.modules import abstract_module, initial_carry_of
from audit.ppo import Critic, PPOSettings
from audit.rollout import rollout_split
from benchmarks.perf.compare import MLPPolicy
from models.discriminators import StepDiscriminator

ENV = "gymnax:CartPole-v1"


@pytest.mark.slow
@pytest.mark.ci
def test_streaming_gail_learns_cartpole_from_a_scripted_expert_without_its_reward():
    """~80k transitions (40 rounds of 8 x 256), about 20 s on 2 CPU cores.

    The imitator only ever sees the discriminator's reward ``softplus(-logit)``; the
    true return is measured, never optimised. A uniformly random CartPole policy
    lasts ~20 steps. Were the reward's sign flipped (``-softplus(-logit)``, a cost on
    every step), PPO would learn to end episodes as soon as it can (measured: final
    return 9.6, below the start), so both assertions below would fail. With other
    seeds the same recipe ended at 409 and 493.
    """
    env, env_params = gymnax_envs.environment_spec(ENV).make("train")
    demos, _ = gymnax_envs.expert_demonstrations(ENV, env, env_params, jax.random.key(100), 16)
    assert float(demos.episode_returns().mean()) == 500.0  # the expert is good
    config = gail.GAILConfig(num_envs=8, num_steps=256, rounds=40,
                             ppo=PPOSettings(update_epochs=4), minibatch_size=256,
                             discriminator_updates=4, discriminator_batch=512)

    def make_actor(key):
        return MLPPolicy(4, 2, (64, 64), rngs=nnx.Rngs(key))

    train, modules = gail.make_train(
        config, env, env_params, make_actor, lambda k: Critic(4, (64, 64), rngs=nnx.Rngs(k)),
        lambda k, size: StepDiscriminator(size, (64, 64), rngs=nnx.Rngs(k)), demos)
    carry0 = initial_carry_of(modules.actor, abstract_module(make_actor)[1])

    def run(key):
        train_key, eval_key = jax.random.split(key)
        state, metrics = train(train_key)
        final = rollout_split(modules.actor, state.actor, carry0, env, env_params, eval_key,
                              32, int(env_params.max_steps_in_episode))
        return metrics, final.episode_returns().mean()

    metrics, final_return = jax.jit(run)(jax.random.key(0))
    # Round 0 collects with the initial policy: its finished episodes are the start.
    assert int(metrics["episodes"][0]) >= 20
    start = float(metrics["episode_return"][0])
    final_return = float(final_return)
    assert start < 60, start
    assert final_return >= 200, (start, final_return)  # measured: 38 -> 351
    assert final_return >= start + 150, (start, final_return)
    assert np.all(np.isfinite(np.asarray(metrics["discriminator_loss"])))
