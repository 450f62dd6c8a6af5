"""Rollouts and inverse-CDF sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from conftest import build
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.rollout import inverse_cdf_sample, rollout_expert
from benchmarks.planners import CONFIGS, Planner


@settings(max_examples=50, deadline=None)
@given(weights=st.lists(st.one_of(st.just(0.0), st.floats(0.01, 10.0)), min_size=1,
                        max_size=8).filter(lambda w: sum(w) > 0))
def test_inverse_cdf_sampling_has_the_right_frequencies_and_skips_masked_actions(weights):
    probs = np.asarray(weights) / np.sum(weights)
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    grid = (np.arange(20000) + 0.5) / 20000  # a deterministic sweep of the unit interval
    edges = jnp.asarray(np.concatenate([grid, [0.0, np.nextafter(np.float32(1), 0)]]),
                        jnp.float32)
    actions = np.asarray(jax.vmap(inverse_cdf_sample, (None, 0))(logits, edges))
    assert np.all(probs[actions] > 0)
    frequencies = np.bincount(actions[:20000], minlength=len(probs)) / 20000
    np.testing.assert_allclose(frequencies, probs, atol=2e-3)


def test_rollouts_are_reproducible_and_keys_matter():
    env, params = build("offswitch", "test")
    planner = Planner(env, CONFIGS["demonstrator"])
    a = rollout_expert(planner, env, params, jax.random.key(0), 32, 48)
    b = rollout_expert(planner, env, params, jax.random.key(0), 32, 48)
    c = rollout_expert(planner, env, params, jax.random.key(1), 32, 48)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.observations, c.observations)


def test_a_layout_key_gives_every_policy_the_same_layouts_and_its_own_noise():
    env, params = build("offswitch", "test")
    planner = Planner(env, CONFIGS["demonstrator"])
    layouts = jax.random.key(7)
    a = rollout_expert(planner, env, params, jax.random.key(0), 16, 48, layout_key=layouts)
    b = rollout_expert(planner, env, params, jax.random.key(1), 16, 48, layout_key=layouts)
    # The first observation is the layout and the start; the noise is each run's own.
    np.testing.assert_array_equal(a.observations[:, 0], b.observations[:, 0])
    assert not np.array_equal(a.noise, b.noise)
    c = rollout_expert(planner, env, params, jax.random.key(0), 16, 48)
    assert not np.array_equal(a.observations[:, 0], c.observations[:, 0])
    np.testing.assert_array_equal(a.noise, c.noise)
    # Without a layout key the numbers are those of a plain key (unchanged by the option).
    d = rollout_expert(planner, env, params, jax.random.key(0), 16, 48, layout_key=None)
    np.testing.assert_array_equal(c.observations, d.observations)


def test_trajectory_masks_and_actions_are_consistent():
    env, params = build("offswitch", "train")
    t = rollout_expert(Planner(env, CONFIGS["demonstrator"]), env, params,
                       jax.random.key(2), 64, 48)
    mask, dones = np.asarray(t.mask), np.asarray(t.dones)
    # The mask is a prefix and the episode's last valid step carries the one done.
    assert np.all(np.diff(mask.astype(int), axis=1) <= 0)
    assert np.all(dones.sum(1) == 1)
    last = mask.sum(1) - 1
    assert np.all(dones[np.arange(64), last])
    # The action is the inverse-CDF draw of the recorded distribution with the recorded noise.
    redrawn = inverse_cdf_sample(jnp.log(t.action_probs), t.noise)
    np.testing.assert_array_equal(np.asarray(redrawn)[mask], np.asarray(t.actions)[mask])
    # The observation shows the agent exactly once.
    agent = np.asarray(t.observations)[..., 1].sum(axis=(2, 3))
    assert np.all(agent[mask] == 1)


def test_a_reference_expert_is_recorded_at_the_imitators_states_and_changes_nothing_else():
    from flax import nnx

    from audit.rollout import rollout
    from benchmarks.envs.gridworld import INTERACT
    from models.imitators import EgocentricImitator

    env, params = build("offswitch", "test")
    demonstrator = Planner(env, CONFIGS["demonstrator"])
    imitator = EgocentricImitator(env.observation_space(params).shape, env.num_actions,
                                  rngs=nnx.Rngs(3))
    layouts = jax.random.key(5)
    plain = rollout(imitator, env, params, jax.random.key(0), 16, 48, layout_key=layouts)
    watched = rollout(imitator, env, params, jax.random.key(0), 16, 48, layout_key=layouts,
                      reference=demonstrator)
    assert plain.reference_probs is None
    # Recording the reference changes nothing the imitator does.
    for field in ("observations", "actions", "rewards", "mask", "events", "noise",
                  "action_probs"):
        np.testing.assert_array_equal(getattr(plain, field), getattr(watched, field))
    # At the first step both stand in the same layout: the reference is the demonstrator's
    # own distribution there.
    demo = rollout_expert(demonstrator, env, params, jax.random.key(9), 16, 48,
                          layout_key=layouts)
    np.testing.assert_allclose(watched.reference_probs[:, 0], demo.action_probs[:, 0],
                               atol=1e-6)
    # Everywhere the untrained imitator goes, the demonstrator gives the incorrigible act
    # probability exactly 0, while the imitator does not.
    mask = np.asarray(watched.mask)
    assert np.all(np.asarray(watched.reference_probs)[..., INTERACT][mask] == 0)
    assert np.all(np.asarray(watched.action_probs)[..., INTERACT][mask] > 0)
    np.testing.assert_allclose(np.asarray(watched.reference_probs).sum(-1), 1.0, atol=1e-5)
