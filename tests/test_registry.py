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
                                "takeover, unobserved, gymnax:<name>")
    with pytest.raises(ValueError, match="unknown split 'val'.*choose from: train, test"):
        registry.get("environments", "offswitch").build("val")
    with pytest.raises(ValueError, match="unknown registry group 'envs'"):
        registry.names("envs")


def test_gymnax_environments_resolve_through_their_family():
    assert "gymnax" in registry.families("environments")
    assert registry.family_origin("environments", "gymnax") == (
        "entry point audit.gymnax_envs:environment_spec (imitation-audit)")
    spec = registry.get("environments", "gymnax:CartPole-v1")
    assert spec.name == "gymnax:CartPole-v1" and spec.splits == ("train",)
    with pytest.raises(registry.UnknownNameError, match="unknown environment 'gymnax:Nope-v0'; "
                       "choose from: gymnax:CartPole-v1, "):
        registry.get("environments", "gymnax:Nope-v0")
    # A prefix that is no family is an unknown name like any other.
    with pytest.raises(registry.UnknownNameError, match="unknown environment 'gym:CartPole-v1'"):
        registry.get("environments", "gym:CartPole-v1")


def test_a_users_family_resolves_names_and_is_held_to_the_contract(isolated_registry):
    offswitch = registry.get("environments", "offswitch")

    def sized(name):
        size = name.partition(":")[2]
        if not size.isdigit():
            raise registry.UnknownNameError("environments", name, ["sized:<digits>"])
        return registry.EnvironmentSpec(name, offswitch.make, offswitch.splits,
                                        offswitch.event_names)

    with registry.registering_from("plug-in sized.py"):
        registry.register_family("environments", "sized", sized)
    assert registry.get("environments", "sized:7").name == "sized:7"
    assert registry.family_origin("environments", "sized") == "plug-in sized.py"
    assert "sized:<name>" in str(pytest.raises(
        registry.UnknownNameError, registry.get, "environments", "nothing").value)
    with pytest.raises(ValueError, match="environment family 'sized' is already registered "
                       r"\(plug-in sized.py\)"):
        registry.register_family("environments", "sized", sized)
    with pytest.raises(ValueError, match="a family prefix is a non-empty name without ':'"):
        registry.register_family("environments", "a:b", sized)
    registry.register_family("environments", "broken", lambda name: object())
    with pytest.raises(registry.ContractError, match="environment 'broken:x': an environment "
                       "is an EnvironmentSpec"):
        registry.get("environments", "broken:x")


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
    with pytest.raises(registry.ContractError, match="a suite is an audit.protocol.Suite or "
                                                     "an audit.adaptive.AdaptiveSuite; found dict"):
        registry.register("suites", "not_a_suite", {})
    with pytest.raises(registry.ContractError, match="an environment is an EnvironmentSpec"):
        registry.register("environments", "bare", object())
