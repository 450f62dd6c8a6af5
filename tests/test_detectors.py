"""Detectors: running/aggregate scores, the demonstrations-only baselines and the
discriminator detector (post-hoc and co-trained), on small synthetic trajectories
whose ground truth is known by construction."""

from __future__ import annotations

import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import audit.detectors
from audit.bc import BCConfig
from audit.detectors import (
    AGGREGATES,
    PROTOCOLS,
    Detector,
    aggregate_scores,
    running_scores,
)
from audit.detectors.baselines import (
    ActionSurpriseDetector,
    LinearProbeDetector,
    MahalanobisDetector,
    NoiseConsistencyDetector,
    NullDetector,
    RandomDirectionDetector,
)
from audit.detectors.discriminator import DiscriminatorDetector
from audit.discriminator import DiscriminatorConfig, score_episodes
from audit.gan import GANModules
from audit.metrics import auroc
from audit.trajectories import Trajectories
from audit.views import RunningNorm, view_features, view_mask
from models.discriminators import StepDiscriminator
from models.imitators import MLPImitator

NUM_ACTIONS = 3


def make_trajectories(actions, *, observations=None, activations=None, mask=None,
                      action_probs=None, num_actions: int = NUM_ACTIONS, seed: int = 0
                      ) -> Trajectories:
    """Synthetic trajectories around ``actions [B, T]``; unspecified fields are filler."""
    actions = np.asarray(actions, np.int32)
    batch, steps = actions.shape
    rng = np.random.default_rng(seed)
    if observations is None:
        observations = rng.normal(size=(batch, steps, 4)).astype(np.float32)
    if mask is None:
        mask = np.ones((batch, steps), bool)
    if action_probs is None:
        action_probs = np.eye(num_actions, dtype=np.float32)[actions]
    mask = np.asarray(mask, bool)
    dones = np.zeros((batch, steps), bool)
    lengths = mask.sum(1)
    dones[np.arange(batch)[lengths > 0], lengths[lengths > 0] - 1] = True
    return Trajectories(
        observations=jnp.asarray(observations, jnp.float32),
        actions=jnp.asarray(actions),
        rewards=jnp.zeros((batch, steps), jnp.float32),
        dones=jnp.asarray(dones),
        mask=jnp.asarray(mask),
        events=jnp.zeros((batch, steps), jnp.int32),
        noise=jnp.asarray(rng.random((batch, steps)), jnp.float32),
        action_probs=jnp.asarray(action_probs, jnp.float32),
        activations={k: jnp.asarray(v, jnp.float32) for k, v in (activations or {}).items()},
    )


def episode_scores(detector, trajectories, aggregate="mean") -> np.ndarray:
    step = detector.score(trajectories)
    assert step.shape == trajectories.actions.shape
    return aggregate_scores(step, trajectories.mask, aggregate)


# --------------------------------------------------------------------------------------
# running_scores / aggregate_scores
# --------------------------------------------------------------------------------------

HAND_SCORES = [[1.0, 3.0, 2.0, 0.0],
               [4.0, 2.0, -1.0, 7.0],
               [5.0, 6.0, 7.0, 8.0]]
HAND_MASK = [[True, True, False, True],
             [False, True, True, False],
             [False, False, False, False]]
NEG = -math.inf
HAND_RUNNING = {
    "max": [[1, 3, 3, 3], [NEG, 2, 2, 2], [NEG] * 4],
    "mean": [[1, 2, 2, 4 / 3], [NEG, 2, 0.5, 0.5], [NEG] * 4],
    "sum": [[1, 4, 4, 4], [NEG, 2, 1, 1], [NEG] * 4],
    "last": [[1, 3, 3, 0], [NEG, 2, -1, -1], [NEG] * 4],
}


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_running_scores_hand_computed(aggregate):
    running = running_scores(HAND_SCORES, HAND_MASK, aggregate)
    np.testing.assert_allclose(running, HAND_RUNNING[aggregate])
    final = aggregate_scores(HAND_SCORES, HAND_MASK, aggregate)
    np.testing.assert_allclose(final, np.asarray(HAND_RUNNING[aggregate])[:, -1])
    # An episode without a valid step has no score: -inf, never a padded value.
    assert final[2] == -math.inf


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_masked_steps_do_not_change_scores(aggregate):
    scores = np.asarray(HAND_SCORES)
    mask = np.asarray(HAND_MASK)
    changed = np.where(mask, scores, 1e6)  # huge values in every padding step
    np.testing.assert_array_equal(running_scores(changed, mask, aggregate),
                                  running_scores(scores, mask, aggregate))


