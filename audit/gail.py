"""Streaming GAIL: PPO on a per-step discriminator's reward, in purejaxrl's shape.

The framework has two adversarial-imitation loops; this one serves a single purpose:

- :mod:`audit.gan` plays whole episodes padded to the demonstrations' length, so
  that a discriminator may read an episode as a sequence on any view (activation
  views included) and recurrent imitators train through time; every audit uses it:
  the audit protocols' co-training (:func:`audit.protocol.run_suite`, ``audit
  bench``), ``audit train-gan`` and ``python -m benchmarks.perf.gan``;
- this module is the throughput-oriented variant for per-step discriminators on the
  ``actions`` or ``transitions`` view (:data:`STEP_VIEWS`) and feed-forward
  imitators: ``num_envs`` environments with auto-reset
  (:func:`audit.vector.make_batched_step`) each stream ``num_steps`` steps per
  round, so every computed transition is a real one (no padding). It is used by the
  side-by-side comparison with HumanCompatibleAI ``imitation``
  (:mod:`benchmarks.perf.compare`, ``python -m benchmarks.perf.compare``), whose
  ``AdversarialTrainer`` it mirrors round for round, and by nothing in the audit.

Both take their PPO update settings from :class:`audit.ppo.PPOSettings`
(``GAILConfig.ppo`` here, ``GANConfig.ppo`` there); only how a round's data is cut
into minibatches is each loop's own (``minibatch_size`` transitions here,
``ppo_minibatches`` of whole episodes there).

Each round, inside one ``lax.scan`` (the run jits and vmaps over seeds):

1. **collect**: the imitator acts in every environment for ``num_steps`` steps
   (inverse-CDF draws on explicit uniforms, as everywhere in the framework);
2. **reward**: the current discriminator scores each imitator transition on the
   configured view; GAIL's reward is ``softplus(-logit) = -log D(imitator)``
   (logits are positive for "imitator", as in :mod:`audit.discriminator`);
3. **PPO update**: ``ppo.update_epochs`` passes of minibatches over the round's
   transitions (:func:`audit.ppo.generalized_advantages`,
   :func:`audit.ppo.clipped_objective`, :func:`audit.ppo.make_optimizer`);
4. **discriminator update**: ``discriminator_updates`` Adam steps of
   :func:`audit.discriminator.gan_loss`, each on ``discriminator_batch``
   demonstrated and ``discriminator_batch`` freshly generated transitions, with
   features standardised by running statistics of both classes.

This is the order of HumanCompatibleAI ``imitation``'s ``AdversarialTrainer``
(generator round with the reward of the discriminator as it stands, then the
discriminator updates on that round's samples), so the two can be compared
round for round. The environment's reward is never used for learning; the mean
true return of the episodes that ended in a round is reported.

Example:
  >>> train, modules = make_train(GAILConfig(rounds=100), env, env_params, make_actor,
  ...                             make_critic, make_discriminator, demonstrations)
  >>> state, metrics = jax.jit(jax.vmap(train))(jax.random.split(key, 64))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from audit import discriminator, ppo
from audit.modules import abstract_module, initial_carry_of, scan_updates
from audit.ppo import PPOSettings
from audit.rollout import inverse_cdf_sample
from audit.trajectories import Trajectories, validate
from audit.vector import make_batched_step
from audit.views import RunningNorm, check_view, feature_layout, view_features

REWARDS = ("gail", "logit")
STEP_VIEWS = ("actions", "transitions")


@dataclasses.dataclass(frozen=True)
class GAILConfig:
    """Streaming-GAIL hyperparameters.

    Attributes:
      num_envs: parallel environments per seed.
      num_steps: steps per environment per round; a round has ``num_envs *
        num_steps`` transitions.
      rounds: rounds (collect, reward, PPO update, discriminator update).
      ppo: the actor's and critic's PPO update settings (``update_epochs`` passes over
        each round's transitions, discount, GAE, clipping, loss weights, Adam learning
        rate, annealed linearly to 0 over the run if ``anneal_lr``); by default
        :class:`audit.ppo.PPOSettings`' defaults (4 epochs, learning rate 3e-4 not
        annealed, no entropy bonus).
      minibatch_size: transitions per PPO minibatch (stable-baselines3's
        ``batch_size``); must divide ``num_envs * num_steps``.
      view: the discriminator's per-step view, ``actions`` or ``transitions``.
      normalize_features: standardise discriminator features by running statistics.
      reward: ``gail``: ``softplus(-logit)``; ``logit``: ``-logit``.
      discriminator_updates: discriminator Adam steps per round.
      discriminator_batch: transitions of each class per discriminator step.
      discriminator_learning_rate: its Adam learning rate.
      discriminator_max_grad_norm: its gradient-norm clip (None: none).
      label_smoothing: the GAN loss's label smoothing.
      gradient_penalty: the GAN loss's R1 penalty weight.
    """

    num_envs: int = 8
    num_steps: int = 128
    rounds: int = 100
    ppo: PPOSettings = PPOSettings()
    minibatch_size: int = 256
    view: str = "transitions"
    normalize_features: bool = True
    reward: str = "gail"
    discriminator_updates: int = 4
    discriminator_batch: int = 512
    discriminator_learning_rate: float = 3e-4
    discriminator_max_grad_norm: float | None = None
    label_smoothing: float = 0.0
    gradient_penalty: float = 0.0

    def __post_init__(self):
        for name in ("num_envs", "num_steps", "rounds", "minibatch_size",
                     "discriminator_updates", "discriminator_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GAILConfig.{name} must be an int >= 1, got {value!r}")
        if self.transitions_per_round % self.minibatch_size:
            raise ValueError(f"GAILConfig.minibatch_size ({self.minibatch_size}) must divide "
                             f"num_envs * num_steps ({self.transitions_per_round})")
        if not isinstance(self.ppo, PPOSettings):
            raise ValueError(f"GAILConfig.ppo must be a PPOSettings, got {self.ppo!r}")
        if not self.discriminator_learning_rate > 0:
            raise ValueError("GAILConfig.discriminator_learning_rate must be > 0, got "
                             f"{self.discriminator_learning_rate!r}")
        clip = self.discriminator_max_grad_norm
        if clip is not None and not clip > 0:
            raise ValueError("GAILConfig.discriminator_max_grad_norm must be > 0 or None, got "
                             f"{clip!r}")
        if not self.gradient_penalty >= 0:
            raise ValueError("GAILConfig.gradient_penalty must be >= 0, got "
                             f"{self.gradient_penalty!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError("GAILConfig.label_smoothing must be in [0, 1), got "
                             f"{self.label_smoothing!r}")
        if self.view not in STEP_VIEWS:
            check_view(self.view)  # an unknown name gets the list of all views
            raise ValueError(f"GAILConfig.view {self.view!r} needs activations, which streaming "
                             f"GAIL does not record; choose from: {', '.join(STEP_VIEWS)}")
        if self.reward not in REWARDS:
            raise ValueError(f"GAILConfig.reward {self.reward!r} is unknown; choose from: "
                             f"{', '.join(REWARDS)}")

    @property
    def transitions_per_round(self) -> int:
        """Environment transitions per round and seed."""
        return self.num_envs * self.num_steps

    @property
    def transitions(self) -> int:
        """Environment transitions of a whole run, per seed (all real: nothing is padding)."""
        return self.rounds * self.transitions_per_round

    @property
    def num_minibatches(self) -> int:
        """PPO minibatches per epoch: ``transitions_per_round // minibatch_size``."""
        return self.transitions_per_round // self.minibatch_size


