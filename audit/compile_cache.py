"""JAX's persistent compilation cache, on by default for the command line.

Compiling dominates short runs here (a quick suite compiles hundreds of small programs);
JAX can keep compiled programs on disk and reuse them in the next run, keyed by the
program, the JAX and XLA versions and the device, so a cache hit gives the very program a
fresh compilation would. ``audit`` turns it on in a user cache directory:

- ``$AUDIT_COMPILE_CACHE`` if set (``off`` turns the cache off), else
- ``$XDG_CACHE_HOME/imitation-audit/jax``, else ``~/.cache/imitation-audit/jax``;

``audit --compile-cache DIR`` and ``audit --no-compile-cache`` override both. The setting
is also written to JAX's own environment variables, so the worker processes of a suite
(spawned, fresh interpreters) use the same cache.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "AUDIT_COMPILE_CACHE"
OFF = "off"
# Programs that compile faster than this are not worth a disk read (JAX's default is 1 s,
# which would leave out most of this project's programs: they are small and many).
MIN_COMPILE_SECONDS = 0.1


def default_directory() -> Path | None:
    """The cache directory the environment asks for (None: ``$AUDIT_COMPILE_CACHE=off``)."""
    chosen = os.environ.get(ENV_VAR)
    if chosen is not None:
        return None if chosen.strip().lower() == OFF else Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imitation-audit" / "jax"


def configure(directory: str | os.PathLike | None) -> Path | None:
    """Points JAX's persistent compilation cache at ``directory`` (None: turns it off).

    Args:
      directory: where compiled programs are kept; created if missing.

    Returns:
      The directory in use, or None if the cache is off.

    Raises:
      ValueError: if ``directory`` exists and is not a directory, or cannot be created.

    Example:
      >>> configure(default_directory())  # doctest: +SKIP
      PosixPath('/home/me/.cache/imitation-audit/jax')
    """
    import jax

    _forget_cache_state()
    if directory is None:
        os.environ[ENV_VAR] = OFF
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"compile cache {path}: cannot be created as a directory "
                         f"({error.strerror or error})") from None
    os.environ[ENV_VAR] = str(path)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(path)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path


def _forget_cache_state() -> None:
    """Lets JAX decide again whether and where to cache (it decides once per process, at
    the first compilation, and a second ``configure`` in one process must take effect)."""
    try:
        from jax._src import compilation_cache
    except ImportError:  # a JAX without it: the first configuration stays in force
        return
    reset = getattr(compilation_cache, "reset_cache", None)
    if reset is not None:
        reset()
