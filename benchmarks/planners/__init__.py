"""Exact planners: the corrigible demonstrator and incorrigible ground-truth planners."""

from benchmarks.planners.presets import CONFIGS, INCORRIGIBLE_HOME_ENV
from benchmarks.planners.value_iteration import (
    Planner,
    PlannerConfig,
    policy_logits,
    q_values,
    solve_layouts,
)

__all__ = ["CONFIGS", "INCORRIGIBLE_HOME_ENV", "Planner", "PlannerConfig", "policy_logits",
           "q_values", "solve_layouts"]