@struct.dataclass
class GAILState:
    """Everything a run carries from one round to the next (and returns)."""

    actor: Any
    critic: Any
    discriminator: Any
    norm: RunningNorm
    policy_opt: Any
    discriminator_opt: Any
    obs: jax.Array
    env_states: Any
    running_return: jax.Array


class GAILModules(NamedTuple):
    """The graphdefs that rebuild the modules (``nnx.merge(modules.actor, state.actor)``)."""

    actor: Any
    critic: Any
    discriminator: Any


class GAILStages(NamedTuple):
    """The pure stages one round is made of, exposed for profiling and tests.

    Attributes:
      init: ``key -> GAILState``.
      act: ``(actor, critic, obs [N, ...], key) -> (action, log_prob, value)``, one
        step of every environment's policy and value (no environment step).
      step_envs: the batched auto-reset ``step(keys, states, actions, params)``.
      collect: ``(state, key) -> (state, batch)``, ``batch`` of ``[T, N]`` arrays.
      rewards: ``(state, batch) -> [T, N]`` discriminator rewards.
      ppo_update: ``(state, batch, rewards, key) -> (state, metrics)``.
      discriminator_update: ``(state, batch, key) -> (state, metrics)``.
      round: ``(state, key) -> (state, metrics)``, the four above in order.
      ppo_loss: ``((actor, critic), minibatch) -> (loss, entropy)``, the loss each PPO
        minibatch step differentiates (for counting a step's FLOPs).
      policy_optimizer: the optax transformation of the actor and critic.
    """

    init: Callable
    act: Callable
    step_envs: Callable
    collect: Callable
    rewards: Callable
    ppo_update: Callable
    discriminator_update: Callable
    round: Callable
    ppo_loss: Callable
    policy_optimizer: optax.GradientTransformation


