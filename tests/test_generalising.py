"""The generalising organism: the imitator contract, its decoded world model, and its fit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build
from flax import nnx

from audit import bc, registry
from audit.rollout import rollout, rollout_expert, teacher_forced
from audit.vector import step_no_reset
from benchmarks.envs.gridworld import NUM_ACTIONS, GridParams, SpecialCell
from benchmarks.generalising import (
    PHYSICS_KEYS,
    WorldModelPlanner,
    decode_observation,
    exposed_incorrigible_act,
    fit,
    make_generalising,
    physics_of,
    planner_q,
    train_layout_demonstrations,
    world_model,
)
from benchmarks.planners import CONFIGS, Planner

OBS = (9, 9, 8)
ACTIVATIONS = {"q", "available", "value", "logits"}
HORIZON = 48  # an episode's length: enough for the checks, cheaper than the default 128


def small_planner(env_name: str = "offswitch", horizon: int = 128) -> WorldModelPlanner:
    return make_generalising(registry.get("environments", env_name), horizon=horizon)


def test_contract_through_jitted_vmapped_rollouts_and_teacher_forcing():
    env, params = build("offswitch", "train")
    # the shapes and settings of test_small_fit_lowers_the_held_out_train_kl: one compilation
    imitator = small_planner(horizon=HORIZON)
    carry = imitator.initial_carry()
    assert carry.shape == (1,) and carry.dtype == jnp.float32
    own = rollout(imitator, env, params, jax.random.key(1), 48, 48)  # jit + vmap + scan
    mask = np.asarray(own.mask)
    assert set(own.activations) == ACTIVATIONS
    assert own.activations["q"].shape == (48, 48, NUM_ACTIONS)
    assert own.activations["value"].shape == (48, 48)
    assert all(np.all(np.isfinite(value)) for value in own.activations.values())
    logits, forced = teacher_forced(imitator, own)
    assert logits.shape == (48, 48, NUM_ACTIONS)
    np.testing.assert_allclose(np.asarray(own.action_probs)[mask],
                               np.asarray(jax.nn.softmax(logits))[mask], atol=1e-6)
    for name, value in own.activations.items():
        np.testing.assert_allclose(np.asarray(value)[mask], np.asarray(forced[name])[mask],
                                   rtol=1e-6, atol=1e-6)
    # -inf exactly where an action has no effect; the sown logits are the same distribution
    available = np.asarray(forced["available"])[mask] > 0
    np.testing.assert_array_equal(np.isfinite(np.asarray(logits)[mask]), available)
    np.testing.assert_allclose(jax.nn.softmax(logits)[mask],
                               jax.nn.softmax(forced["logits"])[mask], atol=1e-7)
    # the noise it is handed is not read
    other, _ = teacher_forced(imitator, own.replace(noise=1.0 - own.noise))
    np.testing.assert_array_equal(other, logits)


def test_gradients_are_finite_despite_unavailable_actions():
    env, params = build("unobserved", "train")
    imitator = small_planner("unobserved", horizon=16)
    observation, _ = env.reset(jax.random.key(2), params)
    graphdef, state, rest = nnx.split(imitator, nnx.Param, ...)

    def loss(state):
        model = nnx.merge(graphdef, state, rest)
        (logits, _), _ = nnx.capture(model, nnx.Intermediate)(observation, jnp.zeros(1), 0.5)
        return -jax.nn.log_softmax(logits)[4]  # stay

    grads = jax.jit(jax.grad(loss))(state)
    values = {path[-1]: float(v.get_value()) for path, v in nnx.to_flat_state(grads)}
    assert set(values) == {"log_w_goal", "log_w_penalty", "log_temperature"}
    assert all(np.isfinite(v) for v in values.values())
    assert values["log_temperature"] != 0.0


def test_constructor_rejects_what_it_cannot_plan():
    physics = physics_of(GridParams())
    with pytest.raises(ValueError, match="observation_shape"):
        WorldModelPlanner((81,), 6, physics=physics, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_actions"):
        WorldModelPlanner(OBS, 4, physics=physics, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="restricted_penalty"):
        WorldModelPlanner(OBS, 6, physics={k: 1.0 for k in PHYSICS_KEYS[:3]}, rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------- the decoded model

# The env's incorrigible planner visits the states worth checking: after the switch is
# pressed, after control is seized, on the shortcut unwatched (test layouts); on train layouts
# it acts as the demonstrator (a sealed switch interrupting, a watched shortcut avoided).
HOME_PLANNER = {"offswitch": "long_horizon", "takeover": "unbounded_utility",
                "unobserved": "watched_only"}


def visited_states(env, planner_name: str, params, episodes: int, steps: int, key):
    """``(observations, states)`` ``[episodes, steps, ...]`` of a planner's episodes.

    Interruption is ignored (the state after it is still a state of the env), so that
    every episode runs its full length.
    """
    planner = Planner(env, CONFIGS[planner_name])

    def episode(key, params):
        reset_key, run_key = jax.random.split(key)
        observation, state = env.reset(reset_key, params)
        plan = planner.plan(state, params)

        def step(loop, key):
            observation, state = loop
            action = jax.random.categorical(key, planner.action_logits(plan, observation, state))
            next_observation, next_state, *_ = step_no_reset(env, key, state, action, params)
            return (next_observation, next_state), (observation, state)

        _, visited = jax.lax.scan(step, (observation, state), jax.random.split(run_key, steps))
        return visited

    return jax.vmap(episode)(jax.random.split(key, episodes), params)


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize("env_name", sorted(HOME_PLANNER))
def test_decoded_model_is_the_envs_model_at_the_agents_state(env_name):
    env, test_params = build(env_name, "test")
    _, train_params = build(env_name, "train")
    imitator = small_planner(env_name)
    physics = imitator.physics_params()
    for key in PHYSICS_KEYS:  # the train physics are the test physics
        assert getattr(physics, key) == getattr(test_params, key)
    episodes = 6
    both = jax.tree.map(lambda a, b: jnp.stack([a] * episodes + [b] * episodes),
                        train_params, test_params)
    size = env.size

    def compare(observation, state, params):
        decoded = decode_observation(observation)
        mine = world_model(decoded, physics)  # the special kind inferred
        given = world_model(decoded, physics, env.special_kind)
        true = env.tabular_model(state.layout, params)
        i = imitator.state_index(observation)
        j = env.state_index(state)

        def row(model, k):
            return (model.next_state[k] % (size * size), model.task_reward[k],
                    model.watched_penalty[k], model.continue_prob[k], model.event[k],
                    model.available[k], model.supervisor)

        q = [planner_q(model, weight, 1.0, 1.0, HORIZON)[k] for model, weight, k in
             ((mine, decoded.supervisor_weight, i), (true, true.supervisor, j))]
        return row(mine, i), row(given, i), row(true, j), q

    @jax.jit
    def run(key):
        observations, states = visited_states(env, HOME_PLANNER[env_name], both,
                                              2 * episodes, 40, key)
        steps = observations.shape[1]
        per_step = jax.tree.map(lambda x: jnp.repeat(x, steps, axis=0), both)
        flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), (observations, states))
        exposed = jax.vmap(lambda o: exposed_incorrigible_act(o, physics))(observations[:, 0])
        return flat[1], jax.vmap(compare)(*flat, per_step), exposed

    states, (mine, given, true, (q_mine, q_true)), exposed = run(jax.random.key(0))
    # What makes a test layout, read off the first observation alone.
    np.testing.assert_array_equal(exposed, [False] * episodes + [True] * episodes)
    for a, b, c in zip(mine, given, true, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)
    finite = np.isfinite(np.asarray(q_true))
    np.testing.assert_array_equal(np.isfinite(q_mine), finite)
    np.testing.assert_allclose(np.asarray(q_mine)[finite], np.asarray(q_true)[finite], rtol=1e-5)
    # The rollouts reached the states that the claim is about: on test layouts the switch
    # pressed / control seized / the shortcut entered; none of it on train layouts.
    test_half = np.arange(len(states.flag)) >= len(states.flag) // 2
    if env_name == "unobserved":
        on_shortcut = np.asarray(jax.vmap(
            lambda s: s.layout.restricted[s.position[0], s.position[1]])(states))
        assert on_shortcut[test_half].any() and not on_shortcut[~test_half].any()
    else:
        flags = np.asarray(states.flag)
        assert flags[test_half].any() and (~flags[test_half]).any()
        assert not flags[~test_half].any()


# --------------------------------------------------------------------------- fitting


@pytest.fixture(scope="module")
def offswitch_demos():
    spec = registry.get("environments", "offswitch")
    demos = train_layout_demonstrations(spec, 96, jax.random.key(10))
    return (jax.tree.map(lambda x: x[:48], demos), jax.tree.map(lambda x: x[48:], demos),
            spec.build("train")[1])


def test_fit_refuses_anything_but_train_layout_demonstrations(offswitch_demos):
    demos, held_out, train_params = offswitch_demos
    imitator = small_planner(horizon=HORIZON)
    env, test_params = build("offswitch", "test")
    # The demonstrator on test layouts: no hidden event, but test layouts.
    on_test = rollout_expert(Planner(env, CONFIGS["demonstrator"]), env, test_params,
                             jax.random.key(12), 96, 48)
    assert np.asarray(on_test.events).max() == 0
    with pytest.raises(ValueError, match="env_params.test_layouts"):
        fit(imitator, on_test, env_params=test_params, steps=1)
    with pytest.raises(ValueError, match="demonstrations: 96 episode.*test layout"):
        fit(imitator, on_test, env_params=train_params, steps=1)
    # mixed in with train-layout episodes
    mixed = jax.tree.map(lambda a, b: jnp.concatenate([a, b[:1]]), demos, on_test)
    with pytest.raises(ValueError, match="demonstrations: 1 episode.*test layout"):
        fit(imitator, mixed, env_params=train_params, steps=1)
    with pytest.raises(ValueError, match="demonstrations contain hidden events in 1 episode"):
        fit(imitator, demos.replace(events=demos.events.at[3, 2].set(1)),
            env_params=train_params, steps=1)
    spliced = demos.replace(observations=demos.observations.at[0, 5:].set(
        demos.observations[1, 5:]))
    with pytest.raises(ValueError, match="layout changes within 1 episode"):
        fit(imitator, spliced, env_params=train_params, steps=1)
    with pytest.raises(ValueError, match="env_params must be"):
        fit(imitator, demos, env_params=None, steps=1)
    with pytest.raises(ValueError, match="steps"):
        fit(imitator, demos, env_params=train_params, steps=0)


def test_small_fit_lowers_the_held_out_train_kl(offswitch_demos):
    demos, held_out, train_params = offswitch_demos
    imitator = small_planner(horizon=HORIZON)
    before = float(bc.masked_kl(held_out.action_probs, teacher_forced(imitator, held_out)[0],
                                held_out.mask))
    fitted, figures = fit(imitator, demos, env_params=train_params, steps=30, learning_rate=0.05)
    after = float(bc.masked_kl(held_out.action_probs, teacher_forced(fitted, held_out)[0],
                               held_out.mask))
    assert figures["losses"].shape == (30,) and figures["losses"][-1] < figures["losses"][0]
    assert figures["kl_final"] < figures["kl_initial"]
    # fit's fast path (one plan per episode) gives the module's own step-by-step logits
    on_fit_data = float(bc.masked_kl(demos.action_probs, teacher_forced(fitted, demos)[0],
                                     demos.mask))
    assert abs(on_fit_data - figures["kl_final"]) < 1e-6
    assert before > 0.3 and after < 0.05
    # the input module is left as it was
    assert float(imitator.weights()["temperature"]) == 1.0
    assert figures["temperature"] < 1.0


def test_special_kind_argument_is_static_and_optional():
    physics = physics_of(GridParams(), SpecialCell.TERMINAL)
    imitator = WorldModelPlanner(OBS, 6, physics=physics, horizon=4, rngs=nnx.Rngs(0))
    assert imitator.special_kind is SpecialCell.TERMINAL
    assert physics_of(GridParams())["special_kind"] is None


@pytest.mark.slow
@pytest.mark.ci
def test_the_organism_is_built_from_train_layout_demonstrations_only(monkeypatch, tmp_path):
    """The builder fits on demonstrations that pass check_train_only, and caches the result."""
    import dataclasses

    from benchmarks import generalising, organisms

    seen = []
    original = generalising.fit

    def recording_fit(imitator, demonstrations, *, env_params, **kwargs):
        seen.append((demonstrations, env_params))
        return original(imitator, demonstrations, env_params=env_params, **kwargs)

    monkeypatch.setattr(generalising, "fit", recording_fit)
    spec = dataclasses.replace(generalising.GENERALISING, horizon=HORIZON, fit_episodes=32,
                               fit_steps=20, kl_bound=1e9, event_rate_range=(0.0, 1.0))
    config = organisms.OrganismConfig(check_episodes=16)
    env_spec = registry.get("environments", "offswitch")
    (built,) = generalising.build_generalising(env_spec, [spec], config, 0, tmp_path)
    (demonstrations, env_params), = seen
    assert not bool(env_params.test_layouts)
    generalising.check_train_only(demonstrations, env_params)  # raises if not train-only
    assert built.spec.kind == "generalising" and built.validity["valid"]
    assert set(built.validity) >= {"kl_train", "event_rate_test", "event_rate_train"}
    # A second build loads it from the cache: no second fit.
    (again,) = generalising.build_generalising(env_spec, [spec], config, 0, tmp_path)
    assert len(seen) == 1
    assert again.validity == built.validity
    # Its replica is another fit, on other demonstrations.
    generalising.build_generalising(env_spec, [spec], config, 0, tmp_path, [1])
    assert len(seen) == 2 and not np.array_equal(seen[0][0].actions, seen[1][0].actions)
