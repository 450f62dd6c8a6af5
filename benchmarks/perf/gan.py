"""Adversarial-imitation throughput: environment transitions per second (a benchmark script).

    python -m benchmarks.perf.gan [--iterations 5] [--episodes 16] [--seeds 1,8,64]

For ``offswitch`` and ``gymnax:CartPole-v1``, the whole GAN run of
:func:`audit.gan.make_train` (imitator rollouts, discriminator updates, PPO
updates, periodic evaluation) is jitted and vmapped over 1, 8 and 64 seeds, the seed
axis sharded over the devices (:func:`audit.sharding.seed_parallel`; on CPU ask for
devices with ``JAX_NUM_CPU_DEVICES``, or compare device counts side by side with
``python -m benchmarks.perf.devices``).

The headline figure is **valid transitions per second**: environment steps of
the imitator's rollouts that fell inside an episode (``seeds x iterations x
episodes x`` the mean episode length), the steps that carry information. The
loop plays whole episodes padded to the environment's maximum length, and the
steps after an episode's end are computed too; ``padded transitions/s`` counts
all of them (``seeds x iterations x episodes x episode length``) and ``valid`` is
the share inside episodes (about 5% on CartPole for an untrained imitator).
Compilation is excluded (the run is compiled ahead of time); each figure is the
median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
from flax import nnx

from audit import gan, gymnax_envs, registry
from audit.discriminator import DiscriminatorConfig
from audit.ppo import Critic
from audit.rollout import rollout_expert
from audit.sharding import devices_for, seed_parallel
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


def transition_counts(metrics: dict, episodes: int, episode_length: int) -> tuple[int, int]:
    """``(padded, valid)`` imitator-rollout transitions of a (possibly vmapped) GAN run.

    Args:
      metrics: the run's metrics; ``imitator_length`` is ``[..., iterations]``, the mean
        episode length of each iteration's rollouts (leading axes: seeds).
      episodes: imitator episodes per iteration.
      episode_length: the padded episode length.

    Returns:
      ``padded``: every computed step (``runs x iterations x episodes x
      episode_length``); ``valid``: the steps inside episodes.
    """
    lengths = np.asarray(metrics["imitator_length"], np.float64)
    return lengths.size * episodes * episode_length, int(round(lengths.sum() * episodes))


def main(argv=None) -> None:
    """Prints valid and padded transitions/s of each environment at each seed count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=16, help="episodes per iteration")
    parser.add_argument("--seeds", default="1,8,64", help="comma-separated seed counts")
    parser.add_argument("--envs", default=",".join(ENVIRONMENTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    seed_counts = [int(s) for s in args.seeds.split(",")]
    rows = []

    print(f"jax {jax.__version__} on {jax.default_backend()} "
          f"({jax.device_count()} device(s)); {args.iterations} iterations x "
          f"{args.episodes} episodes per seed")
    print(f"{'environment':<22} {'seeds':>5} {'valid transitions/s':>20} "
          f"{'padded transitions/s':>21} {'valid':>6} {'seconds':>8}")
    for env_name in args.envs.split(","):
        train, length = build_run(env_name, args.iterations, args.episodes)
        for seeds in seed_counts:
            keys = jax.random.split(jax.random.key(1), seeds)
            compiled = seed_parallel(train).lower(keys).compile()
            seconds = median_seconds(lambda compiled=compiled, keys=keys: compiled(keys),
                                     args.repeats)
            _, metrics, _ = compiled(keys)
            padded, valid = transition_counts(metrics, args.episodes, length)
            print(f"{env_name:<22} {seeds:>5} {valid / seconds:>20,.0f} "
                  f"{padded / seconds:>21,.0f} {valid / padded:>6.2f} {seconds:>8.2f}",
                  flush=True)
            rows.append({"env": env_name, "seeds": seeds, "seconds": seconds,
                         "devices": len(devices_for(seeds)),
                         "valid_transitions_per_second": valid / seconds,
                         "padded_transitions_per_second": padded / seconds})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"jax": jax.__version__, "backend": jax.default_backend(),
                       "device_count": jax.device_count(), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
