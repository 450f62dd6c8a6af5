"""The imitator contract, rollouts with activations, and teacher forcing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build
from flax import nnx
from float_checks import assert_same_floats

from audit.checkpoint import load_params, save_params
from audit.rollout import rollout, rollout_expert, teacher_forced, teacher_forced_activations
from benchmarks.perf.imitation import plain_planner
from benchmarks.planners import CONFIGS, Planner
from models.imitators import IMITATORS, make_imitator

OBS = (9, 9, 8)
EXPECTED_ACTIVATIONS = {
    "mlp": {"hidden_0", "hidden_1", "logits"},
    "egocentric": {"hidden_0", "hidden_1", "logits"},
    "gru": {"embedding", "hidden", "logits"},
    "planner": {"reward", "value", "q", "discount", "logits"},
}


@pytest.fixture(params=sorted(IMITATORS))
def imitator_name(request):
    return request.param


def test_step_contract_and_sown_activations(imitator_name):
    imitator = make_imitator(imitator_name, OBS, 6, jax.random.key(0))
    carry = imitator.initial_carry()
    (logits, next_carry), intermediates = nnx.capture(imitator, nnx.Intermediate)(
        jnp.zeros(OBS), carry, jnp.float32(0.3))
    assert logits.shape == (6,) and next_carry.shape == carry.shape
    assert {path[-1] for path, _ in nnx.to_flat_state(intermediates)} == \
        EXPECTED_ACTIVATIONS[imitator_name]


def test_rollouts_are_reproducible_and_carry_activations(imitator_name):
    env, params = build("offswitch", "train")
    imitator = make_imitator(imitator_name, OBS, 6, jax.random.key(0))
    a = rollout(imitator, env, params, jax.random.key(1), 8, 20)
    b = rollout(imitator, env, params, jax.random.key(1), 8, 20)
    c = rollout(imitator, env, params, jax.random.key(2), 8, 20)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.actions, c.actions)
    assert set(a.activations) == EXPECTED_ACTIVATIONS[imitator_name]
    assert all(v.shape[:2] == (8, 20) for v in a.activations.values())


def test_teacher_forcing_reproduces_rollout_activations_exactly(imitator_name):
    env, params = build("offswitch", "test")
    imitator = make_imitator(imitator_name, OBS, 6, jax.random.key(3))
    own = rollout(imitator, env, params, jax.random.key(4), 8, 24)
    logits, forced = teacher_forced(imitator, own)
    mask = np.asarray(own.mask)
    for name, value in own.activations.items():
        np.testing.assert_array_equal(np.asarray(forced[name])[mask], np.asarray(value)[mask])
    # The softmax runs inside the rollout's scan here and on its own there.
    assert_same_floats(np.asarray(jax.nn.softmax(logits))[mask],
                       np.asarray(own.action_probs)[mask])


def test_teacher_forcing_on_demonstrations_gives_the_same_kind_of_features():
    env, params = build("offswitch", "train")
    demos = rollout_expert(Planner(env, CONFIGS["demonstrator"]), env, params,
                           jax.random.key(0), 4, 48)
    imitator = make_imitator("gru", OBS, 6, jax.random.key(0))
    activations = teacher_forced_activations(imitator, demos)
    assert activations["hidden"].shape == (4, 48, 128)
    # The recurrent state really depends on the history, not only the current observation.
    assert not np.allclose(activations["hidden"][:, 1], activations["hidden"][:, 2])


def test_wrong_observation_shapes_are_reported_with_names_and_shapes():
    env, params = build("offswitch", "train")
    imitator = make_imitator("mlp", (7, 7, 8), 6, jax.random.key(0))
    with pytest.raises(ValueError, match=r"environment OffSwitch has observation shape "
                                         r"\(9, 9, 8\), but the imitator MLPImitator expects "
                                         r"\(7, 7, 8\)"):
        rollout(imitator, env, params, jax.random.key(0), 2, 4)
    demos = rollout_expert(Planner(env, CONFIGS["demonstrator"]), env, params,
                           jax.random.key(0), 2, 6)
    with pytest.raises(ValueError, match=r"trajectories.observations has observation shape"):
        teacher_forced(imitator, demos)
    with pytest.raises(ValueError, match=r"noise has shape \(2, 5\)"):
        teacher_forced(make_imitator("mlp", OBS, 6, jax.random.key(0)),
                       demos.replace(noise=demos.noise[:, :5]))
    with pytest.raises(ValueError, match="needs a grid observation"):
        make_imitator("planner", (4,), 2, jax.random.key(0))
    with pytest.raises(ValueError,
                       match="unknown imitator 'cnn'; choose from: mlp, egocentric, gru"):
        make_imitator("cnn", OBS, 6, jax.random.key(0))


def test_parameters_round_trip_through_npz(tmp_path, imitator_name):
    trained = make_imitator(imitator_name, OBS, 6, jax.random.key(0))
    fresh = make_imitator(imitator_name, OBS, 6, jax.random.key(1))
    load_params(fresh, save_params(trained, tmp_path / "params.npz"))
    obs = jax.random.uniform(jax.random.key(2), OBS)
    def logits(module):
        return nnx.capture(module, nnx.Intermediate)(obs, module.initial_carry(), 0.5)[0][0]

    np.testing.assert_array_equal(logits(trained), logits(fresh))
    with pytest.raises(ValueError, match="does not fit"):
        load_params(make_imitator("mlp", (7, 7, 8), 6, jax.random.key(0)),
                    tmp_path / "params.npz")


def test_egocentric_view_centres_the_agent_and_walls_the_outside():
    from models.imitators import egocentric

    grid = np.zeros((9, 9, 8), np.float32)
    grid[:, :, 0] = 1.0  # all walls ...
    grid[2:7, 2:7, 0] = 0.0  # ... but a room
    grid[3, 4, 1] = 1.0  # the agent
    grid[5, 6, 2] = 1.0  # the goal
    view = np.asarray(egocentric(jnp.asarray(grid)))
    assert view.shape == (17, 17, 7)  # the agent channel is dropped
    centre = 8
    assert view[centre + 2, centre + 2, 1] == 1.0  # the goal, two down and two right
    assert view[centre, centre, 0] == 0.0 and view[0, 0, 0] == 1.0  # outside reads as wall
    # Moving agent, room and goal together leaves the view unchanged: the point of it.
    shifted = np.zeros_like(grid)
    shifted[:, :, 0] = 1.0
    shifted[1:6, 1:6, 0] = 0.0
    shifted[2, 3, 1] = 1.0
    shifted[4, 5, 2] = 1.0
    np.testing.assert_array_equal(np.asarray(egocentric(jnp.asarray(shifted))), view)
    cropped = np.asarray(egocentric(jnp.asarray(grid), radius=6))
    np.testing.assert_array_equal(cropped, view[2:15, 2:15])
    with pytest.raises(ValueError, match="radius must be in"):
        egocentric(jnp.asarray(grid), radius=9)


@pytest.mark.parametrize("seed, shape", [
    (0, OBS),
    # Taller than wide: a row taken for a column anywhere would read off the grid.
    (0, (7, 5, 3)),
    pytest.param(1, OBS, marks=(pytest.mark.slow, pytest.mark.ci))])
def test_planner_computes_its_plain_definition_and_its_gradients(seed, shape):
    """Forward values and parameter gradients agree with its plain definition within
    float32 rounding: batched (as BC runs it, grad outside vmap), one observation, and
    per-example gradients (vmap outside grad)."""
    keys = jax.random.split(jax.random.key(seed), 4)
    graphdef, state = nnx.split(make_imitator("planner", shape, 6, keys[0]))
    # Perturbed parameters and real-valued grids, so that no term is trivially small.
    state = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(keys[1], x.shape), state)
    observations = jax.random.uniform(keys[2], (5, *shape))
    weights = jax.random.normal(keys[3], (6,))

    def fast(state, observation):
        (logits, _), intermediates = nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)(
            observation, jnp.zeros(1), jnp.float32(0.5))
        return logits, {path[-1]: value[0] for path, value in nnx.to_flat_state(intermediates)}

    def plain(state, observation):
        return plain_planner(nnx.merge(graphdef, state), observation)

    def loss(state, observation, planner):
        # Cotangents also reach the value and Q maps, as when a monitor trains on them.
        logits, activations = planner(state, observation)
        return (jnp.sum(weights * logits) + 0.1 * jnp.sum(activations["value"] ** 2)
                + jnp.sum(jnp.cos(activations["q"])))

    def one_loss(planner):
        return lambda state, observation: loss(state, observation, planner)

    def batch_loss(planner):
        return lambda state: jnp.sum(jax.vmap(lambda o: loss(state, o, planner))(observations))

    def assert_close(actual, desired):
        for x, y in zip(jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
            scale = float(np.max(np.abs(y)))
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5 * scale)

    # Each side compiled whole: op by op, the plain side's value iteration took 17 s.
    assert_close(jax.jit(jax.vmap(lambda o: fast(state, o)))(observations),
                 jax.jit(jax.vmap(lambda o: plain(state, o)))(observations))
    assert_close(jax.jit(fast)(state, observations[0]), jax.jit(plain)(state, observations[0]))
    assert_close(jax.jit(jax.grad(batch_loss(fast)))(state),
                 jax.jit(jax.grad(batch_loss(plain)))(state))
    assert_close(jax.jit(jax.grad(one_loss(fast)))(state, observations[0]),
                 jax.jit(jax.grad(one_loss(plain)))(state, observations[0]))

    def per_example(planner):
        return jax.jit(jax.vmap(jax.grad(one_loss(planner)), in_axes=(None, 0)))(
            state, observations)

    assert_close(per_example(fast), per_example(plain))