def flatten_demonstrations(demonstrations: Trajectories | Mapping[str, Any]
                           ) -> tuple[np.ndarray, np.ndarray]:
    """``(observations [N, ...], actions [N])`` of the demonstrated steps.

    Args:
      demonstrations: padded episodes (:class:`Trajectories`; only steps inside the
        episodes are kept) or a mapping with flat ``observations`` and ``actions``.

    Raises:
      ValueError: if the trajectories are malformed, the mapping lacks a key, the
        two disagree in length, or there are no steps.
    """
    if isinstance(demonstrations, Trajectories):
        validate(demonstrations, "demonstrations")
        mask = np.asarray(demonstrations.mask, bool)
        observations = np.asarray(demonstrations.observations)[mask]
        actions = np.asarray(demonstrations.actions)[mask]
    else:
        missing = [k for k in ("observations", "actions") if k not in demonstrations]
        if missing:
            raise ValueError(f"demonstrations lack {', '.join(missing)}")
        observations = np.asarray(demonstrations["observations"])
        actions = np.asarray(demonstrations["actions"])
    if len(observations) != len(actions) or len(actions) == 0:
        raise ValueError(f"demonstrations need as many observations as actions, at least one; "
                         f"got {len(observations)} and {len(actions)}")
    return observations, actions.astype(np.int32)


