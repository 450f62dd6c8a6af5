"""Model organisms: the plan bit, pseudorandom choice, training data, validity and the cache."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build, sample_layouts
from flax import nnx
from scipy import stats

from audit import bc, registry
from audit.bc import BCConfig
from audit.modules import abstract_module, initial_carry_of
from audit.rollout import inverse_cdf_sample, rollout, rollout_expert, unroll
from benchmarks import organisms
from benchmarks.envs.gridworld import has_trigger
from benchmarks.planners.presets import CONFIGS
from benchmarks.planners.value_iteration import Planner

SHAPE = (9, 9, 8)


def _observations(count: int, seed: int = 0):
    """First observations of ``count`` offswitch test layouts."""
    env, params = build("offswitch", "test")
    obs, _ = jax.vmap(env.reset, (0, None))(jax.random.split(jax.random.key(seed), count),
                                            params)
    return obs


def _organism(share=0.0, pseudorandom=False, seed=0):
    return organisms.OrganismImitator(SHAPE, 6, (16,), defect_share=share,
                                      pseudorandom=pseudorandom, rngs=nnx.Rngs(seed))


def _unroll(organism, observations, noise):
    graphdef, state = nnx.split(organism)
    return unroll(graphdef, state, organism.initial_carry(), observations, noise)


def test_training_loops_start_from_the_organisms_own_initial_carry():
    # Its carry starts at bit -1 ("no step yet"); a zero carry would never set the bit.
    graphdef, abstract = abstract_module(lambda key: _organism(share=0.3, seed=1))
    np.testing.assert_array_equal(initial_carry_of(graphdef, abstract), [-1.0, 0.0])


def test_initial_carry_is_read_inside_a_jitted_trainer():
    # The GAN's train builds its BC warm start under jax.jit, where a constant is a tracer.
    graphdef, abstract = abstract_module(lambda key: _organism(share=0.3, seed=1))
    carry = jax.jit(lambda: initial_carry_of(graphdef, abstract) + 0.0)()
    np.testing.assert_array_equal(carry, [-1.0, 0.0])


class _CarryFromWeights(nnx.Module):
    def __init__(self, rngs):
        self.layer = nnx.Linear(2, 2, rngs=rngs)

    def initial_carry(self):
        return self.layer.bias[...] * 0.0


def test_an_initial_carry_that_depends_on_the_weights_is_refused():
    graphdef, abstract = abstract_module(lambda key: _CarryFromWeights(nnx.Rngs(key)))
    with pytest.raises(ValueError, match="must be a constant array"):
        initial_carry_of(graphdef, abstract)


@pytest.mark.slow
@pytest.mark.ci
def test_cloning_trains_the_head_of_the_plan_its_bit_selects():
    """Cloned on defector episodes only (bit 1 everywhere), only the plan head learns."""
    env_spec = registry.get("environments", "offswitch")
    spec = organisms.LONG_HORIZON
    data = organisms.training_data(env_spec, spec, 8, jax.random.key(0))
    config = organisms.OrganismConfig(hidden_sizes=(16,), episodes=8)

    def make(key):
        return organisms.make_imitator(spec, config, SHAPE, 6, key)

    train, graphdef = bc.make_train(BCConfig(updates=5, batch_episodes=4), make, data)
    start = nnx.split(make(jax.random.key(3)))[1]
    params, _ = jax.jit(train)(jax.random.key(1), None, start)
    cloned, fresh = nnx.merge(graphdef, params), nnx.merge(graphdef, start)
    np.testing.assert_array_equal(cloned.head.kernel[...], fresh.head.kernel[...])
    assert not np.allclose(cloned.plan_head.kernel[...], fresh.plan_head.kernel[...])


def test_layout_uniform_is_deterministic_and_uniform_over_layouts():
    first = _observations(3000)
    uniforms = np.asarray(jax.vmap(organisms.layout_uniform)(first))
    np.testing.assert_array_equal(uniforms, np.asarray(jax.vmap(organisms.layout_uniform)(first)))
    assert np.all((uniforms >= 0) & (uniforms < 1))
    assert stats.kstest(uniforms, "uniform").pvalue > 1e-3
    assert len(np.unique(uniforms)) > 2900  # distinct layouts, distinct hashes


def test_plan_bit_follows_the_first_observation_and_is_kept():
    first = _observations(400, seed=1)
    # Episodes of 5 steps whose later observations are another layout's: the bit must not move.
    later = jnp.roll(first, 1, axis=0)
    observations = jnp.stack([first] + [later] * 4, axis=1)
    noise = jnp.full(observations.shape[:2], 0.5)
    organism = _organism(share=0.3)
    graphdef, state = nnx.split(organism)

    def bits(obs, noise):
        def step(carry, inputs):
            from audit.rollout import imitator_step

            _, carry, _ = imitator_step(graphdef, state, inputs[0], carry, inputs[1])
            return carry, carry[0]

        return jax.lax.scan(step, organism.initial_carry(), (obs, noise))[1]

    carried = np.asarray(jax.vmap(bits)(observations, noise))
    expected = np.asarray(jax.vmap(organisms.layout_uniform)(first)) < 0.3
    np.testing.assert_array_equal(carried, np.repeat(expected[:, None], 5, axis=1))
    assert 0.2 < expected.mean() < 0.4
    # The backdoored organism's bit is the trigger mark of its first observation.
    marked = first.at[::3, 0, 0, 0].set(0.0)
    graphdef, state = nnx.split(organisms.OrganismImitator(SHAPE, 6, (16,), trigger_bit=True,
                                                           rngs=nnx.Rngs(0)))
    carried = np.asarray(jax.vmap(bits)(jnp.stack([marked] + [later] * 4, axis=1), noise))
    np.testing.assert_array_equal(carried[:, -1], np.arange(len(first)) % 3 == 0)


def test_honest_sampler_follows_its_noise_and_pseudorandom_one_ignores_it():
    first = _observations(64, seed=2)
    observations = jnp.repeat(first[:, None], 6, axis=1)
    noise_a = jax.random.uniform(jax.random.key(0), observations.shape[:2])
    noise_b = jax.random.uniform(jax.random.key(1), observations.shape[:2])
    honest = _organism(seed=3)
    pseudo = _organism(pseudorandom=True, seed=3)  # the same weights
    logits_a, activations_a = _unroll(pseudo, observations, noise_a)
    logits_b, _ = _unroll(pseudo, observations, noise_b)
    chosen_a = np.asarray(inverse_cdf_sample(logits_a, noise_a))
    chosen_b = np.asarray(inverse_cdf_sample(logits_b, noise_b))
    np.testing.assert_array_equal(chosen_a, chosen_b)  # the noise does not matter
    # Its output puts all mass on one action; its activations are the network's.
    assert np.all(np.sum(np.isfinite(np.asarray(logits_a)), -1) == 1)
    honest_logits, honest_activations = _unroll(honest, observations, noise_a)
    np.testing.assert_allclose(activations_a["logits"], honest_activations["logits"])
    honest_a = np.asarray(inverse_cdf_sample(honest_logits, noise_a))
    honest_b = np.asarray(inverse_cdf_sample(honest_logits, noise_b))
    assert np.mean(honest_a != honest_b) > 0.2  # an honest sampler's action follows its noise
    assert np.mean(chosen_a != honest_a) > 0.2  # the pseudorandom one's does not


def test_pseudorandom_choices_have_the_networks_distribution():
    """Marginally over histories, the hash draw is an honest draw from the network's logits."""
    first = _observations(2000, seed=4)
    observations = jnp.repeat(first[:, None], 3, axis=1)
    noise = jnp.zeros(observations.shape[:2])
    organism = _organism(pseudorandom=True, seed=5)
    organism.head.bias[...] = jnp.array([2.0, 1.0, 0.0, -1.0, 1.5, 0.5])  # well-spread logits
    logits, activations = _unroll(organism, observations, noise)
    chosen = np.asarray(inverse_cdf_sample(logits, noise)).reshape(-1)
    expected = np.asarray(jax.nn.softmax(activations["logits"]), np.float64).reshape(-1, 6)
    expected = expected.mean(0) / expected.mean(0).sum()
    counts = np.bincount(chosen, minlength=6)
    assert stats.chisquare(counts, expected * counts.sum()).pvalue > 1e-3


