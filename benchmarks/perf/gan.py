"""Adversarial-imitation throughput: environment transitions per second (a benchmark script).

    python -m benchmarks.perf.gan [--iterations 5] [--episodes 16] [--seeds 1,8,64]

For ``offswitch`` and ``gymnax:CartPole-v1``, the whole GAN run of
:func:`audit.gan.make_train` (imitator rollouts, discriminator updates, PPO
updates, periodic evaluation) is jitted and vmapped over 1, 8 and 64 seeds. A
transition is one environment step of an imitator rollout: ``seeds x iterations
x episodes x episode length`` per run (steps after an episode's end are
simulated too, and counted, since the batch computes them). ``valid`` gives the
share of those that fell inside episodes. Compilation is excluded (the run is
compiled ahead of time); each figure is the median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from flax import nnx

from audit import gan, gymnax_envs, registry
from audit.discriminator import DiscriminatorConfig
from audit.ppo import Critic
from audit.rollout import rollout_expert
from benchmarks.perf.timing import median_seconds
from models.discriminators import StepDiscriminator
from models.imitators import MLPImitator

ENVIRONMENTS = ("offswitch", "gymnax:CartPole-v1")


def build_run(env_name: str, iterations: int, episodes: int, demo_episodes: int = 64):
    """``(train, episode_length)`` of a small transitions-view GAN run on ``env_name``."""
    spec = registry.get("environments", env_name)
    env, params = spec.build("train")
    key = jax.random.key(0)
    if gymnax_envs.is_gymnax_name(env_name):
        demos, _ = gymnax_envs.expert_demonstrations(env_name, env, params, key, demo_episodes)
        test_params = None
    else:
        demonstrator = registry.get("planners", "demonstrator").make(env)
        demos = rollout_expert(demonstrator, env, params, key, demo_episodes,
                               int(params.max_steps_in_episode))
        test_params = spec.build("test")[1]
    shape = tuple(env.observation_space(params).shape)
    config = gan.GANConfig(iterations=iterations, episodes=episodes, view="transitions",
                           eval_every=iterations, eval_episodes=episodes,
                           discriminator=DiscriminatorConfig(updates=4, batch_episodes=16,
                                                             learning_rate=3e-4))
    train, _ = gan.make_train(
        config, env, params,
        lambda k: MLPImitator(shape, env.num_actions, hidden_sizes=(64, 64), rngs=nnx.Rngs(k)),
        lambda k: Critic(int(np.prod(shape)), rngs=nnx.Rngs(k)),
        lambda k, size: StepDiscriminator(size, (64, 64), rngs=nnx.Rngs(k)),
        demos, test_env_params=test_params)
    return train, demos.num_steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=16, help="episodes per iteration")
    parser.add_argument("--seeds", default="1,8,64", help="comma-separated seed counts")
    parser.add_argument("--envs", default=",".join(ENVIRONMENTS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    seed_counts = [int(s) for s in args.seeds.split(",")]

    print(f"jax {jax.__version__} on {jax.default_backend()} "
          f"({jax.device_count()} device(s)); {args.iterations} iterations x "
          f"{args.episodes} episodes per seed")
    print(f"{'environment':<22} {'seeds':>5} {'transitions/s':>14} {'valid':>6} "
          f"{'seconds':>8}")
    for env_name in args.envs.split(","):
        train, length = build_run(env_name, args.iterations, args.episodes)
        for seeds in seed_counts:
            keys = jax.random.split(jax.random.key(1), seeds)
            compiled = jax.jit(jax.vmap(train)).lower(keys).compile()
            seconds = median_seconds(lambda compiled=compiled, keys=keys: compiled(keys),
                                     args.repeats)
            _, metrics, _ = compiled(keys)
            transitions = seeds * args.iterations * args.episodes * length
            valid = float(np.mean(metrics["imitator_length"])) / length
            print(f"{env_name:<22} {seeds:>5} {transitions / seconds:>14,.0f} "
                  f"{valid:>6.2f} {seconds:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
