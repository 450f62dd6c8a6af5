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
    - ``demonstrator_return_<split>``, ``demonstrator_event_rate_<split>``: the same
      figures of the demonstrator, for reference.
    """
    figures: dict[str, float] = {}
    for split, split_key in zip(("train", "test"), jax.random.split(key), strict=True):
        env, params = env_spec.build(split)
        max_steps = int(params.max_steps_in_episode)
        demo_key, imitator_key = jax.random.split(split_key)
        demonstrations = rollout_expert(demonstrator_spec.make(env), env, params, demo_key,
                                        episodes, max_steps)
        logits, _ = teacher_forced(imitator, demonstrations)
        figures[f"kl_{split}"] = float(masked_kl(demonstrations.action_probs, logits,
                                                 demonstrations.mask))
        own = summary_statistics(rollout(imitator, env, params, imitator_key, episodes,
                                         max_steps), env_spec.event_names)
        reference = summary_statistics(demonstrations, env_spec.event_names)
        figures[f"event_rate_{split}"] = own["event_rate"]
        figures[f"return_{split}"] = own["return_mean"]
        figures[f"demonstrator_event_rate_{split}"] = reference["event_rate"]
        figures[f"demonstrator_return_{split}"] = reference["return_mean"]
    return {k: float(np.asarray(v)) for k, v in figures.items()}