def test_running_scores_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"must both be \[B, T\]; got \(1, 2\) and \(1, 1\)"):
        running_scores([[1.0, 2.0]], [[True]])
    with pytest.raises(ValueError, match=r"must both be \[B, T\]; got \(2,\)"):
        aggregate_scores([1.0, 2.0], [True, True])
    with pytest.raises(ValueError, match="unknown aggregate 'median'; choose from: max, mean, "
                                         "sum, last"):
        aggregate_scores([[1.0]], [[True]], "median")


def test_docstring_examples_hold():
    result = doctest.testmod(audit.detectors)
    assert result.attempted >= 2 and result.failed == 0


def _loop_aggregate(scores, mask, aggregate):
    out = []
    for row, valid in zip(scores, mask, strict=True):
        values = [float(s) for s, v in zip(row, valid, strict=True) if v]
        if not values:
            out.append(-math.inf)
        elif aggregate == "max":
            out.append(max(values))
        elif aggregate == "mean":
            out.append(sum(values) / len(values))
        elif aggregate == "sum":
            out.append(sum(values))
        else:
            out.append(values[-1])
    return out


@settings(max_examples=60, deadline=None)
@given(data=st.data(), aggregate=st.sampled_from(AGGREGATES))
def test_aggregate_scores_matches_a_python_loop(data, aggregate):
    shape = data.draw(st.tuples(st.integers(1, 5), st.integers(1, 7)))
    scores = data.draw(hnp.arrays(np.float64, shape,
                                  elements=st.floats(-1e3, 1e3, allow_nan=False)))
    mask = data.draw(hnp.arrays(bool, shape))
    got = aggregate_scores(scores, mask, aggregate)
    expected = _loop_aggregate(scores, mask, aggregate)
    assert got.shape == (shape[0],)
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, rel=1e-9, abs=1e-9)


# --------------------------------------------------------------------------------------
# Mahalanobis
# --------------------------------------------------------------------------------------

def _covariance():
    """A non-trivial (correlated, anisotropic) covariance and its eigen-decomposition."""
    rotation, _ = np.linalg.qr(np.random.default_rng(42).normal(size=(5, 5)))
    eigenvalues = np.array([9.0, 4.0, 1.0, 0.25, 0.04])
    return rotation @ np.diag(eigenvalues) @ rotation.T, rotation, eigenvalues


def _gaussian_trajectories(seed, batch, steps, shift=0.0, mask=None):
    covariance, _, _ = _covariance()
    rng = np.random.default_rng(seed)
    acts = rng.multivariate_normal(np.zeros(5), covariance, size=(batch, steps)) + shift
    actions = rng.integers(0, NUM_ACTIONS, (batch, steps))
    return make_trajectories(actions, activations={"h": acts}, mask=mask, seed=seed)


def test_mahalanobis_is_chi_square_on_the_fitted_distribution_and_catches_a_thin_shift():
    detector = MahalanobisDetector().fit(_gaussian_trajectories(0, 400, 10))
    assert detector.protocol == "demonstrations-only"
    mask = np.ones((400, 10), bool)
    mask[:, 7:] = False
    held_out = _gaussian_trajectories(1, 400, 10, mask=mask)
    step = detector.score(held_out)
    assert step.shape == (400, 10)
    # E[(x - mu)' Sigma^-1 (x - mu)] = dimension for x ~ N(mu, Sigma); the mean of 2800
    # chi-square(5) draws has a standard deviation of 0.06 (the ridge takes off ~0.07).
    assert np.mean(step[mask]) == pytest.approx(5.0, abs=0.3)
    # Identity covariance (Euclidean distance) would give trace(Sigma) = 14.3 instead.

    # A shift along the thinnest direction (std 0.2) by 1: small in Euclidean terms
    # next to the widest direction's std of 3, but 5 standard deviations where it counts.
    _, rotation, _ = _covariance()
    shifted = _gaussian_trajectories(2, 200, 10, shift=rotation[:, -1], mask=mask[:200])
    negatives = _gaussian_trajectories(3, 200, 10, mask=mask[:200])
    assert auroc(episode_scores(detector, shifted),
                 episode_scores(detector, negatives)) >= 0.95
    # The same shift along the widest direction is (rightly) nothing unusual.
    wide = _gaussian_trajectories(2, 200, 10, shift=rotation[:, 0], mask=mask[:200])
    assert auroc(episode_scores(detector, wide), episode_scores(detector, negatives)) < 0.65


