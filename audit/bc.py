"""Behaviour cloning: ``make_train(config, ...) -> train(key)``, pure and vmappable over seeds.

The whole run is one ``lax.scan`` over updates; minibatches of whole episodes are
drawn on device, so recurrent imitators see their episodes in order. The loss is
the masked mean per-step cross-entropy between the demonstrator's action
distribution and the imitator's: with ``soft_targets`` the recorded
``action_probs`` (exact for simulated demonstrators), otherwise the one-hot actions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from audit.modules import abstract_module, initial_carry_of, scan_updates
from audit.rollout import unroll, unroll_steps_at_once
from audit.trajectories import Trajectories, validate


@dataclasses.dataclass(frozen=True)
class BCConfig:
    """Behaviour-cloning hyperparameters.

    Attributes:
      updates: gradient updates.
      batch_episodes: episodes per minibatch.
      learning_rate: Adam learning rate.
      max_grad_norm: global gradient-norm clip.
      soft_targets: fit the recorded action distributions instead of the actions.
      steps_at_once: teacher-force each minibatch in two passes
        (:func:`audit.rollout.unroll_steps_at_once`: the carries by a scan, then the
        network over every step at once) instead of one step at a time. Faster for an
        imitator whose carry does not come from its network (on 2 CPU cores: the MLP
        imitator 2x, a quick suite's organisms 27.5 s -> 21 s an environment), slower
        for a recurrent one; the same function, summed in another order, so the
        trained weights differ in their last bits and, after many updates, in what
        they do. Off by default: every documented figure was measured without it.
    """

    updates: int = 1000
    batch_episodes: int = 32
    learning_rate: float = 1e-3
    max_grad_norm: float = 1.0
    soft_targets: bool = True
    steps_at_once: bool = False

    def __post_init__(self):
        for name in ("updates", "batch_episodes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"BCConfig.{name} must be an int >= 1, got "
                                 f"{getattr(self, name)!r}")
        for name in ("soft_targets", "steps_at_once"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BCConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("learning_rate", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"BCConfig.{name} must be > 0, got {getattr(self, name)!r}")


def action_targets(trajectories: Trajectories, soft: bool) -> jax.Array:
    """``[B, T, A]`` target distributions: recorded probabilities or one-hot actions."""
    if soft:
        return trajectories.action_probs
    return jax.nn.one_hot(trajectories.actions, trajectories.action_probs.shape[-1])


def masked_cross_entropy(logits, targets, mask) -> jax.Array:
    """Mean over valid steps of ``-sum_a target_a log softmax(logits)_a``."""
    log_probs = jax.nn.log_softmax(logits)
    per_step = -jnp.sum(jnp.where(targets > 0, targets * log_probs, 0.0), axis=-1)
    return jnp.sum(per_step * mask) / jnp.maximum(jnp.sum(mask), 1)


def masked_kl(target_probs, logits, mask) -> jax.Array:
    """Mean over valid steps of KL(target || softmax(logits)), in nats."""
    log_probs = jax.nn.log_softmax(logits)
    safe_target = jnp.where(target_probs > 0, target_probs, 1.0)
    per_step = jnp.sum(
        jnp.where(target_probs > 0, target_probs * (jnp.log(safe_target) - log_probs), 0.0),
        axis=-1,
    )
    return jnp.sum(per_step * mask) / jnp.maximum(jnp.sum(mask), 1)


def make_train(config: BCConfig, make_imitator: Callable[[jax.Array], nnx.Module],
               demonstrations: Trajectories, progress: Callable[[int], None] | None = None):
    """Builds the pure behaviour-cloning run.

    Args:
      config: hyperparameters.
      make_imitator: ``key -> imitator`` (a fresh NNX module).
      demonstrations: the demonstrator's trajectories (train split).
      progress: optional host callback, called with the number of updates done
        about every 1% of the run (for a progress bar; the run stays one scan).

    Returns:
      ``(train, graphdef)``: ``train(key, demonstrations=None, initial_params=None) ->
      (params, losses [updates])`` is pure, jittable and vmappable over keys;
      ``nnx.merge(graphdef, params)`` rebuilds the imitator. ``demonstrations``
      replaces the ones given here (same shapes), so one compiled run can clone several
      datasets, e.g. vmapped over a stacked batch of them; ``initial_params`` (the
      imitator's full state) replaces the fresh start.

    Example:
      >>> train, graphdef = make_train(BCConfig(updates=500), make_mlp, demos)
      >>> params, losses = jax.jit(jax.vmap(train))(jax.random.split(key, 4))  # 4 seeds
    """
    validate(demonstrations, "demonstrations")
    default_data = demonstrations.replace(activations={})
    episodes = demonstrations.num_episodes
    batch = min(config.batch_episodes, episodes)
    graphdef, abstract_params = abstract_module(make_imitator)
    initial_carry = initial_carry_of(graphdef, abstract_params)
    optimizer = optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                            optax.adam(config.learning_rate))

    teacher_force = unroll_steps_at_once if config.steps_at_once else unroll

    def loss_fn(params, inputs, data: Trajectories):
        _, key = inputs
        index = jax.random.choice(key, episodes, (batch,), replace=False)
        picked = jax.tree.map(lambda x: x[index], data)
        logits, _ = teacher_force(graphdef, params, initial_carry, picked.observations,
                                  picked.noise)
        return masked_cross_entropy(logits, action_targets(picked, config.soft_targets),
                                    picked.mask)

    def report(inputs):
        step, _ = inputs
        every = max(1, config.updates // 100)
        jax.lax.cond((step + 1) % every == 0,
                     lambda: jax.debug.callback(progress, step + 1), lambda: None)

    def train(key, demonstrations: Trajectories | None = None, initial_params=None):
        data = demonstrations if demonstrations is not None else default_data
        init_key, batch_key = jax.random.split(key)
        params = (nnx.split(make_imitator(init_key))[1] if initial_params is None
                  else initial_params)
        params, _, losses = scan_updates(
            lambda p, inputs: loss_fn(p, inputs, data), optimizer, params,
            optimizer.init(params),
            (jnp.arange(config.updates), jax.random.split(batch_key, config.updates)),
            on_step=report if progress is not None else None)
        return params, losses

    return train, graphdef
