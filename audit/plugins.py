"""Plug-ins: a user's Python file or module, loaded before any command runs.

A plug-in registers its components (:func:`audit.registry.register`) when it is imported;
``audit --plugin my_detectors.py bench --suite my_suite`` then runs them like the
built-ins, and ``audit list`` shows them beside the built-ins with where they came from.
Worker processes of a suite load the same plug-ins before they start
(:func:`loaded` / :func:`load_all`), so a plug-in's components work in every process.

Example::

    # my_plugin.py
    from audit import registry
    from audit.detectors import DetectorSpec

    def make_step_count(context):
        return StepCount()  # protocol, fit(trusted, untrusted=None), score(trajectories)

    registry.register("detectors", "step_count",
                      DetectorSpec("step_count", "actions", make_step_count))

    $ audit --plugin my_plugin.py list detectors
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from audit import registry

_loaded: list[str] = []


class PluginError(Exception):
    """A plug-in that cannot be loaded, or that breaks a contract: one line naming it."""


def _module_name(path: Path) -> str:
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    return f"audit_plugin_{path.stem}_{digest}"


def load(source: str) -> None:
    """Imports a plug-in once: a path to a ``.py`` file or an importable module name.

    Components it registers are listed as coming from ``plug-in <source>``. A file
    is imported as a module of its own (``audit_plugin_<stem>_<hash>``), kept in
    ``sys.modules`` so that its functions and classes pickle by reference.

    Raises:
      PluginError: the file or module is missing, importing it raised, or a component
        it registers breaks its contract or takes a registered name.
    """
    path = Path(source)
    is_file = source.endswith(".py") or path.is_file()
    key = str(path.resolve()) if is_file else source
    if key in _loaded:
        return
    label = f"plug-in {source}"
    try:
        with registry.registering_from(label):
            if is_file:
                if not path.is_file():
                    raise PluginError(f"--plugin {source}: no such file")
                name = _module_name(path.resolve())
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(name, None)
                    raise
            else:
                importlib.import_module(source)
    except PluginError:
        raise
    except ModuleNotFoundError as error:
        if not is_file and error.name == source.split(".")[0]:
            raise PluginError(f"--plugin {source}: no such file or importable module") from None
        raise PluginError(f"--plugin {source}: importing it failed: {error}") from None
    except (registry.ContractError, ValueError) as error:
        raise PluginError(f"--plugin {source}: {error}") from None
    except Exception as error:
        where = traceback.extract_tb(error.__traceback__)[-1]
        raise PluginError(f"--plugin {source}: importing it raised {type(error).__name__}: "
                          f"{error} (at {where.filename}:{where.lineno})") from None
    _loaded.append(key)


def load_all(sources: Sequence[str]) -> None:
    """:func:`load` each source in order (a worker process's initializer)."""
    for source in sources:
        load(source)


def loaded() -> tuple[str, ...]:
    """The plug-ins loaded in this process, in order (as resolved paths or module names)."""
    return tuple(_loaded)
