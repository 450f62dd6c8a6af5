"""Spawned worker processes (audit.workers): they carry the parent's plug-ins, and a
pool left by an exception stops its workers instead of waiting for them."""

from __future__ import annotations

import multiprocessing.connection
import time

import pytest

from audit import registry, workers

PLUGIN = """
from audit import registry
from audit.registry import EnvironmentSpec

registry.register("environments", "worker_test_env", EnvironmentSpec(
    name="worker_test_env", make=lambda split: (None, None)))
"""


def _environments() -> list[str]:
    return sorted(registry.names("environments"))


def test_a_worker_has_the_plugins_of_its_parent(isolated_registry, tmp_path):
    from audit import plugins

    plugin = tmp_path / "worker_plugin.py"
    plugin.write_text(PLUGIN)
    plugins.load(str(plugin))
    with workers.pool(1) as pool:
        names = pool.submit(_environments).result()
    assert "worker_test_env" in names and names == _environments()


def test_an_exception_in_the_block_stops_the_workers_at_once(tmp_path):
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with workers.pool(1) as pool:
            busy = pool.submit(time.sleep, 60)
            pool.submit(time.sleep, 60)  # never starts
            while not busy.running():
                time.sleep(0.05)
            processes = list(pool._processes.values())
            raise KeyboardInterrupt
    # Gone when it raised (read from the sentinels: the executor's thread reaps them).
    sentinels = [process.sentinel for process in processes]
    assert len(multiprocessing.connection.wait(sentinels, timeout=0)) == len(sentinels)
    assert time.monotonic() - started < 30  # not the minute of work it was given


def test_available_cores_is_at_least_one():
    assert 1 <= workers.available_cores()
