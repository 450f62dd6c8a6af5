"""Components are found by name; built-ins come through entry points like plug-ins do."""

from __future__ import annotations

import pytest

from audit import registry


def test_builtins_are_registered_through_entry_points():
    assert set(registry.names("environments")) >= {"offswitch", "takeover", "unobserved"}
    assert set(registry.names("planners")) >= {"demonstrator", "long_horizon",
                                               "unbounded_utility", "watched_only"}
    spec = registry.get("environments", "offswitch")
    env, params = spec.build("test")
    assert bool(params.test_layouts) and spec.splits == ("train", "test")


def test_unknown_names_list_the_valid_choices():
    with pytest.raises(registry.UnknownNameError) as error:
        registry.get("environments", "offswich")
    assert str(error.value) == ("unknown environment 'offswich'; choose from: offswitch, "
                                "takeover, unobserved")
    with pytest.raises(ValueError, match="unknown split 'val'.*choose from: train, test"):
        registry.get("environments", "offswitch").build("val")
    with pytest.raises(ValueError, match="unknown registry group 'envs'"):
        registry.names("envs")


def test_code_registration_and_name_clashes():
    spec = registry.PlannerSpec(name="_test_planner", make=lambda env: None)
    registry.register("planners", "_test_planner", spec)
    try:
        assert registry.get("planners", "_test_planner") is spec
        with pytest.raises(ValueError, match="already registered"):
            registry.register("planners", "_test_planner", spec)
        with pytest.raises(ValueError, match="already registered"):
            registry.register("planners", "demonstrator", spec)
    finally:
        registry._registered["planners"].pop("_test_planner")
