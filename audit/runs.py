"""Run directories: config, versions and results written atomically, never overwritten silently.

A run is assembled in a hidden sibling directory and renamed into place only when
complete, so a crashed or interrupted run never leaves a half-written ``DIR``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("imitation-audit", "jax", "jaxlib", "flax", "optax", "chex", "gymnax",
            "numpy")


class RunDirError(ValueError):
    """An output directory that exists (without overwrite) or cannot be written."""


def versions() -> dict[str, Any]:
    """Python, platform, package versions and JAX's backend, for the record."""
    found: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    try:
        import jax

        from audit import numerics

        found["jax_backend"] = jax.default_backend()
        found["jax_devices"] = [str(device) for device in jax.devices()]
        found["matmul_precision"] = numerics.matmul_precision()
    except Exception as error:  # a broken accelerator plugin must not lose the run record
        found["jax_backend"] = f"unavailable: {error}"
    return found


def check_run_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Checks, before any work is done, that a run can be written to ``path``.

    Raises:
      RunDirError: if ``path`` exists and is not empty (and ``overwrite`` is False),
        is a file, is (or contains) the current directory, or its parent cannot be
        created or written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out {path} exists and is not a directory")
    here = Path.cwd().resolve()
    if path.resolve() == here or path.resolve() in here.parents:
        # A finished run replaces its directory; this one holds the working directory.
        raise RunDirError(f"--out {path} is the current directory or contains it; name a new "
                          "directory for the run")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise RunDirError(f"--out {path} already exists; pass --overwrite to replace it")
    # Probe by writing: permission bits say nothing for root or on special filesystems.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent))
    except OSError as error:
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        reason = f"{blocking} is not a directory" if blocking else error.strerror or str(error)
        raise RunDirError(f"--out {path} is not writable ({reason})") from None
    return path


@contextlib.contextmanager
def run_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh directory to write a run into; moves it to ``path`` on success.

    Example:
      >>> with run_dir("runs/demo") as tmp:
      ...     write_json(tmp / "summary.json", {"episodes": 8})
    """
    path = check_run_dir(path, overwrite)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _apply_umask(staging)
    if path.exists():
        trash = path.with_name(f".{path.name}.replaced-{os.getpid()}")
        os.replace(path, trash)
        os.replace(staging, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, path)


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Writes ``payload`` as strict JSON, atomically (write to a temporary file, rename).

    Non-finite floats (NaN, infinities) are written as ``null``: strict JSON has no NaN.
    """
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        json.dump(strict_json(payload), tmp, indent=2, sort_keys=False, allow_nan=False)
        tmp.write("\n")
    os.replace(tmp.name, path)
    return path


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (recursively)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(item) for item in value]
    return value


def as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON: tuples become lists, and anything JSON has no
    type for its ``str``. Settings are compared in this form, so those read back from a
    checkpoint equal those of the run that resumes it."""
    return json.loads(json.dumps(value, default=str))


def default_run_name(*parts: str) -> str:
    """``<UTC timestamp>-<parts>``, so default output directories never collide."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    return "-".join([stamp, *parts])


def _apply_umask(directory: Path) -> None:
    """tempfile creates private (0700/0600) entries; a finished run gets the usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for entry in directory.rglob("*"):
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~umask)


class RunCheckpoint:
    """A checkpoint directory beside a run's ``--out``: its settings in ``run.json``
    (what a resumed run must match, :func:`resume_checkpoint`) and whatever finished
    work the command records in it (subclasses say what).

    Args:
      directory: where the files go.
      settings: what identifies the run (JSON-ready; compared as :func:`as_json` gives it).
    """

    def __init__(self, directory: str | os.PathLike, settings: dict[str, Any]):
        self.directory = Path(directory)
        self.settings = as_json(settings)

    def start(self) -> None:
        """Creates the directory and records the settings (a fresh run)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        write_json(self.directory / "run.json", {"settings": self.settings})

    def remove(self) -> None:
        """Deletes the checkpoint (the run is written)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def resume_checkpoint(directory: str | os.PathLike, record: str, settings: dict, out,
                      resume: bool, overwrite: bool) -> dict | None:
    """The ``--resume`` / ``--overwrite`` rule of every checkpointed command.

    A killed run leaves its checkpoint in ``directory`` (beside ``--out``), with a JSON
    ``record`` whose ``settings`` say what the run was started with.

    Args:
      directory: the checkpoint directory.
      record: the JSON file in it naming the run's ``settings``.
      settings: this run's settings (JSON-ready).
      out: the run's ``--out``, for the messages.
      resume: ``--resume`` was given.
      overwrite: ``--overwrite`` was given (an old checkpoint is deleted).

    Returns:
      the record to resume from, or None to start afresh.

    Raises:
      RunDirError: ``--resume`` without a checkpoint, or with one of other settings
        (naming those that differ); a checkpoint found without ``--resume`` or
        ``--overwrite``.
    """
    directory = Path(directory)
    settings = as_json(settings)
    if resume:
        try:
            found = json.loads((directory / record).read_text())
        except FileNotFoundError:
            raise RunDirError(f"--resume: no checkpoint of --out {out} at {directory} "
                              "(nothing to resume)") from None
        except (OSError, ValueError) as error:
            raise RunDirError(f"--resume: {directory / record} is unreadable ({error})"
                              ) from None
        theirs = found.get("settings") if isinstance(found, dict) else None
        if theirs != settings:
            theirs = theirs if isinstance(theirs, dict) else {}
            differ = sorted(k for k in set(theirs) | set(settings)
                            if theirs.get(k) != settings.get(k))
            raise RunDirError(f"--resume: the checkpoint at {directory} was written with "
                              f"other settings (differing: {', '.join(differ)}); resume with "
                              "the same flags, or --overwrite to start afresh")
        return found
    if directory.exists():
        if not overwrite:
            raise RunDirError(f"--out {out}: a killed run left its checkpoint at {directory}; "
                              "pass --resume to continue it or --overwrite to start afresh")
        shutil.rmtree(directory)
    return None
