"""Safety gridworlds with hidden incorrigibility events (gymnax environments)."""

from benchmarks.envs.gridworld import (
    ACTION_NAMES,
    EVENT_NAMES,
    OBS_CHANNELS,
    SPLITS,
    GridParams,
    GridState,
    GridWorld,
    Layout,
    TabularModel,
)
from benchmarks.envs.offswitch import OffSwitch
from benchmarks.envs.takeover import Takeover
from benchmarks.envs.unobserved import Unobserved

__all__ = [
    "ACTION_NAMES", "EVENT_NAMES", "OBS_CHANNELS", "SPLITS", "GridParams", "GridState",
    "GridWorld", "Layout", "TabularModel", "OffSwitch", "Takeover", "Unobserved",
]
