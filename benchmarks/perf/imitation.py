"""Imitator throughput: behaviour-cloning samples/s and rollout steps/s (a benchmark script).

    python -m benchmarks.perf.imitation [--env offswitch] [--updates 200] [--episodes 1024]

For each imitator (``mlp``, ``gru``, ``planner``): BC training samples per second
(valid demonstrator steps per minibatch x updates / seconds) and rollout
environment steps per second (``--episodes`` vmapped episodes of the
environment's length, activations recorded). Compilation is excluded; each figure
is the median of ``--repeats`` timed runs. The row ``planner (plain)`` times the
planner imitator's plain definition (:class:`PlainPlannerImitator`) beside its
implementation, in the same run. The rows ``... (steps at once)`` clone the same
imitator with ``BCConfig(steps_at_once=True)`` (a scan for the carries, then every step
of a minibatch in one batch); their rollouts are the rows above theirs.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from audit import registry
from audit.bc import BCConfig, make_train
from audit.rollout import rollout, rollout_expert
from benchmarks.perf.timing import median_seconds
from models.imitators import PlannerImitator


def plain_planner(imitator: PlannerImitator, observation: jax.Array):
    """The planner imitator's function as plainly written: ``(logits, activations)``.

    ``nnx.Conv`` layers, a stacked 3x3 neighbourhood, ``logsumexp`` and autodiff through
    the scan: the definition that :class:`models.imitators.PlannerImitator`'s batch-last,
    hand-differentiated implementation computes (tests/test_imitators.py pins the two
    together, values and gradients).
    """
    grid = observation.astype(jnp.float32)
    height, width = grid.shape[:2]
    reward = imitator.reward_conv(jax.nn.relu(imitator.feature_conv(grid)))
    discount = jax.nn.sigmoid(imitator.discount_logit[...])
    kernels = jax.nn.softmax(imitator.kernel_logits[...], axis=-1)

    def expected_next_value(value):
        padded = jnp.pad(value, 1)
        neighbourhood = jnp.stack([padded[r:r + height, c:c + width]
                                   for r in range(3) for c in range(3)], axis=-1)
        return jnp.einsum("hwk,ak->hwa", neighbourhood, kernels)

    def backup(value, _):
        q = reward + discount * expected_next_value(value)
        return imitator.softness * jax.nn.logsumexp(q / imitator.softness, axis=-1), None

    value, _ = jax.lax.scan(backup, jnp.zeros((height, width)), None,
                            length=imitator.iterations)
    q = reward + discount * expected_next_value(value)
    logits = jnp.einsum("hw,hwa->a", grid[..., imitator.agent_channel], q)
    return logits, {"reward": reward, "value": value, "q": q, "discount": discount,
                    "logits": logits}


class PlainPlannerImitator(PlannerImitator):
    """:class:`models.imitators.PlannerImitator` computed by :func:`plain_planner`: the
    same parameters and activations, the baseline of its throughput figures."""

    def __call__(self, observation, carry, noise):
        logits, activations = plain_planner(self, observation)
        for name, array in activations.items():
            self.sow(nnx.Intermediate, name, array)
        return logits, carry


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
    print(f"{'imitator':<26} {'BC samples/s':>14} {'rollout steps/s':>16}")
    for name, steps_at_once in (("mlp", False), ("mlp", True), ("gru", False),
                                ("gru", True), ("planner", False), ("planner", True),
                                ("planner (plain)", False)):
        imitator_class = (PlainPlannerImitator if name == "planner (plain)"
                          else registry.get("imitators", name))

        def make(key, imitator_class=imitator_class):
            return imitator_class(shape, env.num_actions, rngs=nnx.Rngs(key))

        config = BCConfig(updates=args.updates, batch_episodes=args.batch_episodes,
                          steps_at_once=steps_at_once)
        train = jax.jit(make_train(config, make, demos)[0])
        bc_seconds = median_seconds(lambda train=train: train(jax.random.key(1)), args.repeats)
        samples = args.updates * args.batch_episodes * steps_per_episode
        rollout_rate = "-"  # rollouts take one step at a time either way: the row above
        if not steps_at_once:
            imitator = make(jax.random.key(2))
            roll_seconds = median_seconds(
                lambda imitator=imitator: rollout(imitator, env, params, jax.random.key(3),
                                                  args.episodes, max_steps), args.repeats)
            rollout_rate = f"{args.episodes * max_steps / roll_seconds:,.0f}"
        label = f"{name} (steps at once)" if steps_at_once else name
        print(f"{label:<26} {samples / bc_seconds:>14,.0f} {rollout_rate:>16}", flush=True)


if __name__ == "__main__":
    main()
