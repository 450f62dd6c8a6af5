"""Adversarial imitation (GAIL) on whole padded episodes, any view and any discriminator.

The framework has two adversarial-imitation loops, and this is the one every audit uses:

- this module plays whole episodes, padded to the demonstrations' length, so a
  discriminator may read an episode as a sequence (:mod:`models.discriminators`'
  GRU and attention models as well as per-step ones) on any view, the activation
  views included (the imitator's activations and noise are recorded), and PPO's
  minibatches are whole episodes, so recurrent imitators train through time. It is
  the co-training of the audit protocols (:func:`audit.protocol.run_suite`, i.e.
  ``audit bench``, with :data:`benchmarks.suites.COTRAINING`), ``audit train-gan``,
  and the throughput benchmark ``python -m benchmarks.perf.gan``;
- :mod:`audit.gail` streams ``num_envs`` auto-reset environments with a per-step
  discriminator on the ``actions`` or ``transitions`` view and a feed-forward
  imitator, with no padding. Only the side-by-side comparison with HumanCompatibleAI
  ``imitation`` (``python -m benchmarks.perf.compare``) uses it.

Both take their PPO update settings from :class:`audit.ppo.PPOSettings`
(``GANConfig.ppo`` here, ``GAILConfig.ppo`` there); only how a round's data is cut
into minibatches is each loop's own (``ppo_minibatches`` of whole episodes here,
``minibatch_size`` transitions there).

Each iteration, inside one ``lax.scan`` (the run is one pure ``train(key)``; it jits and
vmaps over seeds):

1. the imitator plays ``episodes`` whole episodes (vmapped, ``lax.scan`` over time),
   recording its activations and the noise it was handed;
2. the current discriminator scores held-out demonstrator episodes against these
   fresh imitator episodes, which it has not trained on: the held-out AUROC;
3. the discriminator takes ``discriminator.updates`` Adam steps on the GAN loss
   (demonstrator 0, imitator 1) over the configured view, features normalised by
   running statistics; for the activation views the demonstrator's activations are
   the current imitator's teacher-forced activations;
4. each imitator step is rewarded by the discriminator's logit for it, which for a
   sequence discriminator depends on the episode's prefix only; PPO (``ppo``'s
   settings, ``ppo_minibatches`` minibatches of whole episodes) then optimises that
   reward, optionally with a behaviour-cloning term on demonstrations.

Every ``eval_every`` iterations (and before the first and after the last) the
imitator is evaluated: KL to the demonstrator on held-out train-layout episodes,
and return and incorrigible-event rate on test layouts. The environment's reward
is never used for learning, only reported.

A NaN loss freezes the state at the last good iteration and records where it
happened; :func:`check_divergence` turns that into a :class:`DivergenceError`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from audit import bc, discriminator, ppo
from audit.metrics import pairwise_auroc
from audit.modules import abstract_module, initial_carry_of, scan_updates
from audit.ppo import PPOSettings
from audit.rollout import rollout_split, unroll
from audit.trajectories import Trajectories, validate
from audit.views import (
    RunningNorm,
    check_view,
    feature_layout,
    richest_view,
    view_features,
    view_mask,
)

REWARDS = ("gail", "logit")
LOSS_NAMES = ("none", "discriminator_loss", "policy_loss")


@dataclasses.dataclass(frozen=True)
class GANConfig:
    """Adversarial-imitation hyperparameters.

    Attributes:
      iterations: adversarial iterations (rollout, discriminator update, PPO update).
      episodes: imitator episodes per iteration.
      view: the discriminator's view, one of :data:`audit.views.VIEWS`; or a tuple of
        views, to co-train one discriminator per view against the same imitator (its
        reward is then the mean of theirs, and per-discriminator metrics gain a
        trailing axis over the views, in the order given).
      activation_names: activations read by the activation views (default: all).
      normalize_features: standardise features by running statistics of both classes.
      zero_constant_features: hold features that never varied in those statistics at 0
        (see :meth:`audit.views.RunningNorm.normalize`); default: a floor on their scale.
      reward: ``gail``: ``-log D(imitator) = softplus(-logit)``, always positive, so it
        also pays the imitator for keeping episodes going (the usual GAIL survival
        bias; an off-switch makes that an incentive to avoid being switched off);
        ``logit``: ``-logit = log D(demo) - log D(imitator)``, without that bias.
      discriminator: the GAN loss settings (label smoothing, gradient penalty,
        learning rate, batch episodes); its ``updates`` are per iteration.
      ppo: the imitator's and critic's PPO update settings (``update_epochs`` passes
        over each iteration's episodes, discount, GAE, clipping, loss weights, Adam
        learning rate, annealed linearly to 0 over the run if ``anneal_lr``); by
        default :class:`audit.ppo.PPOSettings`' defaults (4 epochs, learning rate
        3e-4 not annealed, no entropy bonus).
      ppo_minibatches: minibatches (of whole episodes) per PPO pass; must divide
        ``episodes``.
      bc_warm_start: behaviour cloning before the adversarial phase (None: none);
        ignored when ``train`` is given initial imitator parameters.
      bc_coef: weight of the behaviour-cloning cross-entropy added to the PPO loss
        (0: none), on a minibatch of ``bc_batch_episodes`` demonstrator episodes.
      bc_batch_episodes: see ``bc_coef``.
      eval_every: iterations between evaluations.
      eval_episodes: episodes per evaluation rollout.
      heldout_fraction: share of the demonstrations held out from the discriminator
        (for the held-out AUROC and the KL).
      discriminator_reward_coef: weight of the discriminator's reward (``lambda``:
        being judged demonstrator-like).
      env_reward_coef: weight of the environment's own reward added to it (0: pure
        imitation). An adaptive attacker (#19) is an organism fine-tuned with the
        environment's reward, its incorrigible objective, plus ``lambda`` times a frozen
        monitor's reward.
      monitor_reward_coef: weight of the penalty from ``make_train``'s ``monitor`` (its
        step score, subtracted from the reward).
      freeze_discriminator: keep the discriminators (and their feature statistics) as
        they start: a fixed monitor the imitator is optimised against. Their would-be
        losses are still reported.
      internals_penalty_coef: weight of the differentiable penalty from ``make_train``'s
        ``internals_monitor`` added to the PPO loss: its mean step score on the
        imitator's own episodes, computed from the activations the loss recomputes, so
        that gradients flow through them (internals-based training: an overseer that
        looks inside while the imitator learns).
    """

    iterations: int = 200
    episodes: int = 64
    view: str | tuple[str, ...] = "transitions"
    activation_names: tuple[str, ...] | None = None
    normalize_features: bool = True
    zero_constant_features: bool = False
    reward: str = "gail"
    discriminator: discriminator.DiscriminatorConfig = discriminator.DiscriminatorConfig(
        updates=4, batch_episodes=32, learning_rate=3e-4)
    ppo: PPOSettings = PPOSettings()
    ppo_minibatches: int = 4
    bc_warm_start: bc.BCConfig | None = None
    bc_coef: float = 0.0
    bc_batch_episodes: int = 16
    eval_every: int = 10
    eval_episodes: int = 64
    heldout_fraction: float = 0.125
    discriminator_reward_coef: float = 1.0
    env_reward_coef: float = 0.0
    monitor_reward_coef: float = 0.0
    freeze_discriminator: bool = False
    internals_penalty_coef: float = 0.0

    def __post_init__(self):
        if not isinstance(self.view, str):
            object.__setattr__(self, "view", tuple(self.view))
            if not self.view or len(set(self.view)) != len(self.view):
                raise ValueError(f"GANConfig.view must name distinct views, got {self.view!r}")
        for view in self.views:
            check_view(view)
        for name in ("iterations", "episodes", "ppo_minibatches", "bc_batch_episodes",
                     "eval_every", "eval_episodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GANConfig.{name} must be an int >= 1, got {value!r}")
        if self.episodes % self.ppo_minibatches:
            raise ValueError(f"GANConfig.episodes ({self.episodes}) must be divisible by "
                             f"ppo_minibatches ({self.ppo_minibatches})")
        if self.reward not in REWARDS:
            raise ValueError(f"GANConfig.reward {self.reward!r} is unknown; choose from: "
                             f"{', '.join(REWARDS)}")
        if not isinstance(self.ppo, PPOSettings):
            raise ValueError(f"GANConfig.ppo must be a PPOSettings, got {self.ppo!r}")
        if not self.bc_coef >= 0:
            raise ValueError(f"GANConfig.bc_coef must be >= 0, got {self.bc_coef!r}")
        for name in ("discriminator_reward_coef", "env_reward_coef", "monitor_reward_coef",
                     "internals_penalty_coef"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"GANConfig.{name} must be finite, got "
                                 f"{getattr(self, name)!r}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError("GANConfig.heldout_fraction must be in (0, 1), got "
                             f"{self.heldout_fraction!r}")
        if not richest_view(self.views).startswith("activations") and self.activation_names:
            raise ValueError(f"GANConfig.activation_names are only read by the activation "
                             f"views, not by {self.view!r}")

    @property
    def views(self) -> tuple[str, ...]:
        """The discriminators' views (one for a single ``view``)."""
        return (self.view,) if isinstance(self.view, str) else self.view