def test_mahalanobis_score_is_the_quadratic_form_and_equal_steps_score_equally():
    detector = MahalanobisDetector().fit(_gaussian_trajectories(0, 100, 10))
    held_out = _gaussian_trajectories(1, 50, 10)
    step = detector.score(held_out)
    features = np.asarray(held_out.activations["h"], np.float64)
    for episode, t in ((0, 0), (17, 4), (49, 9)):
        centred = features[episode, t] - detector.mean
        assert step[episode, t] == pytest.approx(centred @ detector.precision @ centred,
                                                  rel=1e-12)
    # A step repeated elsewhere in the batch gets the very same score (ties stay ties).
    copied = np.array(held_out.activations["h"])
    copied[33, 6] = copied[2, 1]
    again = detector.score(held_out.replace(activations={"h": copied}))
    assert again[33, 6] == again[2, 1] == step[2, 1]


def test_mahalanobis_reads_only_activations_by_default():
    trusted = _gaussian_trajectories(0, 50, 6)
    detector = MahalanobisDetector().fit(trusted)
    other_observations = trusted.replace(observations=trusted.observations + 100.0,
                                         actions=(trusted.actions + 1) % NUM_ACTIONS)
    np.testing.assert_allclose(detector.score(other_observations), detector.score(trusted))
    # With a view it reads that view's features instead.
    by_view = MahalanobisDetector(view="transitions", num_actions=NUM_ACTIONS).fit(trusted)
    assert by_view.score(other_observations).mean() > 100 * by_view.score(trusted).mean()


def test_mahalanobis_errors():
    trusted = _gaussian_trajectories(0, 20, 4)
    bare = trusted.replace(activations={})
    with pytest.raises(ValueError, match="the trajectories have: none"):
        MahalanobisDetector().fit(bare)
    with pytest.raises(ValueError, match=r"\['missing'\]; the trajectories have: h"):
        MahalanobisDetector(activation_names=["missing"]).fit(trusted)
    with pytest.raises(RuntimeError, match="before fit"):
        MahalanobisDetector().score(trusted)
    fitted = MahalanobisDetector().fit(trusted)
    with pytest.raises(ValueError, match="the trajectories have: none"):
        fitted.score(bare)
    with pytest.raises(ValueError, match="ridge must be > 0"):
        MahalanobisDetector(ridge=0.0)


# --------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------

def _encoding_trajectories(seed, batch=150, steps=8):
    """Activations encode the demonstrator's action linearly: one-hot + noise (+ junk dims)."""
    rng = np.random.default_rng(seed)
    actions = rng.integers(0, NUM_ACTIONS, (batch, steps))
    encoded = 2.0 * np.eye(NUM_ACTIONS)[actions] + rng.normal(0, 0.3, (batch, steps, 3))
    junk = rng.normal(size=(batch, steps, 2))
    return make_trajectories(actions, activations={"h": np.concatenate([encoded, junk], -1)},
                             seed=seed)


def test_linear_probe_flags_actions_its_encoding_disagrees_with():
    detector = LinearProbeDetector(NUM_ACTIONS, steps=300).fit(_encoding_trajectories(0))
    assert detector.protocol == "demonstrations-only"
    agree = _encoding_trajectories(1)
    swapped_source = _encoding_trajectories(2)
    swapped = swapped_source.replace(actions=(swapped_source.actions + 1) % NUM_ACTIONS)
    agree_scores = episode_scores(detector, agree)
    swapped_scores = episode_scores(detector, swapped)
    assert agree_scores.mean() < 0.5 < swapped_scores.mean()  # NLL: certain vs wrong
    assert auroc(swapped_scores, agree_scores) >= 0.95
    with pytest.raises(RuntimeError, match="before fit"):
        LinearProbeDetector(NUM_ACTIONS).score(agree)


