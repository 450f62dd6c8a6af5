"""Shared fixtures: environments by name, and BFS on layouts (numpy, independent of the env)."""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

import jax
import numpy as np
import pytest

from audit import compile_cache, numerics, registry

# Tests build many jitted functions over the same computations; compile each once. The
# environment variable keeps the commands the tests run (audit.cli.main) on this cache too,
# instead of the user's.
TEST_COMPILE_CACHE = Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax"
os.environ[compile_cache.ENV_VAR] = str(TEST_COMPILE_CACHE)
compile_cache.configure(TEST_COMPILE_CACHE)

# The tests' expectations are float32 arithmetic (hand computations, float64 references):
# on GPUs that default to TensorFloat-32 products they would fail by 1e-3, as the command
# line's figures would differ (audit.numerics).
numerics.full_float32_matmuls()

ENV_NAMES = ("offswitch", "takeover", "unobserved")


@pytest.fixture(params=ENV_NAMES)
def env_name(request) -> str:
    return request.param


def build(name: str, split: str):
    return registry.get("environments", name).build(split)


def sample_layouts(env, params, count: int, seed: int = 0):
    """``count`` layouts as a numpy pytree."""
    keys = jax.random.split(jax.random.key(seed), count)
    return jax.tree.map(np.asarray, jax.jit(jax.vmap(env.sample_layout, (0, None)))(keys, params))


def layout_at(layouts, index: int):
    return jax.tree.map(lambda leaf: leaf[index], layouts)


def bfs_distances(walls: np.ndarray, source, blocked: np.ndarray | None = None) -> np.ndarray:
    """Shortest-path step counts from ``source`` over non-wall cells (inf if unreachable)."""
    size = walls.shape[0]
    blocked = walls if blocked is None else (walls | blocked)
    distance = np.full((size, size), np.inf)
    source = tuple(int(v) for v in source)
    distance[source] = 0
    queue = deque([source])
    while queue:
        row, col = queue.popleft()
        for d_row, d_col in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            nxt = (row + d_row, col + d_col)
            if 0 <= nxt[0] < size and 0 <= nxt[1] < size and not blocked[nxt] \
                    and distance[nxt] == np.inf:
                distance[nxt] = distance[row, col] + 1
                queue.append(nxt)
    return distance


@pytest.fixture
def isolated_registry(monkeypatch):
    """The registry and the loaded plug-ins as they are, restored after the test."""
    from audit import plugins

    monkeypatch.setattr(registry, "_registered",
                        {group: dict(found) for group, found in registry._registered.items()})
    monkeypatch.setattr(registry, "_families",
                        {group: dict(found) for group, found in registry._families.items()})
    monkeypatch.setattr(registry, "_origins", dict(registry._origins))
    monkeypatch.setattr(plugins, "_loaded", list(plugins._loaded))
    return registry


def pytest_itemcollected(item):
    """A `ci` test is a slow test that CI runs too: one marked `ci` alone would run twice
    in .ci/run (in the default run and in `-m ci`)."""
    if item.get_closest_marker("ci") and not item.get_closest_marker("slow"):
        raise pytest.UsageError(f"{item.nodeid} is marked `ci` but not `slow`")