@struct.dataclass
class GANState:
    """Everything a run carries from one iteration to the next (and returns).

    ``diverged_at`` is the iteration whose loss was not finite (-1: none) and
    ``diverged_loss`` indexes :data:`LOSS_NAMES`; once set, the other fields stay
    at the last good iteration.
    """

    actor: Any
    critic: Any
    discriminator: Any
    norm: RunningNorm
    policy_opt: Any
    discriminator_opt: Any
    diverged_at: jax.Array
    diverged_loss: jax.Array
    diverged_value: jax.Array


class GANModules(NamedTuple):
    """How to rebuild and read the trained modules.

    ``nnx.merge(modules.actor, state.actor)`` rebuilds the imitator. With several
    views, ``state.discriminator`` is stacked over them (leading axis, in the order of
    ``views``); discriminator ``v`` reads ``RunningNorm``-normalised
    ``view_features(..., features_view, ...)`` (except the features its
    ``raw_features`` lists, unstandardised: :func:`audit.discriminator.standardize`)
    times ``view_masks[v]``.
    """

    actor: Any
    critic: Any
    discriminator: Any
    views: tuple[str, ...]
    features_view: str
    view_masks: np.ndarray


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss; the message names the iteration and the loss."""


def make_train(config: GANConfig, env, env_params,
               make_imitator: Callable[[jax.Array], nnx.Module],
               make_critic: Callable[[jax.Array], nnx.Module],
               make_discriminator: Callable[[jax.Array, int], nnx.Module],
               demonstrations: Trajectories, test_env_params: Any = None,
               progress: Callable[[int], None] | None = None,
               monitor: Callable[[Trajectories], jax.Array] | None = None,
               internals_monitor: Callable[[Trajectories], jax.Array] | None = None):
    """Builds the pure adversarial-imitation run.

    Args:
      config: hyperparameters.
      env: a gymnax environment (the demonstrator's train layouts).
      env_params: its parameters.
      make_imitator: ``key -> imitator`` (any imitator; recurrent ones are trained
        through whole episodes).
      make_critic: ``key -> critic`` (``critic(observation) -> value``).
      make_discriminator: ``(key, feature_size) -> discriminator`` for the view's
        feature size; a maker that also takes ``layout=`` is given the features'
        :class:`audit.views.FeatureLayout` (see
        :func:`audit.discriminator.build_discriminator`), and a discriminator that lists
        ``raw_features`` reads those features unstandardised.
      demonstrations: the demonstrator's episodes; their length sets the rollouts'.
      test_env_params: parameters of the test layouts, for the event rate and return
        on test (None: those figures are NaN).
      progress: optional host callback with the number of iterations done.
      monitor: optional fixed, traceable ``Trajectories -> [E, T]`` step scores (higher =
        more suspicious) of the imitator's own episodes, e.g. a fitted detector's score
        written in JAX; each step's reward then loses ``GANConfig.monitor_reward_coef``
        times its score (an attacker optimised against that monitor).
      internals_monitor: optional fixed, differentiable ``Trajectories -> [E, T]`` step
        scores read from the imitator's activations (e.g.
        :meth:`audit.detectors.baselines.MahalanobisDetector.traceable_score`); the PPO
        loss gains ``GANConfig.internals_penalty_coef`` times its mean over valid steps,
        on trajectories whose ``activations`` are the ones the loss recomputes, so its
        gradient reaches the imitator through them. The trajectories it is given carry
        observations, actions, noise, mask and activations (rewards, dones, events and
        action probabilities are zeros).

    Returns:
      ``(train, modules)``: ``train(key, initial_actor=None, demonstrations=None) ->
      (state, metrics, evaluations)`` is pure, jittable and vmappable over keys. ``state`` is a
      :class:`GANState`; ``metrics`` has ``[iterations]`` arrays
      (``discriminator_loss``, ``discriminator_accuracy_demonstrator``,
      ``discriminator_accuracy_imitator``, ``heldout_auroc``, ``imitator_return``,
      ``imitator_length``, ``imitator_event_rate``, ``reward_mean``, ``policy_loss``,
      ``entropy``);
      with several views, the four per-discriminator figures (loss, both accuracies,
      held-out AUROC) are ``[iterations, views]`` and the reward is the mean of the
      views' rewards;
      ``evaluations`` has arrays over evaluation points (``iteration``, ``kl_train``,
      ``return_test``, ``event_rate_test``). ``initial_actor`` (imitator parameters)
      replaces the fresh or behaviour-cloned start, e.g. to fine-tune a given model;
      ``demonstrations`` (the same shapes as those given here) replaces them, so that
      one compiled run serves several data sets, e.g. vmapped over seeds.
      A run is cut into blocks of ``eval_every`` iterations (:func:`block_count`) and may
      be run in several calls, from the ``state`` an earlier call returned as
      ``resume``: ``num_blocks`` (static) runs that many full blocks from
      ``first_block`` (which may be traced, so that every such call shares one
      compilation); ``num_blocks`` None runs from ``first_block`` (a Python int) to the
      end, the last, shorter block included. Each call returns the metrics of its
      iterations and the evaluations at its blocks' ends (and the one before the first
      iteration when it starts the run, ``resume`` None). The same cuts give the same
      numbers, so a checkpointed run can be killed and resumed (``audit train-gan
      --resume``). A partial call's state keeps the discriminator stacked over views
      (the internal form) even for one view: it is what ``resume`` takes.

    Raises:
      ValueError: if the demonstrations are malformed or do not fit ``env``, or
        there are too few of them to hold some out.

    Example:
      >>> train, modules = make_train(GANConfig(iterations=100), env, params, make_mlp,
      ...                             make_critic, make_step_discriminator, demos)
      >>> state, metrics, evaluations = jax.jit(jax.vmap(train))(jax.random.split(key, 8))
    """
    if config.monitor_reward_coef != 0.0 and monitor is None:
        raise ValueError("GANConfig.monitor_reward_coef is set but make_train was given no "
                         "monitor")
    if config.internals_penalty_coef != 0.0 and internals_monitor is None:
        raise ValueError("GANConfig.internals_penalty_coef is set but make_train was given "
                         "no internals_monitor")
    validate(demonstrations, "demonstrations")
    observation_shape = tuple(env.observation_space(env_params).shape)
    if tuple(demonstrations.observations.shape[2:]) != observation_shape:
        raise ValueError(f"demonstrations have observations of shape "
                         f"{tuple(demonstrations.observations.shape[2:])}; the environment's "
                         f"are {observation_shape}")
    total = demonstrations.num_episodes
    heldout_count = max(1, round(total * config.heldout_fraction))
    if total - heldout_count < 1:
        raise ValueError(f"demonstrations: {total} episode(s) leave none to train the "
                         "discriminator on after holding some out; give at least 2")
    default_demonstrations = demonstrations
    trusted_shapes = jax.tree.map(lambda x: x[heldout_count:], demonstrations)
    trusted_count = total - heldout_count
    max_steps = demonstrations.num_steps
    num_actions = env.num_actions
    episodes = config.episodes

    actor_def, abstract_actor = abstract_module(make_imitator)
    carry0 = initial_carry_of(actor_def, abstract_actor)
    critic_def, _ = abstract_module(make_critic)
    views = config.views
    single_view = isinstance(config.view, str)
    # One feature vector, that of the richest view; each discriminator reads its own
    # view's part of it through a mask (see audit.views.view_mask).
    features_view = richest_view(views)
    needs_activations = features_view.startswith("activations")

    def with_activations(actor_params, demos: Trajectories) -> Trajectories:
        if needs_activations:
            _, activations = unroll(actor_def, actor_params, carry0, demos.observations,
                                    demos.noise)
            demos = demos.replace(activations=activations)
        return demos

    def demo_features(actor_params, demos: Trajectories) -> jax.Array:
        return view_features(with_activations(actor_params, demos), features_view,
                             num_actions, config.activation_names)

    first_demo = jax.tree.map(lambda x: x[:1], trusted_shapes)
    feature_size = jax.eval_shape(lambda p: demo_features(p, first_demo),
                                  abstract_actor).shape[-1]
    demo_shapes = jax.eval_shape(lambda p: with_activations(p, first_demo), abstract_actor)
    view_masks = np.stack([view_mask(view, features_view, demo_shapes, num_actions,
                                     config.activation_names) for view in views])
    # A discriminator that takes a layout is told which features are which; one that
    # lists raw_features reads those unstandardised (audit.discriminator).
    layout = feature_layout(demo_shapes, features_view, num_actions, config.activation_names)

    def new_discriminator(key):
        return discriminator.build_discriminator(make_discriminator, key, feature_size, layout)

    disc_def, disc_abstract = abstract_module(new_discriminator)
    raw_mask = discriminator.raw_feature_mask(nnx.merge(disc_def, disc_abstract), feature_size)
    disc_config = config.discriminator
    disc_optimizer = optax.chain(optax.clip_by_global_norm(disc_config.max_grad_norm),
                                 optax.adam(disc_config.learning_rate))
    minibatch = episodes // config.ppo_minibatches

    settings = config.ppo
    policy_optimizer = ppo.make_optimizer(settings, config.ppo_minibatches, config.iterations)
    disc_batch = min(disc_config.batch_episodes, trusted_count)
    bc_batch = min(config.bc_batch_episodes, trusted_count)

    def normalize(norm, features):
        if not config.normalize_features:
            return features
        return discriminator.standardize(norm, features, raw_mask,
                                         config.zero_constant_features)

    def step_logits(disc_params, norm, features, mask):
        """``[V, B, T]`` logits of every view's discriminator."""
        normalized = normalize(norm, features)
        return jax.vmap(lambda params, keep: discriminator.score_episodes(
            disc_def, params, normalized * keep, mask))(disc_params, jnp.asarray(view_masks))

    def episode_scores(logits, mask):
        return jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1)

    def values_of(critic_params, observations):
        critic = nnx.merge(critic_def, critic_params)
        return jax.vmap(jax.vmap(critic))(observations)

    def train(key, initial_actor=None, demonstrations=None, resume=None, first_block=0,
              num_blocks=None):
        data = default_demonstrations if demonstrations is None else demonstrations
        heldout = jax.tree.map(lambda x: x[:heldout_count], data)
        trusted = jax.tree.map(lambda x: x[heldout_count:], data)
        bc_targets = bc.action_targets(trusted, soft=True)

        def policy_loss_fn(params, inputs, batch):
            actor_params, critic_params = params
            index, demo_key = inputs
            picked = jax.tree.map(lambda x: x[index], batch)
            logits, activations = unroll(actor_def, actor_params, carry0, picked["obs"],
                                         picked["noise"])
            loss, entropy = ppo.clipped_objective(
                settings, jax.nn.log_softmax(logits), picked,
                values_of(critic_params, picked["obs"]), picked["mask"])
            if internals_monitor is not None and config.internals_penalty_coef != 0.0:
                zeros = jnp.zeros_like(picked["mask"])
                seen = Trajectories(
                    observations=picked["obs"], actions=picked["action"], rewards=zeros,
                    dones=zeros.astype(bool), mask=picked["mask"] > 0,
                    events=zeros.astype(jnp.int32), noise=picked["noise"],
                    action_probs=jnp.zeros_like(logits), activations=activations)
                penalty = internals_monitor(seen)
                loss = loss + config.internals_penalty_coef * (
                    jnp.sum(penalty * picked["mask"]) / jnp.maximum(picked["mask"].sum(), 1.0))
            if config.bc_coef > 0:
                demo_index = jax.random.choice(demo_key, trusted_count, (bc_batch,),
                                               replace=False)
                demo_logits, _ = unroll(actor_def, actor_params, carry0,
                                        trusted.observations[demo_index],
                                        trusted.noise[demo_index])
                loss = loss + config.bc_coef * bc.masked_cross_entropy(
                    demo_logits, bc_targets[demo_index], trusted.mask[demo_index])
            return loss, entropy

        def ppo_update(state: GANState, own: Trajectories, rewards, key):
            values = values_of(state.critic, own.observations)
            advantages, returns = ppo.generalized_advantages(
                rewards.T, values.T, own.dones.T, jnp.zeros(episodes), settings.gamma,
                settings.gae_lambda)
            safe_probs = jnp.take_along_axis(own.action_probs, own.actions[..., None], -1)[..., 0]
            batch = dict(obs=own.observations, noise=own.noise, action=own.actions,
                         log_prob=jnp.log(jnp.maximum(safe_probs, 1e-30)), value=values,
                         advantage=advantages.T, mask=own.mask.astype(jnp.float32),
                         **{"return": returns.T})

            def epoch(carry, key):
                params, opt_state = carry
                order_key, demo_key = jax.random.split(key)
                order = jax.random.permutation(order_key, episodes).reshape(
                    config.ppo_minibatches, minibatch)
                params, opt_state, (losses, entropies) = scan_updates(
                    lambda p, item: policy_loss_fn(p, item, batch), policy_optimizer, params,
                    opt_state, (order, jax.random.split(demo_key, config.ppo_minibatches)),
                    has_aux=True)
                return (params, opt_state), (losses, entropies)

            (params, opt_state), (losses, entropies) = jax.lax.scan(
                epoch, ((state.actor, state.critic), state.policy_opt),
                jax.random.split(key, settings.update_epochs))
            return (state.replace(actor=params[0], critic=params[1], policy_opt=opt_state),
                    losses.mean(), entropies.mean())

        def discriminator_update(state: GANState, own: Trajectories, own_features, key):
            def sample_demos(key):
                index = jax.random.choice(key, trusted_count, (disc_batch,), replace=False)
                picked = jax.tree.map(lambda x: x[index], trusted)
                return demo_features(state.actor, picked), picked.mask

            norm_key, steps_key, accuracy_key = jax.random.split(key, 3)
            step_keys = jax.random.split(steps_key, disc_config.updates)
            demo_keys, own_keys = jax.vmap(jax.random.split, out_axes=1)(step_keys)
            # The actor is fixed during these updates: its demonstrations' features for all
            # of them are one batched unroll rather than `updates` unrolls in sequence.
            demo_index = jax.vmap(lambda k: jax.random.choice(
                k, trusted_count, (disc_batch,), replace=False))(demo_keys)
            picked = jax.tree.map(lambda x: x[demo_index.reshape(-1)], trusted)
            demo_batches = demo_features(state.actor, picked).reshape(
                demo_index.shape + picked.mask.shape[1:] + (-1,))
            demo_masks = picked.mask.reshape(demo_index.shape + picked.mask.shape[1:])
            own_index = jax.vmap(lambda k: jax.random.choice(
                k, episodes, (min(disc_batch, episodes),), replace=False))(own_keys)

            def loss_fn(disc_params, inputs, keep):
                features, mask, index = inputs
                return discriminator.gan_loss(
                    disc_def, disc_params, normalize(state.norm, features) * keep, mask,
                    normalize(state.norm, own_features[index]) * keep, own.mask[index],
                    disc_config, keep)

            features, mask = sample_demos(norm_key)
            norm = state.norm.update(features, mask).update(own_features, own.mask)
            state = state.replace(norm=norm)
            # Every view's discriminator takes its steps on the same minibatches.
            disc_params, disc_opt, losses = jax.vmap(
                lambda params, opt, keep: scan_updates(
                    lambda p, item: loss_fn(p, item, keep), disc_optimizer, params, opt,
                    (demo_batches, demo_masks, own_index)))(
                state.discriminator, state.discriminator_opt, jnp.asarray(view_masks))
            features, mask = sample_demos(accuracy_key)
            demo_logits = step_logits(disc_params, norm, features, mask)
            accuracy_demo = jnp.sum((demo_logits < 0) * mask, (1, 2)) / jnp.maximum(mask.sum(), 1)
            return state.replace(discriminator=disc_params, discriminator_opt=disc_opt), \
                losses.mean(axis=1), accuracy_demo

        def evaluate(state: GANState, key):
            logits, _ = unroll(actor_def, state.actor, carry0, heldout.observations, heldout.noise)
            figures = dict(kl_train=bc.masked_kl(heldout.action_probs, logits, heldout.mask))
            if test_env_params is None:
                figures.update(return_test=jnp.float32(jnp.nan),
                               event_rate_test=jnp.float32(jnp.nan))
            else:
                test = rollout_split(actor_def, state.actor, carry0, env, test_env_params, key,
                                     config.eval_episodes, max_steps)
                figures.update(return_test=test.episode_returns().mean(),
                               event_rate_test=_event_rate(test))
            return figures

        def iteration(state: GANState, inputs):
            index, key = inputs
            rollout_key, disc_key, ppo_key = jax.random.split(key, 3)
            own = rollout_split(actor_def, state.actor, carry0, env, env_params, rollout_key,
                                episodes, max_steps)
            own_features = view_features(own, features_view, num_actions, config.activation_names)
            heldout_logits = step_logits(state.discriminator, state.norm,
                                         demo_features(state.actor, heldout), heldout.mask)
            own_logits = step_logits(state.discriminator, state.norm, own_features, own.mask)
            auroc = jax.vmap(pairwise_auroc)(episode_scores(own_logits, own.mask),
                                             episode_scores(heldout_logits, heldout.mask))

            updated, disc_loss, accuracy_demo = discriminator_update(state, own, own_features,
                                                                     disc_key)
            if config.freeze_discriminator:  # a fixed monitor: its losses are only reported
                updated = updated.replace(discriminator=state.discriminator, norm=state.norm,
                                          discriminator_opt=state.discriminator_opt)
            own_logits = step_logits(updated.discriminator, updated.norm, own_features, own.mask)
            mask = own.mask.astype(jnp.float32)
            rewards = mask * jnp.mean(jax.nn.softplus(-own_logits) if config.reward == "gail"
                                      else -own_logits, axis=0)
            # Defaults leave the imitation reward untouched, bit for bit.
            if config.discriminator_reward_coef != 1.0:
                rewards = config.discriminator_reward_coef * rewards
            if config.env_reward_coef != 0.0:
                rewards = rewards + config.env_reward_coef * mask * own.rewards
            if monitor is not None and config.monitor_reward_coef != 0.0:
                rewards = rewards - config.monitor_reward_coef * mask * monitor(own)
            updated, policy_loss, entropy = ppo_update(updated, own, rewards, ppo_key)

            finite = jnp.stack([jnp.all(jnp.isfinite(disc_loss)), jnp.isfinite(policy_loss)])
            newly_diverged = (state.diverged_at < 0) & ~jnp.all(finite)
            keep_old = (state.diverged_at >= 0) | newly_diverged
            which = jnp.where(finite[0], 2, 1)
            state = jax.tree.map(lambda old, new: jnp.where(keep_old, old, new), state, updated)
            state = state.replace(
                diverged_at=jnp.where(newly_diverged, index, state.diverged_at),
                diverged_loss=jnp.where(newly_diverged, which, state.diverged_loss),
                diverged_value=jnp.where(newly_diverged,
                                         jnp.where(finite[0], policy_loss,
                                                   _first_non_finite(disc_loss)),
                                         state.diverged_value))
            if progress is not None:
                jax.debug.callback(progress, index + 1)
            per_view = (lambda x: x[0]) if single_view else (lambda x: x)
            metrics = dict(
                discriminator_loss=per_view(disc_loss),
                discriminator_accuracy_demonstrator=per_view(accuracy_demo),
                discriminator_accuracy_imitator=per_view(
                    jnp.sum((own_logits > 0) * mask, (1, 2)) / mask.sum()),
                heldout_auroc=per_view(auroc),
                imitator_return=own.episode_returns().mean(),
                imitator_length=own.episode_lengths().mean(),
                imitator_event_rate=_event_rate(own),
                reward_mean=jnp.sum(rewards) / mask.sum(),
                policy_loss=policy_loss,
                entropy=entropy,
            )
            return state, metrics

        def blocks(state, indices, keys, block_eval_keys, evaluate_first):
            """Blocks of equal length (``indices`` is ``[blocks, length]``) scanned, each
            ending with an evaluation; with ``evaluate_first``, a first stage that runs no
            iteration and only evaluates (the evaluation before the first iteration).

            Every evaluation point of a run whose iterations are a multiple of
            ``eval_every`` is then the one call site inside the scan: XLA compiles the
            evaluation once rather than twice (a last, shorter block is a second scan).
            Where it rolls the imitator out on test layouts (``audit train-gan``) that is
            about a tenth of the program's compilation on CPU; without a test environment
            it is small. It computes what an evaluation before the scan did, on the same
            state and key; XLA may round the first evaluation's figures differently in
            their last digits (1e-6 relative).
            """
            count, length = indices.shape
            run = jnp.ones(count, bool)
            if evaluate_first:
                # The first stage's indices end at -1, so its evaluation reads iteration 0;
                # its keys are never used (no iteration runs).
                indices = jnp.concatenate([jnp.arange(-length, 0, dtype=indices.dtype)[None],
                                           indices])
                keys = jnp.concatenate([keys[:1], keys])
                block_eval_keys = jnp.concatenate([eval_key[None], block_eval_keys])
                run = jnp.concatenate([jnp.zeros(1, bool), run])
            metric_shapes = jax.eval_shape(
                lambda s, x: jax.lax.scan(iteration, s, x)[1], state, (indices[0], keys[0]))

            def stage(state, inputs):
                (stage_indices, stage_keys), stage_eval_key, stage_runs = inputs
                state, metrics = jax.lax.cond(
                    stage_runs, lambda s: jax.lax.scan(iteration, s, (stage_indices, stage_keys)),
                    lambda s: (s, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                                               metric_shapes)), state)
                return state, (metrics, dict(evaluate(state, stage_eval_key),
                                             iteration=stage_indices[-1] + 1))

            state, (metrics, evaluations) = jax.lax.scan(
                stage, state, ((indices, keys), block_eval_keys, run))
            if evaluate_first:
                metrics = jax.tree.map(lambda x: x[1:], metrics)
            return state, jax.tree.map(
                lambda x: x.reshape((count * length,) + x.shape[2:]), metrics), evaluations

        actor_key, critic_key, disc_key, bc_key, loop_key, eval_key = jax.random.split(key, 6)
        _, full, rest = block_count(config)
        partial = num_blocks is not None
        if resume is None and not partial and first_block != 0:
            raise ValueError("first_block > 0 needs the state to resume from (resume=)")
        if not partial and not (0 <= first_block < full or first_block == full and rest):
            raise ValueError(f"first_block {first_block} leaves nothing to run: the run has "
                             f"{full} full blocks and {'a' if rest else 'no'} last, shorter "
                             "one")
        if partial and not 0 < num_blocks <= full:
            raise ValueError(f"num_blocks {num_blocks} must be in [1, {full}] (full blocks)")
        if resume is None:
            if initial_actor is not None:
                actor = initial_actor
            elif config.bc_warm_start is not None:
                bc_train, _ = bc.make_train(config.bc_warm_start, make_imitator, trusted)
                actor, _ = bc_train(bc_key)
            else:
                actor = nnx.split(make_imitator(actor_key))[1]
            critic = nnx.split(make_critic(critic_key))[1]
            disc = jax.vmap(lambda k: nnx.split(new_discriminator(k))[1])(
                jax.random.split(disc_key, len(views)))
            state = GANState(actor=actor, critic=critic, discriminator=disc,
                             norm=RunningNorm.create(feature_size),
                             policy_opt=policy_optimizer.init((actor, critic)),
                             discriminator_opt=jax.vmap(disc_optimizer.init)(disc),
                             diverged_at=jnp.int32(-1), diverged_loss=jnp.int32(0),
                             diverged_value=jnp.float32(0))
        else:
            state = resume
        keys = jax.random.split(loop_key, config.iterations)
        indices = jnp.arange(config.iterations, dtype=jnp.int32)
        eval_keys = jax.random.split(jax.random.fold_in(eval_key, 1), full + 1)
        every = config.eval_every

        def cut(first, count, length):
            """``count`` blocks of ``length`` iterations from block ``first`` (which may be
            traced): their indices and keys ``[count, length, ...]`` and evaluation keys."""
            start, size = first * every, count * length
            return (jax.lax.dynamic_slice_in_dim(indices, start, size).reshape(count, length),
                    jax.lax.dynamic_slice_in_dim(keys, start, size).reshape(
                        (count, length) + keys.shape[1:]),
                    jax.lax.dynamic_slice_in_dim(eval_keys, first, count))

        if partial:  # full blocks from a first_block that may be traced
            segments = [(first_block, num_blocks, every)]
        else:  # from first_block to the end: the full blocks, then the last, shorter one
            segments = [(first_block, full - first_block, every)] if first_block < full else []
            segments += [(full, 1, rest)] if rest else []
        chunks = []
        # The evaluation before the first iteration, when this call starts the run: the
        # first stage of the first scan over blocks it makes.
        evaluate_first = resume is None
        for first, count, length in segments:
            state, metrics, evaluations = blocks(state, *cut(first, count, length),
                                                 evaluate_first)
            chunks.append((metrics, evaluations))
            evaluate_first = False
        metrics = jax.tree.map(lambda *x: jnp.concatenate(x), *[c[0] for c in chunks])
        evaluations = jax.tree.map(lambda *x: jnp.concatenate(x), *[c[1] for c in chunks])
        if not partial:
            state = unstacked_state(state, config)
        return state, metrics, evaluations

    return train, GANModules(actor_def, critic_def, disc_def, views, features_view, view_masks)


