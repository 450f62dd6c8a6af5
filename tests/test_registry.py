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


def test_origins_say_where_a_component_came_from(isolated_registry):
    assert registry.origin("detectors", "mahalanobis") == (
        "entry point audit.detectors.baselines:MAHALANOBIS (imitation-audit)")
    spec = registry.PlannerSpec(name="_from_code", make=lambda env: None)
    registry.register("planners", "_from_code", spec)
    assert registry.origin("planners", "_from_code") == "code"
    with registry.registering_from("plug-in my_file.py"):
        registry.register("planners", "_from_plugin", spec)
    assert registry.origin("planners", "_from_plugin") == "plug-in my_file.py"
    with pytest.raises(registry.UnknownNameError):
        registry.origin("planners", "_nowhere")


def test_registration_checks_the_groups_contract(isolated_registry):
    from audit.detectors import DetectorSpec

    with pytest.raises(registry.ContractError,
                       match="detector 'other': a detector's spec names it as registered; "
                             "its name is 'mine'"):
        registry.register("detectors", "other", DetectorSpec("mine", "actions", print))
    with pytest.raises(registry.ContractError, match="an imitator is a class called as "
                                                     "cls\\(observation_shape, num_actions"):
        registry.register("imitators", "one_argument", lambda shape: None)
    with pytest.raises(registry.ContractError, match="a suite is an audit.protocol.Suite; "
                                                     "found dict"):
        registry.register("suites", "not_a_suite", {})
    with pytest.raises(registry.ContractError, match="an environment is an EnvironmentSpec"):
        registry.register("environments", "bare", object())
