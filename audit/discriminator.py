"""Training a discriminator on two sets of episodes (demonstrator vs imitator).

The GAN loss: binary cross-entropy with label 0 for demonstrator steps and 1 for
imitator steps, over valid steps only, optionally with label smoothing and a
gradient penalty on the demonstrator features (R1). A ``keep`` mask restricts a
discriminator to one view's features: it reads ``features * keep`` and the
penalty sees only the kept features. ``make_train`` follows the same pure
``train(key)`` shape as behaviour cloning.

Two optional parts of the discriminator contract (:mod:`models.discriminators`) are
honoured wherever the framework builds and feeds a discriminator:

- a class (or ``(key, feature_size)`` maker) with a ``layout`` keyword is handed the
  :class:`audit.views.FeatureLayout` of the features it will read
  (:func:`build_discriminator`);
- a module with a ``raw_features`` attribute (feature indices) reads those features
  unstandardised (:func:`raw_feature_mask`, :func:`standardize`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from audit.modules import abstract_module, scan_updates
from audit.views import FeatureLayout, RunningNorm


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    """Discriminator-training hyperparameters.

    Attributes:
      updates: gradient updates.
      batch_episodes: episodes of each class per minibatch.
      learning_rate: Adam learning rate.
      max_grad_norm: global gradient-norm clip.
      label_smoothing: targets become ``s/2`` and ``1 - s/2`` (0: none).
      gradient_penalty: weight of the R1 penalty on demonstrator steps (0: none):
        the mean over valid steps ``s`` of ``||d S / d x_s||^2``, where ``S`` is the
        sum of the episode's valid step logits and ``x_s`` the (kept) features of
        step ``s``. For a per-step discriminator (``mlp``) this is exactly
        ``E||d logit_s / d x_s||^2``; for a sequence discriminator (``gru``,
        ``attention``) it is R1 on the whole-sequence score ``S``: the gradient at
        step ``s`` sums the logits of every step ``t >= s`` that reads it (causal),
        not ``logit_s`` alone.
    """

    updates: int = 500
    batch_episodes: int = 32
    learning_rate: float = 1e-3
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    gradient_penalty: float = 0.0

    def __post_init__(self):
        for name in ("updates", "batch_episodes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"DiscriminatorConfig.{name} must be an int >= 1, got "
                                 f"{getattr(self, name)!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("DiscriminatorConfig.label_smoothing must be in [0, 1), got "
                             f"{self.label_smoothing!r}")
        if not self.gradient_penalty >= 0:
            raise ValueError("DiscriminatorConfig.gradient_penalty must be >= 0, got "
                             f"{self.gradient_penalty!r}")
        if not self.learning_rate > 0:
            raise ValueError("DiscriminatorConfig.learning_rate must be > 0, got "
                             f"{self.learning_rate!r}")


def takes_layout(maker: Callable) -> bool:
    """Whether ``maker`` (a discriminator class or maker function) takes ``layout=``.

    A class is judged by its ``__init__`` (``inspect.signature`` of an NNX module class
    shows only its metaclass's ``*args, **kwargs``); a function or ``functools.partial``
    by its own signature. Only a parameter named ``layout`` counts, not ``**kwargs``.

    Args:
      maker: a class called as ``cls(feature_size, *, rngs, ...)`` or a maker called as
        ``maker(key, feature_size)``.

    Returns:
      True if ``layout`` can be passed by keyword.
    """
    try:
        signature = inspect.signature(maker.__init__ if isinstance(maker, type) else maker)
    except (TypeError, ValueError):
        return False
    parameter = signature.parameters.get("layout")
    return parameter is not None and parameter.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def build_discriminator(make_discriminator: Callable[..., nnx.Module], key: jax.Array,
                        feature_size: int, layout: FeatureLayout | None = None) -> nnx.Module:
    """``make_discriminator(key, feature_size)``, with ``layout=layout`` if it takes one.

    Every place that builds a discriminator from a ``(key, feature_size)`` maker goes
    through here, so makers without a ``layout`` parameter keep working unchanged.

    Args:
      make_discriminator: ``(key, feature_size[, layout=None]) -> discriminator``.
      key: its initialisation key.
      feature_size: ``F`` of the ``features [T, F]`` it will read.
      layout: which of those features are which (None: not known).

    Returns:
      The module.

    Raises:
      ValueError: if ``layout``'s size is not ``feature_size``.
    """
    if layout is None or not takes_layout(make_discriminator):
        return make_discriminator(key, feature_size)
    if layout.size != feature_size:
        raise ValueError(f"layout: its parts cover {layout.size} features, but feature_size "
                         f"is {feature_size}")
    return make_discriminator(key, feature_size, layout=layout)


def raw_feature_mask(module: nnx.Module, feature_size: int) -> np.ndarray | None:
    """``[F]`` bool mask of the features ``module`` reads unstandardised, or None.

    A discriminator lists them in an optional attribute ``raw_features`` (a tuple of
    feature indices; e.g. the imitator's logits, whose log-softmax the AIRL
    discriminator needs as they are). None when it lists none, so that the features
    of every other discriminator are computed exactly as before.

    Args:
      module: the discriminator (an abstract one, from ``nnx.eval_shape``, will do).
      feature_size: ``F``.

    Raises:
      ValueError: if ``raw_features`` holds something other than indices in ``[0, F)``.
    """
    raw = tuple(getattr(module, "raw_features", ()) or ())
    if not raw:
        return None
    bad = [i for i in raw if isinstance(i, bool) or not isinstance(i, int | np.integer)
           or not 0 <= i < feature_size]
    if bad:
        raise ValueError(f"raw_features of {type(module).__name__} must be feature indices in "
                         f"[0, {feature_size}); got {bad}")
    mask = np.zeros(feature_size, bool)
    mask[list(raw)] = True
    return mask


def standardize(norm: RunningNorm, features: jax.Array, raw_mask: np.ndarray | None = None,
                zero_constant: bool = False) -> jax.Array:
    """``norm.normalize(features)``, except the features of ``raw_mask``, passed as they are.

    Args:
      norm: the running feature statistics.
      features: ``[..., F]`` features.
      raw_mask: ``[F]`` bool mask from :func:`raw_feature_mask` (None: none raw; the
        result is then exactly ``norm.normalize(features, zero_constant)``).
      zero_constant: see :meth:`audit.views.RunningNorm.normalize`.

    Returns:
      The features the discriminator reads (before any view mask). The raw features
      are passed as they are in either ``zero_constant`` mode.
    """
    normalized = norm.normalize(features, zero_constant)
    if raw_mask is None:
        return normalized
    return jnp.where(jnp.asarray(raw_mask), features, normalized)


def score_episodes(graphdef, params, features: jax.Array, mask: jax.Array) -> jax.Array:
    """``[B, T]`` per-step logits (positive: imitator) of a batch of episodes."""
    model = nnx.merge(graphdef, params)
    return jax.vmap(model)(features, mask)


def gan_loss(graphdef, params, demo_features, demo_mask, imitator_features, imitator_mask,
             config: DiscriminatorConfig, keep: jax.Array | None = None) -> jax.Array:
    """Masked mean binary cross-entropy (demonstrator 0, imitator 1) plus the R1 penalty.

    Args:
      graphdef: the discriminator's graph definition.
      params: its parameters.
      demo_features: ``[B, T, F]`` demonstrator features.
      demo_mask: ``[B, T]`` their valid steps.
      imitator_features: ``[B', T, F]`` imitator features.
      imitator_mask: ``[B', T]`` their valid steps.
      config: label smoothing and penalty weight (see :class:`DiscriminatorConfig`).
      keep: optional ``[F]`` 0/1 mask of the features the discriminator reads (one
        view inside a richer view's features, :func:`audit.views.view_mask`). The
        discriminator reads ``features * keep``, and the R1 penalty differentiates
        through that product, so it is zero on unread features: with a mask, the
        loss and its gradients are those of a discriminator that has only the kept
        features. ``None``: every feature is read.

    Returns:
      The scalar loss.
    """
    chex.assert_rank([demo_features, imitator_features], 3)
    chex.assert_equal_shape_prefix([demo_features, demo_mask], 2)
    chex.assert_equal_shape_prefix([imitator_features, imitator_mask], 2)
    if keep is not None:
        chex.assert_shape(keep, (demo_features.shape[-1],))
        keep = jnp.asarray(keep, demo_features.dtype)

    def read(features):
        return features if keep is None else features * keep

    low, high = config.label_smoothing / 2, 1 - config.label_smoothing / 2

    def mean_bce(features, mask, target):
        logits = score_episodes(graphdef, params, read(features), mask)
        losses = optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, target))
        return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1)

    loss = 0.5 * (mean_bce(demo_features, demo_mask, low)
                  + mean_bce(imitator_features, imitator_mask, high))
    if config.gradient_penalty > 0:
        # R1 on the (whole-episode, for a sequence model) summed score of the read
        # features: d/dx of score(x * keep) is keep * score'(x * keep).
        def total_logit(features):
            return jnp.sum(score_episodes(graphdef, params, read(features), demo_mask)
                           * demo_mask)

        grads = jax.grad(total_logit)(demo_features)
        penalty = jnp.sum(jnp.sum(jnp.square(grads), -1) * demo_mask) / jnp.maximum(
            jnp.sum(demo_mask), 1)
        loss = loss + config.gradient_penalty * penalty
    return loss


def make_train(config: DiscriminatorConfig, make_discriminator: Callable[[jax.Array], nnx.Module],
               demo_features: jax.Array, demo_mask: jax.Array,
               imitator_features: jax.Array, imitator_mask: jax.Array,
               keep: jax.Array | None = None):
    """Builds the pure discriminator-training run on two fixed sets of episodes.

    Args:
      config: hyperparameters.
      make_discriminator: ``key -> discriminator`` (a fresh NNX module).
      demo_features: ``[B, T, F]`` features of demonstrator episodes.
      demo_mask: ``[B, T]`` their valid steps.
      imitator_features: ``[B', T, F]`` features of imitator episodes.
      imitator_mask: ``[B', T]`` their valid steps.
      keep: optional ``[F]`` 0/1 mask of the features the discriminator reads (see
        :func:`gan_loss`); ``None``: all.

    Returns:
      ``(train, graphdef)``; ``train(key, data=None) -> (params, losses)`` is pure and
      vmappable over keys. ``data``, a tuple ``(demo_features, demo_mask,
      imitator_features, imitator_mask)`` of the same shapes as those given here,
      replaces them, so that one compiled ``train`` serves many data sets.

    Raises:
      ValueError: if the features and masks do not fit together, or ``keep`` not the
        features.
    """
    for name, features, mask in (("demo", demo_features, demo_mask),
                                 ("imitator", imitator_features, imitator_mask)):
        if features.ndim != 3 or features.shape[:2] != mask.shape:
            raise ValueError(f"{name}_features must be [episodes, steps, features] matching "
                             f"{name}_mask [episodes, steps]; got {features.shape} and "
                             f"{mask.shape}")
    if demo_features.shape[-1] != imitator_features.shape[-1]:
        raise ValueError(f"demo and imitator features differ in size: "
                         f"{demo_features.shape[-1]} vs {imitator_features.shape[-1]}")
    if keep is not None and np.shape(keep) != (demo_features.shape[-1],):
        raise ValueError(f"keep must be a [features] mask of size {demo_features.shape[-1]}; "
                         f"got shape {np.shape(keep)}")
    graphdef, _ = abstract_module(make_discriminator)
    optimizer = optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                            optax.adam(config.learning_rate))
    demo_count, imitator_count = demo_features.shape[0], imitator_features.shape[0]
    given = (demo_features, demo_mask, imitator_features, imitator_mask)

    def train(key, data=None):
        demo_f, demo_m, imitator_f, imitator_m = given if data is None else data

        def loss_fn(params, key):
            demo_key, imitator_key = jax.random.split(key)
            d = jax.random.choice(demo_key, demo_count,
                                  (min(config.batch_episodes, demo_count),), replace=False)
            i = jax.random.choice(imitator_key, imitator_count,
                                  (min(config.batch_episodes, imitator_count),), replace=False)
            return gan_loss(graphdef, params, demo_f[d], demo_m[d], imitator_f[i],
                            imitator_m[i], config, keep)

        init_key, batch_key = jax.random.split(key)
        params = nnx.split(make_discriminator(init_key))[1]
        params, _, losses = scan_updates(loss_fn, optimizer, params, optimizer.init(params),
                                         jax.random.split(batch_key, config.updates))
        return params, losses

    return train, graphdef


def trajectory_scores(step_logits, mask, aggregate: str = "max") -> np.ndarray:
    """``[B]`` trajectory scores from per-step logits: ``max`` or ``mean`` over valid steps."""
    step_logits, mask = np.asarray(step_logits), np.asarray(mask, bool)
    if aggregate == "max":
        return np.where(mask, step_logits, -np.inf).max(axis=1)
    if aggregate == "mean":
        return (step_logits * mask).sum(1) / np.maximum(mask.sum(1), 1)
    raise ValueError(f"unknown aggregate {aggregate!r}; choose from: max, mean")