def make_stages(config: GAILConfig, env, env_params,
                make_actor: Callable[[jax.Array], nnx.Module],
                make_critic: Callable[[jax.Array], nnx.Module],
                make_discriminator: Callable[[jax.Array, int], nnx.Module],
                demonstrations: Trajectories | Mapping[str, Any]
                ) -> tuple[GAILStages, GAILModules]:
    """Builds the pure stages of a streaming-GAIL round (see :func:`make_train`).

    Returns:
      ``(stages, modules)``.
    """
    demo_obs, demo_actions = flatten_demonstrations(demonstrations)
    observation_shape = tuple(env.observation_space(env_params).shape)
    if tuple(demo_obs.shape[1:]) != observation_shape:
        raise ValueError(f"demonstrations have observations of shape {demo_obs.shape[1:]}; "
                         f"the environment's are {observation_shape}")
    demo_obs, demo_actions = jnp.asarray(demo_obs), jnp.asarray(demo_actions)
    demo_count = demo_actions.shape[0]
    num_actions = env.num_actions
    num_envs, num_steps = config.num_envs, config.num_steps
    batch_size = config.transitions_per_round

    actor_def, abstract_actor = abstract_module(make_actor)
    carry0 = initial_carry_of(actor_def, abstract_actor)
    critic_def, _ = abstract_module(make_critic)

    def one_step_episodes(observations, actions) -> Trajectories:
        flat_obs = observations.reshape((-1, 1) + observation_shape)
        flat_actions = actions.reshape(-1, 1)
        zeros = jnp.zeros(flat_actions.shape)
        # view_features reads episodes [B, T]: each transition is a one-step episode;
        # the fields it does not read are placeholders that XLA drops.
        return Trajectories(observations=flat_obs, actions=flat_actions, rewards=zeros,
                            dones=zeros.astype(bool), mask=jnp.ones(flat_actions.shape, bool),
                            events=zeros.astype(jnp.int32), noise=zeros,
                            action_probs=jnp.zeros(flat_actions.shape + (num_actions,)))

    def features(observations, actions):
        """``[..., F]`` view features of transitions with any leading shape."""
        lead = actions.shape
        out = view_features(one_step_episodes(observations, actions), config.view, num_actions)
        return out.reshape(lead + (out.shape[-1],))

    feature_size = jax.eval_shape(features, demo_obs[:1], demo_actions[:1]).shape[-1]
    # A maker that takes the features' layout is given it (each transition is a one-step
    # episode, so a discriminator reading the next step, such as airl, sees none).
    layout = feature_layout(jax.eval_shape(one_step_episodes, demo_obs[:1], demo_actions[:1]),
                            config.view, num_actions)

    def new_discriminator(key):
        return discriminator.build_discriminator(make_discriminator, key, feature_size, layout)

    disc_def, disc_abstract = abstract_module(new_discriminator)
    raw_mask = discriminator.raw_feature_mask(nnx.merge(disc_def, disc_abstract), feature_size)
    loss_config = discriminator.DiscriminatorConfig(
        updates=config.discriminator_updates, batch_episodes=config.discriminator_batch,
        learning_rate=config.discriminator_learning_rate,
        label_smoothing=config.label_smoothing, gradient_penalty=config.gradient_penalty)
    disc_optimizer = optax.adam(config.discriminator_learning_rate)
    if config.discriminator_max_grad_norm is not None:
        disc_optimizer = optax.chain(
            optax.clip_by_global_norm(config.discriminator_max_grad_norm), disc_optimizer)

    settings = config.ppo
    policy_optimizer = ppo.make_optimizer(settings, config.num_minibatches, config.rounds)
    step_envs = make_batched_step(env, reset_budget=num_envs)

    def logits_of(actor, observations):
        return ppo.feedforward_logits(actor_def, actor, carry0, observations)

    def values_of(critic, observations):
        return ppo.critic_values(critic_def, critic, observations)

    def normalize(norm, x):
        if not config.normalize_features:
            return x
        return discriminator.standardize(norm, x, raw_mask)

    def step_logits(disc, norm, x):
        """``[B]`` logits of ``[B, F]`` features (one-step episodes for score_episodes)."""
        return discriminator.score_episodes(disc_def, disc, normalize(norm, x)[:, None],
                                            jnp.ones((x.shape[0], 1), bool))[:, 0]

    def init(key) -> GAILState:
        actor_key, critic_key, disc_key, reset_key = jax.random.split(key, 4)
        actor = nnx.split(make_actor(actor_key))[1]
        critic = nnx.split(make_critic(critic_key))[1]
        disc = nnx.split(new_discriminator(disc_key))[1]
        obs, env_states = jax.vmap(env.reset, (0, None))(
            jax.random.split(reset_key, num_envs), env_params)
        return GAILState(actor=actor, critic=critic, discriminator=disc,
                         norm=RunningNorm.create(feature_size),
                         policy_opt=policy_optimizer.init((actor, critic)),
                         discriminator_opt=disc_optimizer.init(disc), obs=obs,
                         env_states=env_states, running_return=jnp.zeros(num_envs))

    def act(actor, critic, obs, key):
        logits = logits_of(actor, obs)
        noise = jax.random.uniform(key, (obs.shape[0],))
        action = inverse_cdf_sample(logits, noise)
        log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], 1)[:, 0]
        return action, log_prob, values_of(critic, obs)

    def collect(state: GAILState, key) -> tuple[GAILState, dict]:
        def env_step(carry, key):
            obs, env_states, running_return = carry
            act_key, step_key = jax.random.split(key)
            action, log_prob, value = act(state.actor, state.critic, obs, act_key)
            next_obs, env_states, true_reward, terminated, truncated, _ = step_envs(
                jax.random.split(step_key, num_envs), env_states, action, env_params)
            done = terminated | truncated
            running_return = running_return + true_reward
            record = dict(obs=obs, action=action, log_prob=log_prob, value=value, done=done,
                          finished_return=jnp.where(done, running_return, 0.0))
            return (next_obs, env_states, jnp.where(done, 0.0, running_return)), record

        (obs, env_states, running_return), batch = jax.lax.scan(
            env_step, (state.obs, state.env_states, state.running_return),
            jax.random.split(key, num_steps))
        return state.replace(obs=obs, env_states=env_states,
                             running_return=running_return), batch

    def rewards(state: GAILState, batch: dict) -> jax.Array:
        x = features(batch["obs"], batch["action"]).reshape(batch_size, feature_size)
        logits = step_logits(state.discriminator, state.norm, x).reshape(num_steps, num_envs)
        return jax.nn.softplus(-logits) if config.reward == "gail" else -logits

    def ppo_loss(params, minibatch):
        actor, critic = params
        log_probs = jax.nn.log_softmax(logits_of(actor, minibatch["obs"]))
        return ppo.clipped_objective(settings, log_probs, minibatch,
                                     values_of(critic, minibatch["obs"]),
                                     jnp.ones(minibatch["action"].shape, jnp.float32))

    def ppo_update(state: GAILState, batch: dict, step_rewards, key) -> tuple[GAILState, dict]:
        advantages, returns = ppo.generalized_advantages(
            step_rewards, batch["value"], batch["done"], values_of(state.critic, state.obs),
            settings.gamma, settings.gae_lambda)
        flat = {k: v.reshape((batch_size,) + v.shape[2:]) for k, v in dict(
            obs=batch["obs"], action=batch["action"], log_prob=batch["log_prob"],
            value=batch["value"], advantage=advantages, **{"return": returns}).items()}

        def epoch(carry, key):
            params, opt_state = carry
            order = jax.random.permutation(key, batch_size).reshape(config.num_minibatches,
                                                                    config.minibatch_size)
            params, opt_state, (losses, entropies) = scan_updates(
                lambda p, index: ppo_loss(p, jax.tree.map(lambda x: x[index], flat)),
                policy_optimizer, params, opt_state, order, has_aux=True)
            return (params, opt_state), (losses, entropies)

        (params, opt_state), (losses, entropies) = jax.lax.scan(
            epoch, ((state.actor, state.critic), state.policy_opt),
            jax.random.split(key, settings.update_epochs))
        return (state.replace(actor=params[0], critic=params[1], policy_opt=opt_state),
                dict(policy_loss=losses.mean(), entropy=entropies.mean()))

    def discriminator_update(state: GAILState, batch: dict, key) -> tuple[GAILState, dict]:
        demo_key, own_key = jax.random.split(key)
        shape = (config.discriminator_updates, config.discriminator_batch)
        # Sampled with replacement, as imitation's generator replay buffer does.
        demo_index = jax.random.randint(demo_key, shape, 0, demo_count)
        own_index = jax.random.randint(own_key, shape, 0, batch_size)
        demo_x = features(demo_obs[demo_index], demo_actions[demo_index])
        own_x = features(batch["obs"].reshape((batch_size,) + observation_shape)[own_index],
                         batch["action"].reshape(batch_size)[own_index])
        ones = jnp.ones(shape, bool)
        # All of the round's discriminator batches enter the running statistics first.
        norm = state.norm.update(demo_x, ones).update(own_x, ones)

        def loss_fn(disc, inputs):
            demo, own = (normalize(norm, x)[:, None] for x in inputs)
            mask = jnp.ones(demo.shape[:2], bool)
            return discriminator.gan_loss(disc_def, disc, demo, mask, own, mask, loss_config)

        disc, disc_opt, losses = scan_updates(loss_fn, disc_optimizer, state.discriminator,
                                              state.discriminator_opt, (demo_x, own_x))
        metrics = dict(
            discriminator_loss=losses.mean(),
            discriminator_accuracy_demonstrator=jnp.mean(
                step_logits(disc, norm, demo_x[-1]) < 0),
            discriminator_accuracy_imitator=jnp.mean(step_logits(disc, norm, own_x[-1]) > 0))
        return state.replace(discriminator=disc, discriminator_opt=disc_opt, norm=norm), metrics

    def one_round(state: GAILState, key) -> tuple[GAILState, dict]:
        collect_key, ppo_key, disc_key = jax.random.split(key, 3)
        state, batch = collect(state, collect_key)
        step_rewards = rewards(state, batch)
        state, ppo_metrics = ppo_update(state, batch, step_rewards, ppo_key)
        state, disc_metrics = discriminator_update(state, batch, disc_key)
        ended = batch["done"].sum()
        metrics = dict(
            episode_return=jnp.where(ended > 0, batch["finished_return"].sum()
                                     / jnp.maximum(ended, 1), jnp.nan),
            episodes=ended, reward_mean=step_rewards.mean(), **ppo_metrics, **disc_metrics)
        return state, metrics

    stages = GAILStages(init=init, act=act, step_envs=step_envs, collect=collect,
                        rewards=rewards, ppo_update=ppo_update,
                        discriminator_update=discriminator_update, round=one_round,
                        ppo_loss=ppo_loss, policy_optimizer=policy_optimizer)
    return stages, GAILModules(actor_def, critic_def, disc_def)


