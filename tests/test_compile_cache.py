"""JAX's persistent compilation cache: where it goes, the flags that move or stop it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from audit import compile_cache
from audit.cli import main


@pytest.fixture
def restore_cache_setting(monkeypatch):
    """The process's cache setting (config and environment) as it was, after the test."""
    for name in (compile_cache.ENV_VAR, "JAX_COMPILATION_CACHE_DIR",
                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        monkeypatch.delenv(name, raising=False)
    directory = jax.config.jax_compilation_cache_dir
    seconds = jax.config.jax_persistent_cache_min_compile_time_secs
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", seconds)
    compile_cache.configure(directory)


def test_the_default_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_directory() == tmp_path / "xdg" / "imitation-audit" / "jax"
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "mine"))
    assert compile_cache.default_directory() == tmp_path / "mine"
    monkeypatch.setenv(compile_cache.ENV_VAR, "OFF")
    assert compile_cache.default_directory() is None


def test_compiled_programs_are_written_to_the_cache(restore_cache_setting, monkeypatch,
                                                    tmp_path):
    monkeypatch.setattr(compile_cache, "MIN_COMPILE_SECONDS", 0.0)
    assert compile_cache.configure(tmp_path / "cache") == tmp_path / "cache"
    jax.jit(lambda x: jnp.sin(x) * 3.0 + jnp.arange(7.0))(jnp.ones(7)).block_until_ready()
    assert any((tmp_path / "cache").iterdir())
    # Turned off: nothing more is written.
    before = set((tmp_path / "cache").iterdir())
    assert compile_cache.configure(None) is None
    jax.jit(lambda x: jnp.cos(x) - 5.0)(jnp.ones(3)).block_until_ready()
    assert set((tmp_path / "cache").iterdir()) == before


def test_the_flags_before_or_after_the_command(restore_cache_setting, tmp_path, capsys):
    assert main(["--compile-cache", str(tmp_path / "a"), "list", "suites"]) == 0
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "a")
    assert main(["list", "suites", "--compile-cache", str(tmp_path / "b")]) == 0
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "b")
    assert main(["list", "suites", "--no-compile-cache"]) == 0
    assert jax.config.jax_compilation_cache_dir is None
    capsys.readouterr()
    assert main(["--no-compile-cache", "list", "--compile-cache", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.strip() == (
        "audit list: error: --compile-cache and --no-compile-cache: give one of them")
    (tmp_path / "file").write_text("")
    assert main(["list", "--compile-cache", str(tmp_path / "file")]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"audit list: error: compile cache {tmp_path / 'file'}: cannot be "
                           "created as a directory")