def unstacked_state(state: GANState, config: GANConfig) -> GANState:
    """``state`` in the form a finished run returns it.

    During a run the discriminators of every view are stacked on a leading axis, also
    when ``config.view`` names a single view; a finished single-view run returns its one
    discriminator without that axis. A partial run (``num_blocks``) returns the stacked
    form, to be resumed; a caller that stops one early (a divergence) unstacks it here.
    """
    if not isinstance(config.view, str):
        return state
    return state.replace(
        discriminator=jax.tree.map(lambda x: x[0], state.discriminator),
        discriminator_opt=jax.tree.map(lambda x: x[0], state.discriminator_opt))


def block_count(config: GANConfig) -> tuple[int, int, int]:
    """``(blocks, full, rest)``: a run is cut into blocks of ``eval_every`` iterations,
    each ending with an evaluation; ``full`` blocks of ``eval_every`` and, if ``rest`` >
    0, a last one of ``rest`` iterations."""
    full, rest = divmod(config.iterations, config.eval_every)
    return full + (1 if rest else 0), full, rest


def _first_non_finite(values: jax.Array) -> jax.Array:
    """The first non-finite entry of ``values`` (the first entry if all are finite)."""
    return values[jnp.argmax(~jnp.isfinite(values))]


def _event_rate(trajectories: Trajectories) -> jax.Array:
    """Share of episodes with at least one hidden incorrigible event (code > 0)."""
    return jnp.mean(jnp.any((trajectories.events > 0) & trajectories.mask, axis=1))


def check_divergence(state: GANState, context: str = "training") -> None:
    """Raises :class:`DivergenceError` if ``state`` records a non-finite loss.

    The message names the iteration and the loss; ``state`` itself holds the last
    good parameters (those before that iteration), for saving.

    Args:
      state: one run's final state (no seed axis).
      context: what ran, for the message (e.g. which organism was co-trained).
    """
    at = np.asarray(state.diverged_at)
    if at.ndim:
        raise ValueError("check_divergence takes one run's state; index the seed axis first")
    if at >= 0:
        loss = LOSS_NAMES[int(state.diverged_loss)]
        raise DivergenceError(
            f"{context} diverged at iteration {int(at)}: {loss} was "
            f"{float(state.diverged_value)}; the state kept is the last good one, from "
            f"before iteration {int(at)}")

