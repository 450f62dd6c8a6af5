"""Discriminators separate what differs, and only what their view shows."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from audit.discriminator import (
    DiscriminatorConfig,
    gan_loss,
    make_train,
    score_episodes,
    trajectory_scores,
)
from audit.metrics import auroc
from audit.rollout import rollout_expert, teacher_forced_activations
from audit.views import RunningNorm, view_features
from benchmarks.planners import CONFIGS, Planner
from models.discriminators import (
    DISCRIMINATORS,
    GRUDiscriminator,
    StepDiscriminator,
    make_discriminator,
)
from models.imitators import make_imitator


@settings(max_examples=60, deadline=None)
@given(pos=st.lists(st.integers(0, 5), min_size=1, max_size=30),
       neg=st.lists(st.integers(0, 5), min_size=1, max_size=30))
def test_auroc_matches_scikit_learn_with_ties(pos, neg):
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    expected = roc_auc_score(labels, np.r_[pos, neg]) if 0 < labels.sum() < len(labels) else None
    assert auroc(pos, neg) == pytest.approx(expected)


def test_auroc_hand_case_and_single_class():
    assert auroc([0.9, 0.4], [0.1, 0.4]) == 0.875  # 3 wins + one tie of 4 pairs
    with pytest.raises(ValueError, match="needs both classes; got 0 positive and 2 negative"):
        auroc([], [0.1, 0.2])


@dataclasses.dataclass(frozen=True)
class _UniformRandom:
    """A clearly different known policy: every action equally likely."""

    def plan(self, env_state, env_params):
        return None

    def action_logits(self, plan, observation, env_state):
        return jnp.zeros(6)


def _demos(policy, seed, episodes=512):
    env, params = build("offswitch", "train")
    return rollout_expert(policy, env, params, jax.random.key(seed), episodes, 48)


def _held_out_auroc(view, negatives, positives, name="mlp", updates=300, activation_names=None,
                    aggregate="mean"):
    """Train on the first half of each set, score the second half (trajectory aggregate)."""
    half_n, half_p = negatives.num_episodes // 2, positives.num_episodes // 2
    neg = view_features(negatives, view, 6, activation_names)
    pos = view_features(positives, view, 6, activation_names)
    norm = RunningNorm.create(neg.shape[-1]).update(neg[:half_n], negatives.mask[:half_n])
    neg, pos = norm.normalize(neg), norm.normalize(pos)
    train, graphdef = make_train(
        DiscriminatorConfig(updates=updates),
        lambda k: make_discriminator(name, neg.shape[-1], k),
        neg[:half_n], negatives.mask[:half_n], pos[:half_p], positives.mask[:half_p])
    params, _ = jax.jit(train)(jax.random.key(0))
    score = jax.jit(lambda f, m: score_episodes(graphdef, params, f, m))
    return auroc(trajectory_scores(score(pos[half_p:], positives.mask[half_p:]),
                                   positives.mask[half_p:], aggregate),
                 trajectory_scores(score(neg[half_n:], negatives.mask[half_n:]),
                                   negatives.mask[half_n:], aggregate))


def test_discriminator_separates_two_clearly_different_policies():
    env, _ = build("offswitch", "train")
    demonstrator = _demos(Planner(env, CONFIGS["demonstrator"]), 1)
    random_policy = _demos(_UniformRandom(), 2)
    # (A per-step MLP on the flattened grid memorises the random layouts of its training
    # episodes and generalises poorly to new ones; the action view isolates the policy.)
    assert _held_out_auroc("actions", demonstrator, random_policy) >= 0.99


def test_discriminator_cannot_separate_two_samples_of_one_policy():
    env, _ = build("offswitch", "train")
    planner = Planner(env, CONFIGS["demonstrator"])
    first, second = _demos(planner, 3, 2048), _demos(planner, 4, 2048)
    assert abs(_held_out_auroc("actions", first, second) - 0.5) <= 0.05


def test_activations_view_really_receives_the_activations():
    """Identical observations and actions; only the activations differ between classes."""
    env, _ = build("offswitch", "train")
    demos = _demos(Planner(env, CONFIGS["demonstrator"]), 5)
    activations = teacher_forced_activations(make_imitator("mlp", (9, 9, 8), 6,
                                                           jax.random.key(0)), demos)
    plain = demos.replace(activations=activations)
    shifted = demos.replace(activations={k: v + 0.5 for k, v in activations.items()})
    assert abs(_held_out_auroc("transitions", plain, shifted) - 0.5) < 0.05
    assert _held_out_auroc("activations", plain, shifted,
                           activation_names=["hidden_1"]) >= 0.99
    # The view's last features are the named activations themselves, step by step, and
    # the shift is exactly what separates the classes there.
    plain_features = np.asarray(view_features(plain, "activations", 6, ["hidden_1"]))
    hidden = np.asarray(activations["hidden_1"]).reshape(plain_features.shape[:2] + (-1,))
    np.testing.assert_array_equal(plain_features[..., -hidden.shape[-1]:], hidden)
    shifted_features = np.asarray(view_features(shifted, "activations", 6, ["hidden_1"]))
    shift = np.r_[np.zeros(plain_features.shape[-1] - hidden.shape[-1]),
                  np.full(hidden.shape[-1], 0.5)]
    np.testing.assert_allclose(shifted_features - plain_features,
                               np.broadcast_to(shift, plain_features.shape), atol=1e-5)


@pytest.mark.parametrize("name", ["gru", "attention"])
def test_sequence_discriminators_are_causal(name):
    model = make_discriminator(name, 5, jax.random.key(0))
    features = jax.random.normal(jax.random.key(1), (12, 5))
    mask = jnp.ones(12, bool)
    changed = features.at[7:].add(3.0)
    a, b = model(features, mask), model(changed, mask)
    np.testing.assert_allclose(a[:7], b[:7], atol=1e-5)
    assert not np.allclose(a[7:], b[7:])


def test_views_have_the_documented_features_and_errors():
    env, _ = build("offswitch", "train")
    demos = _demos(Planner(env, CONFIGS["demonstrator"]), 6, episodes=4)
    assert view_features(demos, "actions", 6).shape == (4, 48, 6)
    assert view_features(demos, "transitions", 6).shape == (4, 48, 9 * 9 * 8 + 6)
    with pytest.raises(ValueError, match="unknown view 'pixels'; choose from: actions"):
        view_features(demos, "pixels", 6)
    with pytest.raises(ValueError, match="needs activations.*the trajectories have: none"):
        view_features(demos, "activations", 6)
    with_noise = view_features(demos.replace(activations={"h": jnp.ones((4, 48, 3))}),
                               "activations+noise", 6)
    np.testing.assert_array_equal(with_noise[..., -1], demos.noise)
    assert set(DISCRIMINATORS) == {"mlp", "gru", "attention"}
    with pytest.raises(ValueError, match="unknown discriminator 'cnn'"):
        make_discriminator("cnn", 3, jax.random.key(0))


def test_running_norm_matches_numpy_over_valid_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (6, 10, 4)).astype(np.float32)
    mask = rng.random((6, 10)) < 0.7
    norm = RunningNorm.create(4).update(jnp.asarray(x[:3]), jnp.asarray(mask[:3]))
    norm = norm.update(jnp.asarray(x[3:]), jnp.asarray(mask[3:]))
    valid = x[mask]
    np.testing.assert_allclose(norm.mean, valid.mean(0), rtol=1e-4)
    np.testing.assert_allclose(norm.var, valid.var(0), rtol=1e-3)


def _first_kernel(model):
    """The kernel of the layer that reads the features."""
    return model.hidden[0].kernel if isinstance(model, StepDiscriminator) else model.encoder.kernel


@pytest.mark.parametrize("name", ["mlp", "gru"])
def test_gradient_penalty_sees_only_the_features_a_view_mask_keeps(name):
    """A masked discriminator trains exactly like one built on the kept features alone."""
    build_model = {"mlp": lambda size, key: StepDiscriminator(size, (16,), rngs=nnx.Rngs(key)),
                   "gru": lambda size, key: GRUDiscriminator(size, 16, rngs=nnx.Rngs(key))}[name]
    size, kept = 7, np.array([0, 2, 3])
    keep = np.zeros(size, np.float32)
    keep[kept] = 1
    rng = np.random.default_rng(0)
    demo, own = (jnp.asarray(rng.normal(size=(12, 6, size)), jnp.float32) for _ in range(2))
    demo_mask, own_mask = (jnp.asarray(np.arange(6) < rng.integers(2, 7, (12, 1)))
                           for _ in range(2))
    config = DiscriminatorConfig(updates=25, batch_episodes=8, learning_rate=1e-2,
                                 gradient_penalty=10.0)

    def narrow(key):  # the masked model's initial weights, restricted to the kept features
        wide, model = build_model(size, key), build_model(len(kept), key)
        _first_kernel(wide).set_value(_first_kernel(wide)[...][kept])
        nnx.update(model, nnx.state(wide, nnx.Param))
        return model

    key = jax.random.key(1)
    masked_train, masked_def = make_train(config, lambda k: build_model(size, k), demo, demo_mask,
                                          own, own_mask, keep=keep)
    masked_params, masked_losses = jax.jit(masked_train)(key)
    narrow_train, _ = make_train(config, narrow, demo[..., kept], demo_mask, own[..., kept],
                                 own_mask)
    _, narrow_losses = jax.jit(narrow_train)(key)
    np.testing.assert_allclose(masked_losses, narrow_losses, rtol=1e-4, atol=1e-6)
    assert masked_losses[-1] < masked_losses[0]  # it did train
    # The weights on unread features never move; the read ones do.
    initial = np.asarray(_first_kernel(build_model(size, jax.random.split(key)[0]))[...])
    final = np.asarray(_first_kernel(nnx.merge(masked_def, masked_params))[...])
    unread = keep == 0
    np.testing.assert_array_equal(final[unread], initial[unread])
    assert not np.allclose(final[~unread], initial[~unread])
    # Zeroing the unread features is not enough: R1 on them would still penalise (and
    # so move) the weights that read them.
    zeroed_train, _ = make_train(config, lambda k: build_model(size, k), demo * keep, demo_mask,
                                 own * keep, own_mask)
    zeroed_params, zeroed_losses = jax.jit(zeroed_train)(key)
    zeroed = np.asarray(_first_kernel(nnx.merge(masked_def, zeroed_params))[...])
    assert not np.allclose(zeroed[unread], initial[unread])
    assert float(gan_loss(masked_def, masked_params, demo, demo_mask, own, own_mask, config,
                          keep)) == pytest.approx(float(gan_loss(
                              masked_def, masked_params, demo * keep, demo_mask, own * keep,
                              own_mask, config, keep)), rel=1e-6)


def test_a_feature_that_never_varied_is_visible_unless_zeroing_is_asked_for():
    steady = jnp.stack([jnp.linspace(-1.0, 1.0, 50), jnp.full(50, 2.0)], axis=-1)
    norm = RunningNorm.create(2).update(steady, jnp.ones(50, bool))
    novel = jnp.array([[0.0, 5.0]])
    # The unit scale (SCALE_FLOOR): a change of 3 in the constant feature reads as 3.
    np.testing.assert_allclose(norm.normalize(novel)[0, 1], 3.0, rtol=1e-5)
    assert float(norm.normalize(steady)[:, 1].max()) == 0.0  # unchanged: 0 either way
    assert float(norm.normalize(novel, zero_constant=True)[0, 1]) == 0.0
    # A feature that varied is standardised the same way in both modes.
    np.testing.assert_allclose(norm.normalize(novel)[0, 0],
                               norm.normalize(novel, zero_constant=True)[0, 0])