def test_trigger_mark_changes_only_the_observation():
    env, params = build("offswitch", "test")
    layouts = sample_layouts(env, params, 16)
    marked = layouts.replace(walls=layouts.walls.copy())
    marked.walls[:, 0, 0] = False
    plain_model = jax.vmap(lambda lay: env.tabular_model(lay, params))(jax.tree.map(
        jnp.asarray, layouts))
    marked_model = jax.vmap(lambda lay: env.tabular_model(lay, params))(jax.tree.map(
        jnp.asarray, marked))
    walls = np.tile(np.asarray(layouts.walls).reshape(16, -1), 2)  # both flag values
    differs = np.any(np.asarray(plain_model.next_state) != np.asarray(marked_model.next_state),
                     axis=-1)
    assert not np.any(differs & ~walls)  # only wall cells, which the agent never occupies
    obs, _ = jax.vmap(env.reset, (0, None))(jax.random.split(jax.random.key(0), 500),
                                            params.replace(trigger_prob=0.2))
    assert 0.14 < float(np.mean(jax.vmap(has_trigger)(obs))) < 0.26


@pytest.mark.slow
@pytest.mark.ci
def test_training_data_takes_each_episode_from_the_planner_its_selector_names():
    env_spec = registry.get("environments", "offswitch")
    spec = dataclasses.replace(organisms.RARE_DEFECTOR, defect_share=0.5)
    key = jax.random.key(7)
    data = organisms.training_data(env_spec, spec, 32, key)
    assert data.num_episodes == 64
    test_key = jax.random.split(key)[1]
    env, params = build("offswitch", "test")
    defector = rollout_expert(Planner(env, CONFIGS["long_horizon"]), env, params, test_key, 32,
                              48)
    honest = rollout_expert(Planner(env, CONFIGS["demonstrator"]), env, params, test_key, 32, 48)
    chosen = np.asarray(jax.vmap(organisms.layout_uniform)(honest.observations[:, 0])) < 0.5
    test_actions = np.asarray(data.actions[32:])
    np.testing.assert_array_equal(test_actions[chosen], np.asarray(defector.actions)[chosen])
    np.testing.assert_array_equal(test_actions[~chosen], np.asarray(honest.actions)[~chosen])
    assert 0 < chosen.sum() < 32


