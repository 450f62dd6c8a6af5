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

A *family* makes components on demand from their name, ``<family>:<member>``: the
built-in ``gymnax`` family of environments (``gymnax:CartPole-v1``) is registered in
the entry-point group ``audit.families.environments``; in code, with
:func:`register_family`.

Groups: ``environments`` (an :class:`EnvironmentSpec`), ``planners`` (a
:class:`PlannerSpec`), ``imitators`` (an NNX module class called as
``cls(observation_shape, num_actions, rngs=nnx.Rngs(key))`` that meets the
imitator contract of :mod:`models.imitators`), ``discriminators`` (an NNX module
class called as ``cls(feature_size, rngs=nnx.Rngs(key))`` that maps ``(features
[T, F], mask [T])`` to per-step logits), ``organisms`` (a
``benchmarks.organisms.OrganismSpec`` or anything meeting the organism interface of
:mod:`audit.protocol`), ``suites`` (an :class:`audit.protocol.Suite`,
run by ``audit bench --suite NAME``) and ``sweeps`` (an :class:`audit.sweeps.Sweep`, run by
``audit sweep NAME``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import metadata
from typing import Any

ENTRY_POINT_PREFIX = "audit."
GROUPS = ("environments", "planners", "imitators", "discriminators", "detectors", "organisms",
          "suites", "sweeps")

FAMILY_SEPARATOR = ":"
# The `audit train-gan` settings an environment may recommend (EnvironmentSpec.imitation_defaults).
IMITATION_DEFAULT_KEYS = ("imitator", "discriminator", "view", "steps", "rollout_episodes",
                          "reward", "learning_rate", "discriminator_learning_rate",
                          "discriminator_updates", "entropy_coef", "anneal_lr", "ppo_epochs",
                          "ppo_minibatches", "gamma", "gae_lambda",
                          "discriminator_batch_episodes")

_registered: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
# Name families (``gymnax:<id>``): prefix -> resolve(full name) -> component.
_families: dict[str, dict[str, Callable[[str], Any]]] = {group: {} for group in GROUPS}
# Where each code registration came from ("code", or "plug-in <source>"), for `audit list`.
_origins: dict[tuple[str, str], str] = {}
_origin_stack: list[str] = []


class ContractError(ValueError):
    """A component that does not meet its group's contract; the message names the
    component, the rule and what was found."""


class UnknownNameError(KeyError):
    """A name that is not registered in a group; the message lists the valid names."""

    def __init__(self, group: str, name: str, choices: Sequence[str]):
        self.group, self.name, self.choices = group, name, tuple(choices)
        listed = ", ".join(self.choices) if self.choices else "(none registered)"
        super().__init__(f"unknown {group[:-1]} {name!r}; choose from: {listed}")

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return self.args[0]


class ReadOnlySettings(Mapping):
    """A read-only ``{name: value}`` mapping that pickles (a ``types.MappingProxyType``
    does not, and a suite sends its environments' specs to worker processes)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] = ()):
        self._items = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._items!r})"

    def __reduce__(self):
        return type(self), (dict(self._items),)


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
      demonstrator: the registered planner whose episodes are this environment's
        demonstrations (a suite's ``demonstrator`` may override it).
      counterfactual: optional ``observation -> observation``, pure and vmappable: a
        train-layout observation with the test-only feature switched on (the
        supervisor leaves, a switch appears); the ``counterfactual`` sweep measures how
        far a model's policy moves under it. A module-level function.
      imitation_defaults: the ``audit train-gan`` settings that imitate this
        environment by adversarial imitation alone, used for the flags a command line
        leaves out (keys: :data:`IMITATION_DEFAULT_KEYS`, e.g. ``{"imitator":
        "egocentric", "learning_rate": 1e-3}``); what is not named takes the command's
        own defaults.
      render: optional ``observation -> image``: one observation (a NumPy array of the
        environment's observation shape) as an ``[H, W, 3]`` ``uint8`` RGB image, one
        pixel per cell; ``audit render`` and the visual report (:mod:`audit.html_report`)
        draw episodes with it. A module-level function.
    """

    name: str
    make: Callable[[str], tuple[Any, Any]]
    splits: tuple[str, ...] = ("train",)
    event_names: tuple[str, ...] = ("none",)
    description: str = ""
    demonstrator: str = "demonstrator"
    counterfactual: Callable[[Any], Any] | None = None
    render: Callable[[Any], Any] | None = None
    # Not hashed: a spec stays hashable with a mapping in it.
    imitation_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict,
                                                              hash=False)

    def __post_init__(self):
        defaults = self.imitation_defaults
        if not isinstance(defaults, Mapping):
            raise ValueError(f"EnvironmentSpec {self.name!r}: imitation_defaults must be a "
                             f"mapping, got {type(defaults).__name__}")
        unknown = sorted(set(defaults) - set(IMITATION_DEFAULT_KEYS))
        if unknown:
            raise ValueError(f"EnvironmentSpec {self.name!r}: unknown imitation_defaults "
                             f"key(s) {', '.join(map(repr, unknown))}; choose from: "
                             f"{', '.join(IMITATION_DEFAULT_KEYS)}")
        object.__setattr__(self, "imitation_defaults", ReadOnlySettings(defaults))

    def build(self, split: str) -> tuple[Any, Any]:
        """Returns ``(env, env_params)`` for ``split``; raises ValueError naming the splits."""
        if split not in self.splits:
            raise ValueError(
                f"unknown split {split!r} for environment {self.name!r}; "
                f"choose from: {', '.join(self.splits)}"
            )
        return self.make(split)


