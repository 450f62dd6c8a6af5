"""The documentation builds without a warning, and every public name has a docstring."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("audit", "models", "benchmarks")


def _modules():
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        yield package
        for info in pkgutil.walk_packages(package.__path__, package_name + "."):
            yield importlib.import_module(info.name)


def _undocumented(module) -> list[str]:
    missing = []
    for name, member in vars(module).items():
        if name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(member) or inspect.isfunction(member):
            if not inspect.getdoc(member):
                missing.append(f"{module.__name__}.{name}")
        if inspect.isclass(member):
            for attribute, value in vars(member).items():
                if attribute.startswith("_") or not (inspect.isfunction(value)
                                                     or isinstance(value, property)):
                    continue
                if not inspect.getdoc(value):
                    missing.append(f"{module.__name__}.{name}.{attribute}")
    return missing


def test_every_public_class_function_and_method_has_a_docstring():
    missing = [name for module in _modules() for name in _undocumented(module)]
    assert not missing, "no docstring: " + ", ".join(missing)


@pytest.mark.slow
@pytest.mark.ci
def test_mkdocs_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
        pytest.fail("mkdocs is not installed: pip install -e '.[dev]' installs it")
    built = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=ROOT, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    assert (tmp_path / "site" / "extending" / "index.html").is_file()