# --------------------------------------------------------------------------------------
# Random direction (a control)
# --------------------------------------------------------------------------------------

def _isotropic(seed, batch, steps=5):
    rng = np.random.default_rng(seed)
    return make_trajectories(rng.integers(0, NUM_ACTIONS, (batch, steps)),
                             activations={"h": rng.normal(size=(batch, steps, 8))}, seed=seed)


def test_random_direction_is_at_chance_and_deterministic_per_seed():
    trusted = _isotropic(0, 100)
    detector = RandomDirectionDetector(seed=3).fit(trusted)
    assert detector.protocol == "demonstrations-only"
    first, second = _isotropic(1, 500), _isotropic(2, 500)
    value = auroc(episode_scores(detector, first, "max"),
                  episode_scores(detector, second, "max"))
    assert abs(value - 0.5) <= 0.1
    again = RandomDirectionDetector(seed=3).fit(trusted)
    np.testing.assert_array_equal(again.score(first), detector.score(first))
    other = RandomDirectionDetector(seed=4).fit(trusted)
    assert not np.allclose(other.score(first), detector.score(first))
    with pytest.raises(RuntimeError, match="before fit"):
        RandomDirectionDetector().score(first)


def test_the_null_detector_reads_nothing_and_repeats_per_seed_and_call():
    shifted = _isotropic(1, 300)
    shifted = shifted.replace(activations={"h": shifted.activations["h"] + 5.0})
    detector = NullDetector(seed=2).fit(_isotropic(0, 10))
    first, second = detector.score(_isotropic(1, 300)), detector.score(shifted)
    assert first.shape == (300, 5) and 0.0 <= first.min() and first.max() < 1.0
    assert abs(auroc(first.max(1), second.max(1)) - 0.5) <= 0.1  # the shift is unseen
    again = NullDetector(seed=2).fit(_isotropic(0, 10))
    np.testing.assert_array_equal(again.score(shifted), first)  # same seed, data and call
    assert not np.allclose(first, second)  # fresh numbers every call
    # Another model (other fitting data): independent draws at the same seed.
    other = NullDetector(seed=2).fit(_isotropic(5, 10))
    assert not np.allclose(other.score(shifted), first)
    with pytest.raises(RuntimeError, match="before fit"):
        NullDetector().score(shifted)


# --------------------------------------------------------------------------------------
# Action surprise under a behaviour-cloned model
# --------------------------------------------------------------------------------------

def _rule_trajectories(seed, batch, steps=6, follow=True):
    """Observations ``(4,)``; the action is argmax of the first three entries (or random)."""
    rng = np.random.default_rng(seed)
    observations = rng.normal(size=(batch, steps, 4)).astype(np.float32)
    rule = observations[..., :NUM_ACTIONS].argmax(-1)
    actions = rule if follow else rng.integers(0, NUM_ACTIONS, (batch, steps))
    return make_trajectories(actions, observations=observations, seed=seed)


def test_action_surprise_flags_actions_a_cloned_demonstrator_would_not_take():
    def make_imitator(key):
        return MLPImitator((4,), NUM_ACTIONS, (32,), rngs=nnx.Rngs(key))

    detector = ActionSurpriseDetector(
        make_imitator, BCConfig(updates=300, batch_episodes=32, learning_rate=1e-2), seed=0)
    assert detector.protocol == "demonstrations-only"
    with pytest.raises(RuntimeError, match="before fit"):
        detector.score(_rule_trajectories(1, 4))
    detector.fit(_rule_trajectories(0, 256))
    following = episode_scores(detector, _rule_trajectories(1, 100))
    random = episode_scores(detector, _rule_trajectories(2, 100, follow=False))
    assert following.mean() < random.mean()
    assert auroc(random, following) >= 0.95


# --------------------------------------------------------------------------------------
# Discriminator detector: post hoc
# --------------------------------------------------------------------------------------

def _policy_trajectories(seed, probs, batch, steps=10):
    rng = np.random.default_rng(seed)
    actions = rng.choice(NUM_ACTIONS, size=(batch, steps), p=probs)
    return make_trajectories(actions, action_probs=np.broadcast_to(
        np.asarray(probs, np.float32), (batch, steps, NUM_ACTIONS)), seed=seed)


