"""The planner imitator's cost per observation, piece by piece (a benchmark script).

    python -m benchmarks.perf.planner [--env offswitch] [--batches 32,256,1536] [--calls 30]

For each batch size: microseconds per observation of the whole imitator
(:class:`models.imitators.PlannerImitator`, vmapped over the batch), forward and
gradient (``jax.grad`` of a weighted sum of its logits with respect to its parameters),
and of its two pieces alone: the reward network (the two convolutions) and the soft
value iteration (forward, and the gradient with respect to reward map, kernels and
discount). The observations are the demonstrator's own, on train layouts. Compilation
is excluded; each figure is the median of ``--calls`` timed calls. A batch of 32 is
what behaviour cloning hands the imitator in one step of its scan over time (32
episodes a minibatch), 1,536 as many observations as a minibatch of 48-step episodes
with every step at once (``BCConfig(steps_at_once=True)``, which runs them under two
nested ``jax.vmap`` calls, over episodes and steps, where this script has one flat batch).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from audit import registry
from audit.rollout import imitator_step, rollout_expert
from benchmarks.perf.timing import median_seconds, positive_ints
from models.imitators import PlannerImitator, _soft_value_iteration


def _batch_sizes(text: str) -> tuple[int, ...]:
    """``--batches``: distinct comma-separated sizes >= 1, or argparse's one-line error."""
    try:
        sizes = positive_ints(text)
    except ValueError:
        sizes = ()
    if not sizes or len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(
            f"expected distinct comma-separated batch sizes >= 1, e.g. 32,256; got {text!r}")
    return sizes


def piece_costs(imitator: PlannerImitator, observations: jax.Array, calls: int
                ) -> dict[str, float]:
    """Microseconds per observation of each piece of ``imitator``, timed alone.

    Args:
      imitator: the planner imitator whose parameters are used.
      observations: ``[B, H, W, C]``, one batch of ``B`` observations.
      calls: timed calls per piece (after one untimed, compiling call); the median counts.

    Returns:
      ``{piece: microseconds per observation}`` for ``imitator forward`` and ``imitator
      gradient`` (with respect to all its parameters, of a weighted sum of its logits),
      ``reward network forward`` and ``reward network gradient`` (all parameters, so
      zero for the kernels' and discount's), ``value iteration forward`` and ``value
      iteration gradient`` (with respect to reward map, kernels and discount, the
      kernels and discount shared by the batch as in cloning).
    """
    graphdef, state = nnx.split(imitator)
    batch = observations.shape[0]
    logit_key, reward_key, value_key = jax.random.split(jax.random.key(0), 3)
    weights = jax.random.normal(logit_key, (imitator.reward_conv.kernel.shape[-1],))

    def logits(state, observations):
        return jax.vmap(lambda observation: imitator_step(
            graphdef, state, observation, imitator.initial_carry(), None)[0])(observations)

    def rewards(state, observations):
        return jax.vmap(nnx.merge(graphdef, state)._reward)(observations.astype(jnp.float32))

    value_iteration = jax.vmap(_soft_value_iteration(imitator.softness, imitator.iterations),
                               (0, None, None))
    reward = jax.jit(rewards)(state, observations)
    kernels = jax.nn.softmax(imitator.kernel_logits[...], axis=-1)
    discount = jax.nn.sigmoid(imitator.discount_logit[...])
    reward_weights = jax.random.normal(reward_key, reward.shape[1:])
    value_weights = jax.random.normal(value_key, reward.shape[1:3])

    programs = {
        "imitator forward": (jax.jit(logits), (state, observations)),
        "imitator gradient": (jax.jit(jax.grad(
            lambda s, o: jnp.sum(logits(s, o) @ weights))), (state, observations)),
        "reward network forward": (jax.jit(rewards), (state, observations)),
        "reward network gradient": (jax.jit(jax.grad(
            lambda s, o: jnp.sum(rewards(s, o) * reward_weights))), (state, observations)),
        "value iteration forward": (jax.jit(value_iteration), (reward, kernels, discount)),
        "value iteration gradient": (jax.jit(jax.grad(
            lambda r, k, d: jnp.sum(value_iteration(r, k, d) * value_weights),
            argnums=(0, 1, 2))), (reward, kernels, discount)),
    }
    return {name: median_seconds(lambda fn=fn, args=args: fn(*args), calls) * 1e6 / batch
            for name, (fn, args) in programs.items()}


def main(argv=None) -> None:
    """Prints the planner imitator's microseconds per observation by piece and batch size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="offswitch")
    parser.add_argument("--batches", type=_batch_sizes, default=(32, 256, 1536),
                        help="comma-separated batch sizes (default 32,256,1536)")
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f"--calls must be >= 1, got {args.calls}")

    env, params = registry.get("environments", args.env).build("train")
    max_steps = int(params.max_steps_in_episode)
    demonstrator = registry.get("planners", "demonstrator").make(env)
    episodes = -(-max(args.batches) // max_steps)
    demos = rollout_expert(demonstrator, env, params, jax.random.key(0), episodes, max_steps)
    pool = np.asarray(demos.observations).reshape(-1, *demos.observations.shape[2:])
    shape = tuple(env.observation_space(params).shape)
    imitator = PlannerImitator(shape, env.num_actions, rngs=nnx.Rngs(1))

    print(f"jax {jax.__version__} on {jax.default_backend()}; env {args.env}, observation "
          f"{shape}; microseconds per observation, median of {args.calls} calls")
    costs = {batch: piece_costs(imitator, jnp.asarray(pool[:batch]), args.calls)
             for batch in args.batches}
    names = list(costs[args.batches[0]])
    print(f"{'piece':<26}" + "".join(f"{f'batch {batch}':>12}" for batch in args.batches))
    for name in names:
        print(f"{name:<26}" + "".join(f"{costs[batch][name]:>12.1f}" for batch in args.batches))


if __name__ == "__main__":
    main()
