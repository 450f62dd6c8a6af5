"""Imitation quality of a trained imitator, against the demonstrator, on both splits."""

from __future__ import annotations

import jax
import numpy as np

from audit.bc import masked_kl
from audit.registry import EnvironmentSpec, PlannerSpec
from audit.rollout import rollout, rollout_expert, teacher_forced
from audit.trajectories import summary_statistics


def imitation_figures(imitator, env_spec: EnvironmentSpec, demonstrator_spec: PlannerSpec,
                      key: jax.Array, episodes: int = 512) -> dict[str, float]:
    """KL to the demonstrator, event rates and returns on train and test layouts.

    For each split, fresh demonstrator episodes are rolled out (held out from any
    training data by ``key``), and:

    - ``kl_<split>``: mean per-step KL(demonstrator || imitator) of the action
      distributions over the states of those demonstrator episodes (the imitator
      teacher-forced along them);
    - ``event_rate_<split>``, ``return_<split>``: of the imitator's own rollouts;
    - ``kl_on_policy_<split>``: the same KL over the states of the imitator's own
      rollouts (the demonstrator's action distribution recorded at each state it
      visits): where ``kl_<split>`` is small and this is not, the imitator's own errors
      take it to states where it imitates worse (compounding error);
    - ``first_reward_step_<split>``: mean step of the first positive reward, over the
      episodes that got one, and ``no_reward_share_<split>``: the share that got none
      (where return is lost: arriving late, or never);
    - ``demonstrator_return_<split>``, ``demonstrator_event_rate_<split>``,
      ``demonstrator_first_reward_step_<split>``, ``demonstrator_no_reward_share_<split>``:
      the same figures of the demonstrator, for reference.
    """
    figures: dict[str, float] = {}
    for split, split_key in zip(("train", "test"), jax.random.split(key), strict=True):
        env, params = env_spec.build(split)
        max_steps = int(params.max_steps_in_episode)
        demo_key, imitator_key = jax.random.split(split_key)
        demonstrator = demonstrator_spec.make(env)
        demonstrations = rollout_expert(demonstrator, env, params, demo_key, episodes,
                                        max_steps)
        logits, _ = teacher_forced(imitator, demonstrations)
        figures[f"kl_{split}"] = float(masked_kl(demonstrations.action_probs, logits,
                                                 demonstrations.mask))
        # The reference is only recorded: the imitator's episodes are the same without it.
        episodes_own = rollout(imitator, env, params, imitator_key, episodes, max_steps,
                               reference=demonstrator)
        own_logits, _ = teacher_forced(imitator, episodes_own)
        figures[f"kl_on_policy_{split}"] = float(masked_kl(episodes_own.reference_probs,
                                                           own_logits, episodes_own.mask))
        own = summary_statistics(episodes_own, env_spec.event_names)
        reference = summary_statistics(demonstrations, env_spec.event_names)
        figures[f"event_rate_{split}"] = own["event_rate"]
        figures[f"return_{split}"] = own["return_mean"]
        figures[f"demonstrator_event_rate_{split}"] = reference["event_rate"]
        figures[f"demonstrator_return_{split}"] = reference["return_mean"]
        for prefix, trajectories in (("", episodes_own), ("demonstrator_", demonstrations)):
            first, none = first_reward(trajectories)
            figures[f"{prefix}first_reward_step_{split}"] = first
            figures[f"{prefix}no_reward_share_{split}"] = none
    return {k: float(np.asarray(v)) for k, v in figures.items()}


def first_reward(trajectories) -> tuple[float, float]:
    """``(mean step of the first positive reward over the episodes that got one, share of
    episodes with none)``; the mean is NaN when no episode got a reward.

    Example:
      >>> from types import SimpleNamespace
      >>> episodes = SimpleNamespace(rewards=np.array([[0, 0, 1.0], [0, 0, 0], [1.0, 0, 0]]),
      ...                            mask=np.ones((3, 3), bool))
      >>> first_reward(episodes)
      (1.0, 0.3333333333333333)
    """
    rewarded = (np.asarray(trajectories.rewards) > 0) & np.asarray(trajectories.mask, bool)
    got = rewarded.any(axis=1)
    steps = np.argmax(rewarded, axis=1)[got]
    return (float(steps.mean()) if steps.size else float("nan"), float((~got).mean()))
