"""Helpers shared by the benchmark scripts: timing, and parsing their list flags."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one untimed (compiling) run."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def positive_ints(text: str) -> tuple[int, ...]:
    """``"32,256"`` -> ``(32, 256)``: comma-separated integers >= 1 (a flag's value).

    Raises:
      ValueError: for an empty part, a part that is not an integer, or one below 1 (each
        script words its own argparse error).
    """
    values = tuple(int(part) for part in text.split(","))
    if min(values) < 1:
        raise ValueError(f"{text!r} has a value below 1")
    return values
