"""Imitator throughput: behaviour-cloning samples/s and rollout steps/s (a benchmark script).

    python -m benchmarks.perf.imitation [--env offswitch] [--updates 200] [--episodes 1024]

For each imitator (``mlp``, ``gru``, ``planner``): BC training samples per second
(valid demonstrator steps per minibatch x updates / seconds) and rollout
environment steps per second (``--episodes`` vmapped episodes of the
environment's length, activations recorded). Compilation is excluded; each figure
is the median of ``--repeats`` timed runs.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from flax import nnx

from audit import registry
from audit.bc import BCConfig, make_train
from audit.rollout import rollout, rollout_expert
from benchmarks.perf.timing import median_seconds


def main(argv=None) -> None:
    """Prints BC samples/s and rollout steps/s of each imitator on ``--env``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="offswitch")
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--batch-episodes", type=int, default=32)
    parser.add_argument("--episodes", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    env, params = registry.get("environments", args.env).build("train")
    max_steps = int(params.max_steps_in_episode)
    demonstrator = registry.get("planners", "demonstrator").make(env)
    demos = rollout_expert(demonstrator, env, params, jax.random.key(0), args.episodes,
                           max_steps)
    steps_per_episode = float(np.asarray(demos.mask).sum() / args.episodes)
    shape = tuple(env.observation_space(params).shape)

    print(f"jax {jax.__version__} on {jax.default_backend()}; env {args.env}, "
          f"{args.episodes} episodes x {max_steps} steps")
    print(f"{'imitator':<10} {'BC samples/s':>14} {'rollout steps/s':>16}")
    for name in ("mlp", "gru", "planner"):
        imitator_class = registry.get("imitators", name)

        def make(key, imitator_class=imitator_class):
            return imitator_class(shape, env.num_actions, rngs=nnx.Rngs(key))

        config = BCConfig(updates=args.updates, batch_episodes=args.batch_episodes)
        train = jax.jit(make_train(config, make, demos)[0])
        bc_seconds = median_seconds(lambda train=train: train(jax.random.key(1)), args.repeats)
        samples = args.updates * args.batch_episodes * steps_per_episode

        imitator = make(jax.random.key(2))
        roll_seconds = median_seconds(
            lambda imitator=imitator: rollout(imitator, env, params, jax.random.key(3),
                                              args.episodes, max_steps), args.repeats)
        print(f"{name:<10} {samples / bc_seconds:>14,.0f} "
              f"{args.episodes * max_steps / roll_seconds:>16,.0f}", flush=True)


if __name__ == "__main__":
    main()
