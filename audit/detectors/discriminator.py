"""The GAN discriminator as a detector: co-trained with the imitator, or trained post hoc."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from audit import discriminator as gan_discriminator
from audit.modules import abstract_module
from audit.trajectories import Trajectories, validate
from audit.views import FeatureLayout, RunningNorm, check_view, feature_layout, view_features


class DiscriminatorDetector:
    """Per-step discriminator logits (positive: imitator) as suspicion scores.

    Built either from an adversarial run (:meth:`from_gan`: protocol ``co-trained``)
    or fitted post hoc on demonstrator vs imitator episodes (:meth:`fit`: protocol
    ``post-hoc``).

    Args:
      view: the view it reads, one of :data:`audit.views.VIEWS`.
      num_actions: size of the action one-hot.
      make_discriminator: ``(key, feature_size) -> discriminator`` (for :meth:`fit`); a
        maker that also takes ``layout=`` is given the view's
        :class:`audit.views.FeatureLayout`, and a discriminator that lists
        ``raw_features`` reads those features unstandardised
        (:mod:`audit.discriminator`).
      config: post-hoc training settings.
      activation_names: activations read by the activation views (default: all).
      seed: seed of post-hoc training.
      zero_constant_features: hold features that never varied in training at 0 when
        scoring (see :meth:`audit.views.RunningNorm.normalize`).

    Example:
      >>> detector = DiscriminatorDetector("transitions", 6, make_mlp_discriminator)
      >>> step_scores = detector.fit(demos, imitator_episodes).score(test_episodes)
    """

    def __init__(self, view: str, num_actions: int,
                 make_discriminator: Callable[[jax.Array, int], nnx.Module] | None = None,
                 config: gan_discriminator.DiscriminatorConfig | None = None,
                 activation_names: Sequence[str] | None = None, seed: int = 0,
                 zero_constant_features: bool = False):
        self.view = check_view(view)
        self.num_actions = num_actions
        self.make_discriminator = make_discriminator
        self.config = config or gan_discriminator.DiscriminatorConfig()
        self.activation_names = tuple(activation_names) if activation_names else None
        self.seed = seed
        self.zero_constant_features = zero_constant_features
        self.protocol = "post-hoc"
        self.features_view = view
        self._graphdef = self._params = self._norm = self._mask = self._raw = None

    @classmethod
    def from_gan(cls, modules, discriminator_params, norm: RunningNorm, view: str,
                 num_actions: int, activation_names: Sequence[str] | None = None,
                 zero_constant_features: bool = False) -> DiscriminatorDetector:
        """The co-trained discriminator of ``view`` from an :func:`audit.gan.make_train` run.

        Args:
          modules: the run's :class:`audit.gan.GANModules`.
          discriminator_params: that view's discriminator parameters (one run's, one
            view's: index the seed and view axes first).
          norm: the run's feature statistics.
          view: which of ``modules.views`` it is.
          num_actions: size of the action one-hot.
          activation_names: the run's ``activation_names``.
          zero_constant_features: the run's ``zero_constant_features``.
        """
        if view not in modules.views:
            raise ValueError(f"view {view!r} was not trained in this run; it has: "
                             f"{', '.join(modules.views)}")
        detector = cls(view, num_actions, activation_names=activation_names,
                       zero_constant_features=zero_constant_features)
        detector.protocol = "co-trained"
        detector.features_view = modules.features_view
        detector._graphdef = modules.discriminator
        detector._params = discriminator_params
        detector._norm = norm
        detector._mask = jnp.asarray(modules.view_masks[modules.views.index(view)])
        # The features the run's discriminator read unstandardised (its raw_features).
        detector._raw = gan_discriminator.raw_feature_mask(
            nnx.merge(modules.discriminator, discriminator_params),
            modules.view_masks.shape[1])
        return detector

    def fit(self, trusted: Trajectories, untrusted: Trajectories | None = None
            ) -> DiscriminatorDetector:
        """Trains a fresh discriminator: ``trusted`` (label 0) vs ``untrusted`` (label 1).

        Raises:
          ValueError: without ``untrusted`` episodes (a discriminator needs both
            classes), or without ``make_discriminator``.
        """
        if untrusted is None:
            raise ValueError("DiscriminatorDetector.fit needs untrusted episodes (the imitator's) "
                             "besides the trusted ones")
        if self.make_discriminator is None:
            raise ValueError("DiscriminatorDetector.fit needs make_discriminator")
        validate(trusted, "trusted")
        validate(untrusted, "untrusted")
        demo = self._features(trusted)
        own = self._features(untrusted)
        norm = RunningNorm.create(demo.shape[-1]).update(demo, trusted.mask).update(
            own, untrusted.mask)
        size = demo.shape[-1]
        zero = self.zero_constant_features
        layout = feature_layout(trusted, self.view, self.num_actions, self.activation_names)
        raw = _raw_mask(self.make_discriminator, size, layout)
        data = (gan_discriminator.standardize(norm, demo, raw, zero), trusted.mask,
                gan_discriminator.standardize(norm, own, raw, zero), untrusted.mask)
        train, graphdef = _compiled_training(self.config, self.make_discriminator, size, data,
                                             layout)
        params, _ = train(jax.random.key(self.seed), data)
        self.protocol = "post-hoc"
        self.features_view = self.view
        self._graphdef, self._params, self._norm, self._raw = graphdef, params, norm, raw
        self._mask = jnp.ones(size, jnp.float32)
        return self

    def score(self, trajectories: Trajectories) -> np.ndarray:
        """``[B, T]`` logits of every step (padding included; weight by the mask)."""
        return self.score_features(self._features(trajectories, self.features_view),
                                   trajectories.mask)

    def score_features(self, features: jax.Array, mask: jax.Array) -> np.ndarray:
        """:meth:`score` on precomputed ``view_features(..., self.features_view, ...)``.

        The co-trained discriminators of one run share ``features_view``, so their
        features can be computed once for all of them.
        """
        if self._params is None:
            raise RuntimeError("DiscriminatorDetector.score before fit (or from_gan)")
        return np.asarray(_logits(self._graphdef, self._params, self._norm, self._mask,
                                  features, mask, self.zero_constant_features, self._raw))

    def _features(self, trajectories: Trajectories, view: str | None = None) -> jax.Array:
        return view_features(trajectories, view or self.view, self.num_actions,
                             self.activation_names)


_TRAINING: dict = {}


def _compiled_training(config, make_discriminator, size: int, data,
                       layout: FeatureLayout | None = None):
    """The jitted training of ``make_discriminator(key, size)`` on data of these shapes.

    Post-hoc detectors are fitted many times (every view, organism and seed of a
    suite) on data of the same shapes; their data is an argument, so one compilation
    serves them all. ``layout`` is passed to a maker that takes one
    (:func:`audit.discriminator.build_discriminator`).
    """
    index = (config, make_discriminator, size, layout, tuple(tuple(x.shape) for x in data))
    if index not in _TRAINING:
        train, graphdef = gan_discriminator.make_train(
            config, lambda key: gan_discriminator.build_discriminator(
                make_discriminator, key, size, layout), *data)
        _TRAINING[index] = (jax.jit(train), graphdef)
    return _TRAINING[index]


@functools.lru_cache(maxsize=256)
def _raw_mask(make_discriminator, size: int, layout: FeatureLayout | None):
    """The ``[F]`` raw-feature mask of the discriminator ``make_discriminator`` builds
    (None: it reads every feature standardised); see
    :func:`audit.discriminator.raw_feature_mask`."""
    graphdef, abstract = abstract_module(lambda key: gan_discriminator.build_discriminator(
        make_discriminator, key, size, layout))
    return gan_discriminator.raw_feature_mask(nnx.merge(graphdef, abstract), size)


@functools.partial(jax.jit, static_argnames=("graphdef", "zero_constant"))
def _logits(graphdef, params, norm, keep, features, mask, zero_constant, raw=None):
    return gan_discriminator.score_episodes(
        graphdef, params,
        gan_discriminator.standardize(norm, features, raw, zero_constant) * keep, mask)