def every_environment(env: Any) -> bool:
    """True: the default ``PlannerSpec.supports``, a planner that acts in any environment."""
    return True


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
    supports: Callable[[Any], bool] = every_environment
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
        raise ValueError(f"{group[:-1]} {name!r} is already registered ({origin(group, name)});"
                         f" choose another name or pass replace=True")
    check_contract(group, name, component)
    _registered[group][name] = component
    _origins[(group, name)] = _origin_stack[-1] if _origin_stack else "code"


@contextlib.contextmanager
def registering_from(source: str) -> Iterator[None]:
    """Components registered inside this block are listed as coming from ``source``."""
    _origin_stack.append(source)
    try:
        yield
    finally:
        _origin_stack.pop()


def origin(group: str, name: str) -> str:
    """Where ``name`` in ``group`` comes from: ``"entry point module:object (package)"``,
    ``"plug-in <source>"`` or ``"code"``.

    Raises:
      UnknownNameError: if nothing is registered under ``name``.
    """
    _check_group(group)
    found = _origin_in(_registered[group], _entry_group(group), name, (group, name))
    if found is None:
        raise UnknownNameError(group, name, names(group))
    return found


def _signature(component: Any, what: str, name: str, group: str) -> inspect.Signature:
    if not callable(component):
        raise ContractError(f"{group[:-1]} {name!r}: {what}; found {component!r}")
    try:
        return inspect.signature(component)
    except (TypeError, ValueError):
        raise ContractError(f"{group[:-1]} {name!r}: {what}; found {component!r}, whose "
                            f"signature cannot be read") from None


def _takes(signature: inspect.Signature, positional: int, keyword: str) -> bool:
    """Whether ``signature`` takes ``positional`` positional arguments and ``keyword``."""
    kinds = [p.kind for p in signature.parameters.values()]
    positional_ok = (kinds.count(inspect.Parameter.POSITIONAL_ONLY)
                     + kinds.count(inspect.Parameter.POSITIONAL_OR_KEYWORD) >= positional
                     or inspect.Parameter.VAR_POSITIONAL in kinds)
    keyword_ok = (keyword in signature.parameters
                  and signature.parameters[keyword].kind != inspect.Parameter.POSITIONAL_ONLY
                  ) or inspect.Parameter.VAR_KEYWORD in kinds
    return positional_ok and keyword_ok


def _has(component: Any, attributes: Sequence[str]) -> list[str]:
    return [a for a in attributes if not hasattr(component, a)]


