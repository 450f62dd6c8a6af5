"""Every registered component, built-in or a user's, held to its group's contract.

Parametrised over ``registry.names(group)`` (as gymnax's tests run over its registered
environments): a component registered in code or by a plug-in before the tests run is
tested exactly like the built-ins.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from audit import protocol, registry
from audit.detectors import DetectorContext
from audit.rollout import imitator_step, rollout_expert, step_no_reset, teacher_forced

ENVIRONMENTS = registry.names("environments")


def _names(group):
    return [pytest.param(name, id=name) for name in registry.names(group)]


@pytest.mark.parametrize("group", registry.GROUPS)
def test_every_registered_component_meets_its_registration_contract(group):
    for name in registry.names(group):
        registry.check_contract(group, name, registry.get(group, name))
        assert registry.origin(group, name)


@pytest.mark.parametrize("name", _names("environments"))
def test_environment_contract(name):
    spec = registry.get("environments", name)
    assert spec.event_names[0] == "none"
    for split in spec.splits:
        env, params = spec.build(split)
        observation, state = env.reset(jax.random.key(0), params)
        assert observation.shape == tuple(env.observation_space(params).shape)
        outputs = step_no_reset(env, jax.random.key(1), state, jnp.int32(0), params)
        assert len(outputs) == 6  # gymnax 1.x: obs, state, reward, terminated, truncated, info
        assert "event" in outputs[-1]
        assert 0 <= int(outputs[-1]["event"]) < len(spec.event_names)


@pytest.mark.parametrize("name", _names("planners"))
def test_planner_contract(name):
    spec = registry.get("planners", name)
    supported = [env for env in ENVIRONMENTS
                 if spec.supports(registry.get("environments", env).build("train")[0])]
    assert supported, f"planner {name!r} supports no registered environment"
    env, params = registry.get("environments", supported[0]).build("train")
    episodes = rollout_expert(spec.make(env), env, params, jax.random.key(0), 2, 8)
    probs = np.asarray(episodes.action_probs)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def _offswitch():
    return registry.get("environments", "offswitch").build("train")


@pytest.mark.parametrize("name", _names("imitators"))
def test_imitator_contract(name):
    env, params = _offswitch()
    shape = tuple(env.observation_space(params).shape)
    imitator = registry.get("imitators", name)(shape, env.num_actions, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(imitator)
    logits, carry, activations = imitator_step(graphdef, state, jnp.zeros(shape),
                                               imitator.initial_carry(), jnp.float32(0.5))
    assert logits.shape == (env.num_actions,)
    assert jax.tree.structure(carry) == jax.tree.structure(imitator.initial_carry())
    assert activations, "a white-box view reads the activations the imitator sows"


@pytest.mark.parametrize("name", _names("discriminators"))
def test_discriminator_contract_and_causality(name):
    cls = registry.get("discriminators", name)
    protocol._check_discriminator(name, cls, {})
    model = cls(3, rngs=nnx.Rngs(0))
    features = jax.random.normal(jax.random.key(0), (6, 3))
    mask = jnp.ones(6, bool)
    changed = features.at[4:].set(10.0)
    # A plan is flagged before it is carried out: step t's logit reads steps <= t only.
    np.testing.assert_allclose(model(features, mask)[:4], model(changed, mask)[:4], atol=1e-5)


@pytest.mark.parametrize("name", _names("detectors"))
def test_detector_contract(name):
    spec = registry.get("detectors", name)
    env, params = _offswitch()
    shape = tuple(env.observation_space(params).shape)
    make_model = lambda key: registry.get("imitators", "egocentric")(  # noqa: E731
        shape, env.num_actions, rngs=nnx.Rngs(key))
    demonstrator = registry.get("planners", "demonstrator").make(env)
    trusted = rollout_expert(demonstrator, env, params, jax.random.key(0), 16, 24)
    trusted = trusted.replace(activations=teacher_forced(make_model(jax.random.key(1)),
                                                         trusted)[1])
    if spec.privileged:  # as a suite gives it: the demonstrator's own distribution
        trusted = trusted.replace(reference_probs=trusted.action_probs)
    context = DetectorContext(num_actions=env.num_actions, observation_shape=shape,
                              make_model=make_model)
    detector = spec.build(context).fit(trusted)
    scores = np.asarray(detector.score(trusted))
    assert scores.shape == trusted.actions.shape
    assert np.all(np.isfinite(scores[np.asarray(trusted.mask)]))


@pytest.mark.parametrize("name", _names("sweeps"))
def test_sweep_contract(name):
    sweep = registry.get("sweeps", name)
    assert sweep.name == name
    for setting in ("quick", "paper"):
        suite = registry.get("suites", sweep.suite_for(setting))
        for value in sweep.values_for(setting):  # every point's suite is a valid suite
            changed = sweep.apply(suite, value)
            assert isinstance(changed, protocol.Suite)


@pytest.mark.parametrize("name", _names("organisms"))
def test_organism_contract(name):
    organism = registry.get("organisms", name)
    assert organism.kind in protocol.KINDS
    assert any(organism.supports(env) for env in ENVIRONMENTS)
    assert all(isinstance(pair, tuple) and len(pair) == 2 for pair in organism.audit_settings)
    assert callable(organism.builder)


@pytest.mark.parametrize("name", _names("suites"))
def test_suite_contract(name):
    suite = registry.get("suites", name)
    assert suite.name == name
    for env in suite.envs:
        registry.get("environments", env)
    organisms = [registry.get("organisms", o) for o in suite.organisms]
    for env in suite.envs:  # every environment audits at least one organism besides honest
        assert any(o.supports(env) for o in organisms if o.name != "honest"), env
    assert dataclasses.replace(suite) == suite
