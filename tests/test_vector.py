"""The exact stepping helpers of audit.vector against gymnax's own step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build

from audit.vector import make_batched_step, step_no_reset


@pytest.mark.parametrize("env_name,reset_budget", [
    # A budget of 4 takes both paths: compacted resets, and the exact full reset when all
    # 32 episodes end at once. The other cases run under `pytest -m ci` (and .ci/run).
    ("takeover", 4),
    *(pytest.param(name, budget, marks=(pytest.mark.slow, pytest.mark.ci))
      for name, budget in (("offswitch", 1), ("offswitch", 64), ("unobserved", 4)))])
def test_compacted_auto_reset_equals_vmapped_gymnax_step(env_name, reset_budget):
    env, params = build(env_name, "test")
    params = params.replace(max_steps_in_episode=6, interruption_prob=0.2)
    batch = 32
    _, states = jax.vmap(env.reset, (0, None))(jax.random.split(jax.random.key(0), batch), params)
    reference = jax.jit(jax.vmap(env.step, (0, 0, 0, None)))
    compacted = jax.jit(make_batched_step(env, reset_budget))
    ref_states = states
    for t in range(14):  # crosses several synchronous truncations (budget fallback path)
        keys = jax.random.split(jax.random.key(100 + t), batch)
        actions = jax.random.randint(jax.random.key(t), (batch,), 0, env.num_actions)
        expected = reference(keys, ref_states, actions, params)
        got = compacted(keys, states, actions, params)
        for a, b in zip(jax.tree.leaves(expected[:5]), jax.tree.leaves(got[:5]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(expected[5]["event"], got[5]["event"])
        ref_states, states = expected[1], got[1]


def test_step_no_reset_equals_step_until_done(env_name):
    env, params = build(env_name, "train")
    _, state = env.reset(jax.random.key(0), params)
    steps = 0
    for t in range(40):
        key, action = jax.random.key(t), jnp.int32(t % env.num_actions)
        expected = env.step(key, state, action, params)
        got = step_no_reset(env, key, state, action, params)
        np.testing.assert_array_equal(expected[3], got[3])  # terminated
        np.testing.assert_array_equal(expected[4], got[4])  # truncated
        if got[3] or got[4]:
            # At the end, env.step has auto-reset; step_no_reset keeps the final state.
            assert int(got[1].time) == int(state.time) + 1
            break
        for a, b in zip(jax.tree.leaves(expected[:3]), jax.tree.leaves(got[:3]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        state = got[1]
        steps += 1
    assert steps >= 1


def test_reset_budget_must_be_positive():
    env, _ = build("offswitch", "train")
    with pytest.raises(ValueError, match="reset_budget must be >= 1"):
        make_batched_step(env, 0)