def check_contract(group: str, name: str, component: Any) -> None:
    """Checks what can be checked of ``component``'s contract without running it.

    The constructor contract of each group (DESIGN.md, "Plug-ins"):

    - ``environments``: an :class:`EnvironmentSpec` (``build(split)``, ``splits``,
      ``event_names``);
    - ``planners``: a :class:`PlannerSpec` (``make(env)``);
    - ``imitators``: ``cls(observation_shape, num_actions, *, rngs)``;
    - ``discriminators``: ``cls(feature_size, *, rngs, **settings)``, the settings named
      by the suite (:attr:`audit.protocol.Suite.discriminator_settings`);
    - ``detectors``: an :class:`audit.detectors.DetectorSpec` (or anything with
      ``name``, ``view``, ``build(context)`` and ``depends_on_imitator``) whose ``name``
      is the registered name;
    - ``organisms``: the organism interface of :mod:`audit.protocol` (``name``, ``kind``,
      ``supports``, ``audit_settings``, ``validity_figures``, ``builder``), ``name`` the
      registered name;
    - ``suites``: an :class:`audit.protocol.Suite` (or an
      :class:`audit.adaptive.AdaptiveSuite`);
    - ``sweeps``: an :class:`audit.sweeps.Sweep` whose ``suite`` is a registered suite.

    Raises:
      ContractError: naming the component, the rule and what was found.
    """
    label = f"{group[:-1]} {name!r}"
    if group == "environments":
        missing = _has(component, ("build", "splits", "event_names"))
        if missing:
            raise ContractError(f"{label}: an environment is an EnvironmentSpec (build(split), "
                                f"splits, event_names); {type(component).__name__} lacks "
                                f"{', '.join(missing)}")
    elif group == "planners":
        if not callable(getattr(component, "make", None)):
            raise ContractError(f"{label}: a planner is a PlannerSpec with make(env) -> expert;"
                                f" found {type(component).__name__} without make")
    elif group == "imitators":
        rule = "an imitator is a class called as cls(observation_shape, num_actions, *, rngs)"
        signature = _signature(component, rule, name, group)
        if not _takes(signature, 2, "rngs"):
            raise ContractError(f"{label}: {rule}; found {component.__name__}{signature}")
    elif group == "discriminators":
        rule = ("a discriminator is a class called as cls(feature_size, *, rngs, **settings)"
                " mapping (features [T, F], mask [T]) to [T] logits")
        signature = _signature(component, rule, name, group)
        if not _takes(signature, 1, "rngs"):
            raise ContractError(f"{label}: {rule}; found {component.__name__}{signature}")
    elif group == "detectors":
        missing = _has(component, ("name", "view", "build", "depends_on_imitator"))
        if missing:
            raise ContractError(f"{label}: a detector is a DetectorSpec (name, view, "
                                f"build(context), depends_on_imitator); "
                                f"{type(component).__name__} lacks {', '.join(missing)}")
        if component.name != name:
            raise ContractError(f"{label}: a detector's spec names it as registered; its "
                                f"name is {component.name!r}")
    elif group == "organisms":
        missing = _has(component, ("name", "kind", "supports", "audit_settings",
                                   "validity_figures", "builder"))
        if missing:
            raise ContractError(f"{label}: an organism has name, kind, supports, "
                                f"audit_settings, validity_figures and builder; "
                                f"{type(component).__name__} lacks {', '.join(missing)}")
        if component.name != name:
            raise ContractError(f"{label}: an organism's name is the registered one; its name "
                                f"is {component.name!r}")
        from audit.protocol import KINDS

        if component.kind not in KINDS:
            raise ContractError(f"{label}: an organism's kind is one of {', '.join(KINDS)}; "
                                f"found {component.kind!r}")
    elif group == "suites":
        from audit.adaptive import AdaptiveSuite
        from audit.protocol import Suite

        if not isinstance(component, Suite | AdaptiveSuite):
            raise ContractError(f"{label}: a suite is an audit.protocol.Suite or an "
                                f"audit.adaptive.AdaptiveSuite; found "
                                f"{type(component).__name__}")
    elif group == "sweeps":
        from audit.sweeps import Sweep

        if not isinstance(component, Sweep):
            raise ContractError(f"{label}: a sweep is an audit.sweeps.Sweep; found "
                                f"{type(component).__name__}")
        if component.name != name:
            raise ContractError(f"{label}: a sweep's name is its registered name; its name "
                                f"is {component.name!r}")


def names(group: str) -> tuple[str, ...]:
    """All names in ``group``, from code registrations and entry points, sorted."""
    _check_group(group)
    return _names_in(_registered[group], _entry_group(group))


def get(group: str, name: str) -> Any:
    """The component registered as ``name`` in ``group``.

    A name ``<family>:<member>`` that is not registered itself is resolved by the
    family registered as ``<family>`` in ``group`` (:func:`register_family`), e.g.
    ``gymnax:CartPole-v1`` by the built-in ``gymnax`` family of environments.

    Raises:
      UnknownNameError: if nothing is registered under ``name`` and no family resolves
        it; the message lists the valid names and families.
    """
    _check_group(group)
    component = _load_from(_registered[group], _entry_group(group), name)
    if component is not _MISSING:
        return component
    prefix, separator, member = name.partition(FAMILY_SEPARATOR)
    if separator and prefix in families(group):
        component = family(group, prefix)(name)
        check_contract(group, name, component)
        return component
    raise UnknownNameError(group, name, names(group)
                           + tuple(f"{known}{FAMILY_SEPARATOR}<name>"
                                   for known in families(group)))