DEMONSTRATOR = (0.8, 0.1, 0.1)
IMITATOR = (0.1, 0.1, 0.8)


def _make_step_discriminator(key, size):
    return StepDiscriminator(size, (16,), rngs=nnx.Rngs(key))


def test_post_hoc_discriminator_separates_two_policies_on_held_out_episodes():
    detector = DiscriminatorDetector(
        "actions", NUM_ACTIONS, _make_step_discriminator,
        DiscriminatorConfig(updates=150, batch_episodes=32, learning_rate=3e-3))
    with pytest.raises(RuntimeError, match="before fit"):
        detector.score(_policy_trajectories(0, DEMONSTRATOR, 2))
    with pytest.raises(ValueError, match="needs untrusted episodes"):
        detector.fit(_policy_trajectories(0, DEMONSTRATOR, 2))
    with pytest.raises(ValueError, match="needs make_discriminator"):
        DiscriminatorDetector("actions", NUM_ACTIONS).fit(
            _policy_trajectories(0, DEMONSTRATOR, 2), _policy_trajectories(1, IMITATOR, 2))
    detector.fit(_policy_trajectories(0, DEMONSTRATOR, 128),
                 _policy_trajectories(1, IMITATOR, 128))
    assert detector.protocol == "post-hoc"
    assert isinstance(detector, Detector) and detector.protocol in PROTOCOLS
    imitator = episode_scores(detector, _policy_trajectories(2, IMITATOR, 100))
    demonstrator = episode_scores(detector, _policy_trajectories(3, DEMONSTRATOR, 100))
    assert auroc(imitator, demonstrator) >= 0.95


def test_discriminator_detector_rejects_unknown_views():
    with pytest.raises(ValueError, match="unknown view 'pixels'"):
        DiscriminatorDetector("pixels", NUM_ACTIONS)


# --------------------------------------------------------------------------------------
# Discriminator detector: co-trained (from a GAN run's modules)
# --------------------------------------------------------------------------------------

def _fake_gan(trajectories):
    """A GAN run's modules and state, built by hand: one StepDiscriminator over the
    richest view ("transitions"), masked down to "actions" for the other view."""
    views = ("actions", "transitions")
    features = view_features(trajectories, "transitions", NUM_ACTIONS)
    masks = np.stack([view_mask(v, "transitions", trajectories, NUM_ACTIONS) for v in views])
    graphdef, params = nnx.split(StepDiscriminator(features.shape[-1], (16,),
                                                   rngs=nnx.Rngs(0)))
    norm = RunningNorm.create(features.shape[-1]).update(features, trajectories.mask)
    modules = GANModules(actor=None, critic=None, discriminator=graphdef, views=views,
                         features_view="transitions", view_masks=masks)
    return modules, params, norm, masks


def test_from_gan_reads_only_its_views_features():
    trajectories = _policy_trajectories(0, DEMONSTRATOR, 16, steps=6)
    modules, params, norm, masks = _fake_gan(trajectories)
    actions = DiscriminatorDetector.from_gan(modules, params, norm, "actions", NUM_ACTIONS)
    transitions = DiscriminatorDetector.from_gan(modules, params, norm, "transitions",
                                                 NUM_ACTIONS)
    for detector in (actions, transitions):
        assert detector.protocol == "co-trained"
        assert isinstance(detector, Detector)

    # The scores are the run's own computation: normalised features times the view mask.
    features = view_features(trajectories, "transitions", NUM_ACTIONS)
    expected = score_episodes(modules.discriminator, params,
                              norm.normalize(features) * masks[1], trajectories.mask)
    np.testing.assert_allclose(transitions.score(trajectories), expected, rtol=1e-5, atol=1e-5)

    moved = trajectories.replace(
        observations=trajectories.observations
        + jax.random.normal(jax.random.key(1), trajectories.observations.shape) * 3.0)
    np.testing.assert_array_equal(actions.score(moved), actions.score(trajectories))
    assert not np.allclose(transitions.score(moved), transitions.score(trajectories))
    # ...while the actions detector still reads the actions.
    other_actions = trajectories.replace(actions=(trajectories.actions + 1) % NUM_ACTIONS)
    assert not np.allclose(actions.score(other_actions), actions.score(trajectories))

    with pytest.raises(ValueError, match="'activations' was not trained in this run; it has: "
                                         "actions, transitions"):
        DiscriminatorDetector.from_gan(modules, params, norm, "activations", NUM_ACTIONS)
    with pytest.raises(ValueError, match="'pixels' was not trained"):
        DiscriminatorDetector.from_gan(modules, params, norm, "pixels", NUM_ACTIONS)


