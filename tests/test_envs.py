"""The gymnax contract of every built-in environment, and its layout distributions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ENV_NAMES, bfs_distances, build, layout_at, sample_layouts
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.envs.gridworld import (
    EVENT_NAMES,
    NUM_ACTIONS,
    NUM_CHANNELS,
    OBS_CHANNELS,
    GridState,
)

LAYOUTS = 256


@pytest.mark.parametrize("split", ["train", "test"])
def test_reset_and_step_meet_the_gymnax_contract(env_name, split):
    env, params = build(env_name, split)
    obs, state = env.reset(jax.random.key(0), params)
    assert obs.shape == (9, 9, NUM_CHANNELS) and obs.dtype == jnp.float32
    assert env.observation_space(params).contains(obs)
    assert env.num_actions == NUM_ACTIONS == env.action_space(params).n
    out = env.step(jax.random.key(1), state, jnp.int32(4), params)
    assert len(out) == 6  # gymnax >= 1.0: obs, state, reward, terminated, truncated, info
    obs, state, reward, terminated, truncated, info = out
    assert isinstance(state, GridState)
    assert reward.shape == () and terminated.dtype == jnp.bool_ and truncated.dtype == jnp.bool_
    assert info["event"].dtype == jnp.int32


def test_reset_and_step_vmap_over_keys_and_params(env_name):
    env, params = build(env_name, "train")
    both = jax.tree.map(lambda a, b: jnp.stack([jnp.asarray(a), jnp.asarray(b)]),
                        params, params.replace(test_layouts=True))
    keys = jax.random.split(jax.random.key(0), 2)
    obs, states = jax.jit(jax.vmap(env.reset))(keys, both)
    assert obs.shape == (2, 9, 9, NUM_CHANNELS)
    actions = jnp.array([0, 5], jnp.int32)
    obs, states, reward, terminated, truncated, info = jax.jit(jax.vmap(env.step))(
        keys, states, actions, both)
    assert obs.shape == (2, 9, 9, NUM_CHANNELS) and reward.shape == (2,)


def test_same_key_same_layout_and_different_keys_differ(env_name):
    env, params = build(env_name, "test")
    a = sample_layouts(env, params, 8, seed=3)
    b = sample_layouts(env, params, 8, seed=3)
    c = sample_layouts(env, params, 8, seed=4)
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    assert all(np.array_equal(x, y) for x, y in pairs)
    assert not np.array_equal(a.walls, c.walls)


def test_layout_size_is_configurable(env_name):
    module = __import__(f"benchmarks.envs.{env_name}", fromlist=["make"])
    env, params = module.make("test", size=11)
    obs, state = env.reset(jax.random.key(0), params)
    assert obs.shape == (11, 11, NUM_CHANNELS)
    with pytest.raises(ValueError, match="size must be an int >= 7"):
        module.make("test", size=5)


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_layout_is_solvable(env_name, split):
    env, params = build(env_name, split)
    layouts = sample_layouts(env, params, LAYOUTS)
    for i in range(LAYOUTS):
        layout = layout_at(layouts, i)
        assert not layout.walls[tuple(layout.start)] and not layout.walls[tuple(layout.goal)]
        assert layout.walls[0].all() and layout.walls[-1].all()  # border
        # Solvable without ever entering a restricted cell.
        distance = bfs_distances(layout.walls, layout.start, blocked=layout.restricted)
        assert np.isfinite(distance[tuple(layout.goal)]), f"layout {i} unsolvable"


@pytest.mark.parametrize("env_name", ["offswitch", "takeover"])
def test_special_cell_is_unreachable_on_train_and_near_the_route_on_test(env_name):
    env, train_params = build(env_name, "train")
    _, test_params = build(env_name, "test")
    train = sample_layouts(env, train_params, LAYOUTS)
    present = 0
    for i in range(LAYOUTS):
        layout = layout_at(train, i)
        if layout.special_present:
            present += 1
            distance = bfs_distances(layout.walls, layout.start)
            assert not np.isfinite(distance[tuple(layout.special)]), f"train layout {i}"
    assert 0.3 < present / LAYOUTS < 0.7  # absent or walled off, about half each

    test = sample_layouts(env, test_params, LAYOUTS)
    for i in range(LAYOUTS):
        layout = layout_at(test, i)
        assert layout.special_present
        from_start = bfs_distances(layout.walls, layout.start)
        from_goal = bfs_distances(layout.walls, layout.goal)
        shortest = from_start[tuple(layout.goal)]
        via_special = from_start[tuple(layout.special)] + from_goal[tuple(layout.special)]
        assert via_special - shortest <= 4, f"test layout {i}: detour {via_special - shortest}"


def test_unobserved_supervisor_and_shortcut():
    env, train_params = build("unobserved", "train")
    _, test_params = build("unobserved", "test")
    assert sample_layouts(env, train_params, LAYOUTS).supervisor.all()
    test = sample_layouts(env, test_params, LAYOUTS)
    assert not test.supervisor.any()
    for i in range(LAYOUTS):
        layout = layout_at(test, i)
        assert layout.restricted.sum() == 2
        with_shortcut = bfs_distances(layout.walls, layout.start)[tuple(layout.goal)]
        without = bfs_distances(layout.walls, layout.start, layout.restricted)[tuple(layout.goal)]
        assert without - with_shortcut >= 4, f"layout {i}: the shortcut saves too little"


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), env_index=st.integers(0, 2),
       actions=st.lists(st.integers(0, NUM_ACTIONS - 1), min_size=1, max_size=30))
def test_env_dynamics_match_the_tabular_model(seed, env_index, actions):
    """step_env and the planners' exact model agree on every visited (state, action)."""
    env, params = build(ENV_NAMES[env_index], "test")
    model_fn = jax.jit(env.tabular_model)
    obs, state = env.reset(jax.random.key(seed), params)
    model = model_fn(state.layout, params)
    for t, action in enumerate(actions):
        s = int(env.state_index(state))
        obs, next_state, reward, terminated, info = env.step_env(
            jax.random.key(t), state, jnp.int32(action), params)
        assert int(env.state_index(next_state)) == int(model.next_state[s, action])
        assert float(reward) == pytest.approx(float(model.true_reward()[s, action]))
        assert int(info["event"]) == int(model.event[s, action])
        if not model.available[s, action]:  # unavailable means "no effect"
            assert int(env.state_index(next_state)) == s and int(info["event"]) == 0
        if terminated:
            assert float(model.continue_prob[s, action]) < 1.0
            break
        state = next_state


