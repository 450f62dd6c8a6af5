"""Name -> component registry, fed by code and by package entry points.

The command line is the one place that composes components, and it looks every
one of them up here by name. Built-in environments and planners register through
the entry-point groups in ``pyproject.toml``, exactly as a user's package would:

.. code-block:: toml

    [project.entry-points."audit.environments"]
    my_env = "my_package.envs:SPEC"

or in code, before calling the command line's ``main``::

    from audit import registry
    registry.register("environments", "my_env", my_spec)

Groups: ``environments`` (an :class:`EnvironmentSpec`), ``planners`` (a
:class:`PlannerSpec`), ``imitators`` (an NNX module class called as
``cls(observation_shape, num_actions, rngs=nnx.Rngs(key))`` that meets the
imitator contract of :mod:`models.imitators`), ``discriminators`` (an NNX module
class called as ``cls(feature_size, rngs=nnx.Rngs(key))`` that maps ``(features
[T, F], mask [T])`` to per-step logits), ``organisms`` (a
``benchmarks.organisms.OrganismSpec`` or anything meeting the organism interface of
:mod:`audit.protocol`) and ``suites`` (an :class:`audit.protocol.Suite`,
run by ``audit bench --suite NAME``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

ENTRY_POINT_PREFIX = "audit."
GROUPS = ("environments", "planners", "imitators", "discriminators", "detectors", "organisms",
          "suites")

_registered: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}


class UnknownNameError(KeyError):
    """A name that is not registered in a group; the message lists the valid names."""

    def __init__(self, group: str, name: str, choices: Sequence[str]):
        self.group, self.name, self.choices = group, name, tuple(choices)
        listed = ", ".join(self.choices) if self.choices else "(none registered)"
        super().__init__(f"unknown {group[:-1]} {name!r}; choose from: {listed}")

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return self.args[0]


@dataclasses.dataclass(frozen=True)
class EnvironmentSpec:
    """How to build a named environment for one of its layout splits.

    Attributes:
      name: registry name, e.g. ``"offswitch"``.
      make: ``make(split) -> (env, env_params)`` for a split in ``splits``; ``env``
        is a gymnax environment.
      splits: the named layout distributions, e.g. ``("train", "test")``.
      event_names: hidden-event names by code (code 0 is ``"none"``); environments
        without hidden events use ``("none",)``.
      description: one line for listings.
    """

    name: str
    make: Callable[[str], tuple[Any, Any]]
    splits: tuple[str, ...] = ("train",)
    event_names: tuple[str, ...] = ("none",)
    description: str = ""

    def build(self, split: str) -> tuple[Any, Any]:
        """Returns ``(env, env_params)`` for ``split``; raises ValueError naming the splits."""
        if split not in self.splits:
            raise ValueError(
                f"unknown split {split!r} for environment {self.name!r}; "
                f"choose from: {', '.join(self.splits)}"
            )
        return self.make(split)


@dataclasses.dataclass(frozen=True)
class PlannerSpec:
    """How to build a named expert (a demonstrator or ground-truth planner).

    Attributes:
      name: registry name, e.g. ``"demonstrator"``.
      make: ``make(env) -> expert`` where the expert meets
        :class:`audit.rollout.Expert`.
      supports: ``supports(env) -> bool``, whether the planner can act in ``env``.
      description: one line for listings.
    """

    name: str
    make: Callable[[Any], Any]
    supports: Callable[[Any], bool] = lambda env: True
    description: str = ""


def register(group: str, name: str, component: Any, *, replace: bool = False) -> None:
    """Registers ``component`` under ``name`` in ``group``.

    Args:
      group: one of :data:`GROUPS`.
      name: the name users pass on the command line.
      component: the spec or factory.
      replace: allow replacing an existing registration of the same name.

    Raises:
      ValueError: for an unknown group, or a name already taken (unless ``replace``).
    """
    _check_group(group)
    if name in names(group) and not replace:
        raise ValueError(f"{group[:-1]} {name!r} is already registered; pass replace=True")
    _registered[group][name] = component


def names(group: str) -> tuple[str, ...]:
    """All names in ``group``, from code registrations and entry points, sorted."""
    _check_group(group)
    found = set(_registered[group])
    found.update(ep.name for ep in _entry_points(group))
    return tuple(sorted(found))


def get(group: str, name: str) -> Any:
    """The component registered as ``name`` in ``group``.

    Environments named ``gymnax:<id>`` resolve to that gymnax environment
    (:mod:`audit.gymnax_envs`) without registration.

    Raises:
      UnknownNameError: if nothing is registered under ``name``; the message
        lists the valid names.
    """
    _check_group(group)
    if name in _registered[group]:
        return _registered[group][name]
    if group == "environments" and name.startswith("gymnax:"):
        from audit.gymnax_envs import environment_spec

        return environment_spec(name)
    for entry_point in _entry_points(group):
        if entry_point.name == name:
            component = entry_point.load()
            _registered[group][name] = component
            return component
    raise UnknownNameError(group, name, names(group))


def _entry_points(group: str) -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=ENTRY_POINT_PREFIX + group))


def _check_group(group: str) -> None:
    if group not in GROUPS:
        raise ValueError(f"unknown registry group {group!r}; choose from: {', '.join(GROUPS)}")