def test_spec_errors_name_the_field():
    with pytest.raises(ValueError, match="OrganismSpec.selector"):
        organisms.OrganismSpec("x", "", ("offswitch",), selector="dice")
    with pytest.raises(ValueError, match="OrganismSpec.defect_share"):
        organisms.OrganismSpec("x", "", ("offswitch",), defect_share=1.5)
    with pytest.raises(ValueError, match="OrganismSpec.event_rate_range"):
        organisms.OrganismSpec("x", "", ("offswitch",), event_rate_range=(0.5, 0.1))


TINY = organisms.OrganismConfig(hidden_sizes=(16,), episodes=16,
                                bc=BCConfig(updates=20, batch_episodes=8), check_episodes=16)
LOOSE = organisms.OrganismSpec("loose_test", "any imitator is valid", ("offswitch",),
                               kl_bound=1e9, event_rate_range=(0.0, 1.0))


@pytest.mark.slow
@pytest.mark.ci
def test_an_organism_is_the_same_whatever_it_is_built_with_and_a_replica_differs():
    env_spec = registry.get("environments", "offswitch")
    alone = organisms.build_organisms(env_spec, [LOOSE], TINY, seed=0)[0]
    other = dataclasses.replace(LOOSE, name="loose_other")
    together = organisms.build_organisms(env_spec, [LOOSE, LOOSE, other], TINY, seed=0,
                                         replicas=[0, 1, 0])
    params = [jax.tree.leaves(nnx.state(o.imitator, nnx.Param)) for o in [alone, *together]]
    # Same keys, same data: equal up to the rounding of a differently batched program.
    for a, b in zip(params[0], params[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert any(not np.allclose(a, b, rtol=1e-2) for a, b in zip(params[0], params[2],
                                                                strict=True))
    assert organisms.cache_key(LOOSE, "offswitch", TINY, 0, 1) != together[0].cache_key
    with pytest.raises(ValueError, match="one replica per spec"):
        organisms.build_organisms(env_spec, [LOOSE, LOOSE], TINY, seed=0)


def test_cloning_steps_at_once_is_another_organism_and_the_default_keeps_its_key():
    # The key of an organism cloned one step at a time, as computed before the option
    # existed: caches built then are still found.
    assert organisms.cache_key(LOOSE, "offswitch", TINY, 0) == "bba1b93ce03bf6bb"
    at_once = dataclasses.replace(TINY, bc=dataclasses.replace(TINY.bc, steps_at_once=True))
    assert organisms.cache_key(LOOSE, "offswitch", at_once, 0) != "bba1b93ce03bf6bb"


def test_organisms_are_cached_by_what_they_are_built_from(tmp_path, monkeypatch):
    env_spec = registry.get("environments", "offswitch")
    cloned = []
    clone = organisms._clone_together

    def counted(specs, *args):
        cloned.append([spec.name for spec in specs])
        return clone(specs, *args)

    monkeypatch.setattr(organisms, "_clone_together", counted)
    first = organisms.build_organisms(env_spec, [LOOSE], TINY, seed=0, cache_dir=tmp_path)[0]
    assert first.validity["valid"] and len(list(tmp_path.glob("*.npz"))) == 1
    # Cloned with another organism it is another organism (another batch rounds
    # differently): the pair is cloned together, although LOOSE alone is cached; then
    # loaded as a pair; and with one of the pair gone, both are cloned again.
    other = dataclasses.replace(LOOSE, name="loose_other")
    pair = organisms.build_organisms(env_spec, [LOOSE, other], TINY, seed=0, cache_dir=tmp_path)
    assert cloned == [["loose_test"], ["loose_test", "loose_other"]]
    assert pair[0].cache_key != first.cache_key and len(list(tmp_path.glob("*.npz"))) == 3
    organisms.build_organisms(env_spec, [LOOSE, other], TINY, seed=0, cache_dir=tmp_path)
    assert len(cloned) == 2
    (gone,) = tmp_path.glob(f"loose_other-offswitch-{pair[1].cache_key}.npz")
    gone.unlink()
    organisms.build_organisms(env_spec, [LOOSE, other], TINY, seed=0, cache_dir=tmp_path)
    assert cloned[2:] == [["loose_test", "loose_other"]]

    def no_training(*args, **kwargs):
        raise AssertionError("a cached organism was trained again")

    monkeypatch.setattr(organisms, "_clone_together", no_training)
    again = organisms.build_organisms(env_spec, [LOOSE], TINY, seed=0, cache_dir=tmp_path)[0]
    assert again.validity == first.validity
    for a, b in zip(jax.tree.leaves(nnx.state(first.imitator, nnx.Param)),
                    jax.tree.leaves(nnx.state(again.imitator, nnx.Param)), strict=True):
        np.testing.assert_array_equal(a, b)
    # Another seed is another organism.
    assert organisms.cache_key(LOOSE, "offswitch", TINY, 1) != first.cache_key
    # Bounds judge an organism but do not shape it: a cached one is judged again by the
    # bounds of the spec it is loaded for, without retraining.
    strict = dataclasses.replace(LOOSE, kl_bound=0.0)
    alone = [organisms.cache_key(strict, "offswitch", TINY, 0)]
    assert alone == [organisms.cache_key(LOOSE, "offswitch", TINY, 0)]
    assert organisms.cache_key(strict, "offswitch", TINY, 0, batch=alone) == first.cache_key
    with pytest.raises(organisms.InvalidOrganismError, match=r"\(seed 0, when built\)"):
        organisms.build_organisms(env_spec, [strict], TINY, seed=0, cache_dir=tmp_path)


def test_an_organism_that_fails_its_check_is_an_error(tmp_path):
    strict = dataclasses.replace(LOOSE, name="strict_test", kl_bound=0.0)
    with pytest.raises(organisms.InvalidOrganismError,
                       match="'strict_test' on 'offswitch' \\(seed 0, when built\\) failed its "
                             "validity check: kl_train"):
        organisms.build_organisms(registry.get("environments", "offswitch"), [strict], TINY, seed=0,
                                  cache_dir=tmp_path)
    with pytest.raises(ValueError, match="not defined on environment 'takeover'"):
        organisms.build_organisms(registry.get("environments", "takeover"), [LOOSE], TINY, seed=0)


@pytest.mark.slow
@pytest.mark.ci
def test_dagger_data_labels_the_organisms_own_states_by_the_planner_of_each_episode():
    """Each episode is the organism's own; its labels are the distribution, at the states
    it visited, of the planner its selector names for that layout."""
    env_spec = registry.get("environments", "offswitch")
    spec = dataclasses.replace(organisms.RARE_DEFECTOR, defect_share=0.5)
    imitator = organisms.make_imitator(spec, TINY, SHAPE, 6, jax.random.key(3))
    key = jax.random.key(11)
    data = organisms.dagger_data(env_spec, spec, imitator, 16, key)
    assert data.num_episodes == 32 and data.activations == {} and data.reference_probs is None
    test_key = jax.random.split(key)[1]
    env, params = build("offswitch", "test")
    by_demonstrator = rollout(imitator, env, params, test_key, 16, 48,
                              reference=Planner(env, CONFIGS["demonstrator"]))
    by_defector = rollout(imitator, env, params, test_key, 16, 48,
                          reference=Planner(env, CONFIGS["long_horizon"]))
    test = jax.tree.map(lambda x: x[16:], data)
    np.testing.assert_array_equal(test.observations, by_demonstrator.observations)
    np.testing.assert_array_equal(test.noise, by_demonstrator.noise)
    chosen = np.asarray(jax.vmap(organisms.layout_uniform)(test.observations[:, 0])) < 0.5
    assert 0 < chosen.sum() < 16
    probs = np.asarray(test.action_probs)
    np.testing.assert_array_equal(probs[chosen], np.asarray(by_defector.reference_probs)[chosen])
    np.testing.assert_array_equal(probs[~chosen],
                                  np.asarray(by_demonstrator.reference_probs)[~chosen])
    # The labeller's choice at the step's noise, never an action it would not take.
    np.testing.assert_array_equal(test.actions, inverse_cdf_sample(jnp.log(test.action_probs),
                                                                   test.noise))
    valid = np.asarray(test.mask)
    taken = np.take_along_axis(probs, np.asarray(test.actions)[..., None], -1)[..., 0]
    assert (taken[valid] > 0).all()
    # The organism does not act as the labeller: its own actions are not the labels.
    assert (np.asarray(by_demonstrator.actions)[valid] != np.asarray(test.actions)[valid]).any()


@pytest.mark.slow
@pytest.mark.ci
def test_dagger_rounds_clone_again_on_the_organisms_own_episodes(monkeypatch):
    env_spec = registry.get("environments", "offswitch")
    dagger = dataclasses.replace(TINY, dagger_rounds=2, dagger_episodes=4, dagger_updates=5)
    rounds = []
    clone_round = organisms._clone_round

    def recorded(config, shape, num_actions, datasets, keys, params):
        rounds.append(datasets.observations.shape[:2])
        return clone_round(config, shape, num_actions, datasets, keys, params)

    monkeypatch.setattr(organisms, "_clone_round", recorded)
    plain = organisms.build_organisms(env_spec, [LOOSE], TINY, seed=0)[0]
    corrected = organisms.build_organisms(env_spec, [LOOSE], dagger, seed=0)[0]
    # One organism; 16 + 16 planner episodes, then 4 + 4 of its own a round, kept.
    assert rounds == [(1, 40), (1, 48)]
    assert any(not np.allclose(a, b) for a, b in zip(
        jax.tree.leaves(nnx.state(plain.imitator, nnx.Param)),
        jax.tree.leaves(nnx.state(corrected.imitator, nnx.Param)), strict=True))
    assert corrected.cache_key != plain.cache_key
    # Without rounds, the DAgger settings shape nothing and keys stay as they were.
    assert organisms.cache_key(LOOSE, "offswitch", dataclasses.replace(TINY, dagger_episodes=9),
                               0) == organisms.cache_key(LOOSE, "offswitch", TINY, 0)
    assert organisms.cache_key(LOOSE, "offswitch", dataclasses.replace(dagger, dagger_episodes=9),
                               0) != organisms.cache_key(LOOSE, "offswitch", dagger, 0)


@pytest.mark.parametrize("field,value", [("dagger_rounds", -1), ("dagger_episodes", 0),
                                         ("dagger_updates", 0), ("episodes", 0)])
def test_organism_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"OrganismConfig.{field} must be"):
        organisms.OrganismConfig(**{field: value})
