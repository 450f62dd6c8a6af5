"""Float comparisons that are exact where the arithmetic is.

On CPU, XLA evaluates one computation the same way whether it is jitted alone, inside a
scan or inside a larger program, so the tests demand bit-identical results there. On a
GPU the same computation fused into different programs rounds differently in the last
place (measured on an H200: softmax probabilities 3e-8 apart, initial weights 2e-7 apart),
so there the tests allow float32 rounding and no more: a real leak (a gradient reaching a
masked weight, another action distribution) moves values by orders of magnitude more.
"""

from __future__ import annotations

import jax
import numpy as np

# About 30 float32 ulps relative (2 ** -23 is 1.2e-7; the largest difference seen on an
# H200 was 8.7e-7), with an absolute floor near zero: far below any real change.
RTOL, ATOL = 4e-6, 1e-7


def assert_same_floats(actual, desired) -> None:
    """Bit-identical on CPU; within float32 rounding on other backends."""
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(actual, desired)
    else:
        np.testing.assert_allclose(actual, desired, rtol=RTOL, atol=ATOL)