def test_noise_consistency_is_zero_for_an_honest_sampler_and_flags_a_pseudorandom_one():
    from audit.rollout import inverse_cdf_sample

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 10, NUM_ACTIONS)).astype(np.float32)
    noise = rng.random((200, 10)).astype(np.float32)
    honest = np.asarray(inverse_cdf_sample(jnp.asarray(logits), jnp.asarray(noise)))
    # The same distribution, drawn with other uniforms: the action no longer follows the noise.
    other = np.asarray(inverse_cdf_sample(jnp.asarray(logits),
                                          jnp.asarray(rng.random((200, 10)), jnp.float32)))
    detector = NoiseConsistencyDetector()
    trajectories = [make_trajectories(actions, activations={"logits": logits})
                    .replace(noise=jnp.asarray(noise)) for actions in (honest, other)]
    detector.fit(trajectories[0])
    honest_scores, other_scores = (detector.score(t) for t in trajectories)
    np.testing.assert_allclose(honest_scores, 0.0, atol=1e-6)
    assert np.mean(other_scores > 0) > 0.3
    assert np.all(other_scores[other == honest] < 1e-6)  # same action: consistent
    # By hand: probabilities (0.25, 0.75), noise 0.1: action 1's interval [0.25, 1) is 0.15 away.
    one = make_trajectories([[1]], activations={"logits": np.log([[[0.25, 0.75]]])},
                            num_actions=2).replace(noise=jnp.array([[0.1]]))
    np.testing.assert_allclose(NoiseConsistencyDetector().score(one), [[0.15]], atol=1e-6)
    with pytest.raises(ValueError, match="logits"):
        NoiseConsistencyDetector().fit(make_trajectories([[0]]))


def test_oracle_kl_is_the_hand_computed_kl_to_the_reference_and_zero_for_the_reference():
    from audit.detectors.baselines import ORACLE_KL, OracleKLDetector

    reference = np.array([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]], np.float32)
    model = np.array([[[0.25, 0.25, 0.5], [0.2, 0.3, 0.5]]], np.float32)
    trajectories = make_trajectories([[0, 1]], activations={"logits": np.log(model)}).replace(
        reference_probs=jnp.asarray(reference))
    detector = OracleKLDetector(floor=1e-8).fit(trajectories)
    assert detector.protocol == "privileged" and ORACLE_KL.privileged
    scores = detector.score(trajectories)
    # Step 0: KL = 2 * 0.25 log(0.25 / 0.5) + 0.5 log(0.5 / 1e-8), the floored zero.
    expected = 2 * 0.25 * math.log(0.5) + 0.5 * math.log(0.5 / 1e-8)
    np.testing.assert_allclose(scores[0], [expected, 0.0], rtol=1e-5, atol=1e-6)
    # A model that is the reference scores 0 everywhere.
    same = trajectories.replace(activations={"logits": jnp.log(jnp.maximum(reference, 1e-30))})
    np.testing.assert_allclose(detector.score(same), 0.0, atol=1e-5)


def test_oracle_kl_says_what_it_needs():
    from audit.detectors.baselines import OracleKLDetector

    without_reference = make_trajectories([[0, 1]], activations={"logits": np.zeros((1, 2, 3))})
    with pytest.raises(ValueError, match="reference_probs.*reference=<the demonstrator>"):
        OracleKLDetector().fit(without_reference)
    without_logits = make_trajectories([[0, 1]]).replace(
        reference_probs=jnp.full((1, 2, 3), 1 / 3))
    with pytest.raises(ValueError, match="logits"):
        OracleKLDetector().fit(without_logits)
    with pytest.raises(ValueError, match="floor"):
        OracleKLDetector(floor=0.0)