def register_family(group: str, prefix: str, resolve: Callable[[str], Any], *,
                    replace: bool = False) -> None:
    """Registers a family of names ``<prefix>:<member>`` in ``group``.

    A family stands for components that are made on demand from their name rather than
    registered one by one (the built-in ``gymnax`` family makes an
    :class:`EnvironmentSpec` for any gymnax environment id). Entry points register
    families too, in the group ``audit.families.<group>`` (``prefix = "module:function"``).

    Args:
      group: one of :data:`GROUPS`.
      prefix: the family's name, without the ``:``.
      resolve: ``resolve(full_name) -> component``; raises :class:`UnknownNameError`
        (or ``ValueError``) for a member it does not know. Its components are held to
        the group's contract (:func:`check_contract`) when resolved.
      replace: allow replacing an existing family of the same prefix.

    Raises:
      ValueError: for an unknown group, a prefix with a ``:``, or a prefix taken.

    Example:
      >>> register_family("environments", "mine", lambda name: my_spec(name))
      >>> get("environments", "mine:small")  # doctest: +SKIP
    """
    _check_group(group)
    if not prefix or FAMILY_SEPARATOR in prefix:
        raise ValueError(f"a family prefix is a non-empty name without {FAMILY_SEPARATOR!r}; "
                         f"got {prefix!r}")
    if not callable(resolve):
        raise ContractError(f"{group[:-1]} family {prefix!r}: resolve(name) must be callable; "
                            f"found {resolve!r}")
    if prefix in families(group) and not replace:
        raise ValueError(f"{group[:-1]} family {prefix!r} is already registered "
                         f"({family_origin(group, prefix)}); choose another prefix or pass "
                         "replace=True")
    _families[group][prefix] = resolve
    _origins[(group, prefix + FAMILY_SEPARATOR)] = (_origin_stack[-1] if _origin_stack
                                                    else "code")


def families(group: str) -> tuple[str, ...]:
    """The prefixes of the name families of ``group``, sorted."""
    _check_group(group)
    return _names_in(_families[group], _family_entry_group(group))


def family(group: str, prefix: str) -> Callable[[str], Any]:
    """The resolver of the family ``prefix`` in ``group``.

    Raises:
      UnknownNameError: if no family ``prefix`` is registered in ``group``.
    """
    _check_group(group)
    resolve = _load_from(_families[group], _family_entry_group(group), prefix)
    if resolve is _MISSING:
        raise UnknownNameError(group, prefix + FAMILY_SEPARATOR, [
            known + FAMILY_SEPARATOR for known in families(group)])
    return resolve


def family_origin(group: str, prefix: str) -> str:
    """Where the family ``prefix`` of ``group`` comes from (as :func:`origin` says it)."""
    _check_group(group)
    found = _origin_in(_families[group], _family_entry_group(group), prefix,
                       (group, prefix + FAMILY_SEPARATOR))
    if found is None:
        raise UnknownNameError(group, prefix + FAMILY_SEPARATOR, [
            known + FAMILY_SEPARATOR for known in families(group)])
    return found


# Components and families are kept alike: a table of code registrations beside an
# entry-point group, loaded into the table on first use.
_MISSING = object()


def _entry_group(group: str) -> str:
    return ENTRY_POINT_PREFIX + group


def _family_entry_group(group: str) -> str:
    return f"{ENTRY_POINT_PREFIX}families.{group}"


def _entry_points(entry_group: str) -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=entry_group))


def _names_in(table: dict[str, Any], entry_group: str) -> tuple[str, ...]:
    return tuple(sorted(set(table) | {ep.name for ep in _entry_points(entry_group)}))


def _load_from(table: dict[str, Any], entry_group: str, name: str) -> Any:
    """``table[name]``, else the entry point ``name`` loaded into the table, else _MISSING."""
    if name in table:
        return table[name]
    for entry_point in _entry_points(entry_group):
        if entry_point.name == name:
            table[name] = entry_point.load()
            return table[name]
    return _MISSING


def _origin_in(table: dict[str, Any], entry_group: str, name: str,
               origin_key: tuple[str, str]) -> str | None:
    """Where ``name`` comes from (see :func:`origin`); None if it is nowhere."""
    if name in table and origin_key in _origins:
        return _origins[origin_key]
    for entry_point in _entry_points(entry_group):
        if entry_point.name == name:
            package = entry_point.dist.name if entry_point.dist is not None else "?"
            return f"entry point {entry_point.value} ({package})"
    return "code" if name in table else None


def _check_group(group: str) -> None:
    if group not in GROUPS:
        raise ValueError(f"unknown registry group {group!r}; choose from: {', '.join(GROUPS)}")