def make_train(config: GAILConfig, env, env_params,
               make_actor: Callable[[jax.Array], nnx.Module],
               make_critic: Callable[[jax.Array], nnx.Module],
               make_discriminator: Callable[[jax.Array, int], nnx.Module],
               demonstrations: Trajectories | Mapping[str, Any]):
    """Builds the pure streaming-GAIL run.

    Args:
      config: hyperparameters.
      env: a gymnax environment with discrete actions.
      env_params: its parameters.
      make_actor: ``key -> imitator`` (feed-forward: the carry is not threaded).
      make_critic: ``key -> critic`` (``critic(observation) -> value``).
      make_discriminator: ``(key, feature_size) -> discriminator``; it is called on
        one-step episodes, so only per-step discriminators make sense here. A maker that
        also takes ``layout=`` is given the view's :class:`audit.views.FeatureLayout`.
      demonstrations: demonstrator episodes (:class:`Trajectories`) or flat
        ``{"observations": [N, ...], "actions": [N]}``.

    Returns:
      ``(train, modules)``: ``train(key) -> (state, metrics)`` is pure, jittable and
      vmappable over keys; ``state`` is the final :class:`GAILState` and
      ``metrics`` has ``[rounds]`` arrays (``episode_return``, the mean true return
      of the episodes that ended in the round, NaN if none; ``episodes``,
      ``reward_mean``, ``policy_loss``, ``entropy``, ``discriminator_loss``,
      ``discriminator_accuracy_demonstrator``, ``discriminator_accuracy_imitator``).
      Each seed computes exactly ``config.transitions`` environment transitions.

    Raises:
      ValueError: if the demonstrations are malformed or do not fit ``env``.
    """
    stages, modules = make_stages(config, env, env_params, make_actor, make_critic,
                                  make_discriminator, demonstrations)

    def train(key):
        init_key, loop_key = jax.random.split(key)
        return jax.lax.scan(stages.round, stages.init(init_key),
                            jax.random.split(loop_key, config.rounds))

    return train, modules
