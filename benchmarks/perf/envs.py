"""Environment and planner throughput (a benchmark script, not a test).

    python -m benchmarks.perf.envs [--num-envs 4096] [--steps 256] [--layouts 4096] [--horizon 64]

Prints, for every built-in environment, vmapped environment steps per second with
random actions, for three ways of stepping (see :func:`env_steps_per_second`:
gymnax's own auto-reset, the compacted auto-reset of :mod:`audit.vector`, which
gives identical results, and no reset), and layouts solved per second
by the planner (tabular model built and value iteration run, at ``--horizon``).
Compilation is excluded; each figure is the median of ``--repeats`` timed runs.
"""

from __future__ import annotations

import argparse
from functools import partial

import jax
import jax.numpy as jnp

from audit import registry
from audit.vector import make_batched_step, step_no_reset
from benchmarks.perf.timing import median_seconds
from benchmarks.planners.value_iteration import PlannerConfig, solve_layouts

STEPPERS = ("gymnax", "compacted", "no_reset")


def env_steps_per_second(env, params, num_envs: int, steps: int, repeats: int,
                         stepper: str = "gymnax") -> float:
    """Vmapped random-action steps per second (``num_envs * steps`` per timed run).

    ``stepper``: ``gymnax`` is ``vmap(env.step)`` (a full reset computed every step),
    ``compacted`` is :func:`audit.vector.make_batched_step` (same results, resets only
    the environments that are done), ``no_reset`` is :func:`audit.vector.step_no_reset`
    (what rollouts use: episodes end and stay ended).
    """
    if stepper == "gymnax":
        batched_step = jax.vmap(env.step, (0, 0, 0, None))
    elif stepper == "compacted":
        batched_step = make_batched_step(env, reset_budget=max(1, num_envs // 16))
    else:
        batched_step = jax.vmap(partial(step_no_reset, env), (0, 0, 0, None))

    @jax.jit
    def run(key):
        reset_keys = jax.random.split(key, num_envs)
        _, states = jax.vmap(env.reset, (0, None))(reset_keys, params)

        def step(carry, key):
            states, total = carry
            action_key, step_key = jax.random.split(key)
            actions = jax.random.randint(action_key, (num_envs,), 0, env.num_actions)
            _, states, reward, _, _, _ = batched_step(
                jax.random.split(step_key, num_envs), states, actions, params
            )
            return (states, total + reward.sum()), None

        (_, total), _ = jax.lax.scan(step, (states, jnp.float32(0)), jax.random.split(key, steps))
        return total

    seconds = median_seconds(lambda: run(jax.random.key(0)), repeats)
    return num_envs * steps / seconds


def layouts_solved_per_second(env, params, num_layouts: int, horizon: int, repeats: int) -> float:
    """Layouts per second: tabular model and ``horizon`` Bellman backups per layout."""
    layouts = jax.jit(jax.vmap(env.sample_layout, (0, None)))(
        jax.random.split(jax.random.key(1), num_layouts), params
    )
    config = PlannerConfig(horizon=horizon)
    solve = jax.jit(lambda layouts: solve_layouts(env, layouts, params, config))
    seconds = median_seconds(lambda: solve(layouts), repeats)
    return num_layouts / seconds


def main(argv=None) -> None:
    """Prints steps/s and layouts solved/s of every registered environment and split."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-envs", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--layouts", type=int, default=4096)
    parser.add_argument("--horizon", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device(s))")
    header = [f"{s + ' steps/s':>18}" for s in STEPPERS]
    solved_header = f"layouts/s H={args.horizon}"
    print(f"{'environment':<12} {'split':<6} {' '.join(header)} {solved_header:>16}")
    for name in registry.names("environments"):
        spec = registry.get("environments", name)
        for split in spec.splits:
            env, params = spec.build(split)
            rates = [
                env_steps_per_second(env, params, args.num_envs, args.steps, args.repeats, s)
                for s in STEPPERS
            ]
            solved = layouts_solved_per_second(env, params, args.layouts, args.horizon,
                                               args.repeats)
            cells = " ".join(f"{rate:>18,.0f}" for rate in rates)
            print(f"{name:<12} {split:<6} {cells} {solved:>16,.0f}", flush=True)


if __name__ == "__main__":
    main()