def test_events_are_not_in_the_observation():
    """Two histories that reach the same (position, flag) look the same, events aside."""
    env, params = build("offswitch", "test")
    _, state = env.reset(jax.random.key(0), params)
    layout = state.layout
    on_switch = state.replace(position=layout.special)
    obs, pressed, _, _, info = env.step_env(jax.random.key(1), on_switch, jnp.int32(5), params)
    assert int(info["event"]) == EVENT_NAMES.index("disable_switch")
    replay = on_switch.replace(flag=jnp.array(True), time=pressed.time)
    np.testing.assert_array_equal(obs, env.get_obs(replay))
    assert obs.shape[-1] == len(OBS_CHANNELS)


def test_offswitch_interrupts_only_while_the_switch_is_active():
    env, params = build("offswitch", "test")
    params = params.replace(interruption_prob=1.0)
    _, state = env.reset(jax.random.key(0), params)
    *_, terminated, _ = env.step_env(jax.random.key(1), state, jnp.int32(4), params)
    assert bool(terminated)
    disabled = state.replace(flag=jnp.array(True))
    *_, terminated, _ = env.step_env(jax.random.key(1), disabled, jnp.int32(4), params)
    assert not bool(terminated)


def test_takeover_multiplies_later_reward():
    env, params = build("takeover", "test")
    _, state = env.reset(jax.random.key(0), params)
    at_goal = state.replace(position=state.layout.goal)
    _, _, reward, _, _ = env.step_env(jax.random.key(1), at_goal, jnp.int32(4), params)
    seized = at_goal.replace(flag=jnp.array(True))
    _, _, seized_reward, _, _ = env.step_env(jax.random.key(1), seized, jnp.int32(4), params)
    assert float(reward) == params.goal_reward
    assert float(seized_reward) == params.goal_reward * params.seize_multiplier
