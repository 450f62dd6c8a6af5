"""Full float32 matrix products by default, on every backend.

On NVIDIA GPUs since Ampere (A100, H100, H200) JAX computes float32 matrix products in
TensorFloat-32 by default: operands rounded to 10 mantissa bits, about 1e-3 relative
error instead of float32's 1e-7. This project's models are small enough that the speed
TF32 buys does not matter, while its error does: on an H200 the white-box Mahalanobis
monitor's traceable score (a quadratic form in a ridged inverse covariance) came out
6-15% off its float64 value, and two teacher-forced passes of one model disagreed by
5e-4, so figures would depend on the hardware they were measured on. On CPU the setting
changed nothing where it was checked (rollouts and teacher-forced passes of the MLP and
egocentric imitators are bit-identical with and without it; ``tests/test_numerics.py``).

The ``audit`` command line calls :func:`full_float32_matmuls` before it runs anything,
so every figure it writes is computed in float32 on any device; the test suite does the
same. A user who wants TF32 sets ``JAX_DEFAULT_MATMUL_PRECISION`` (JAX's own variable,
e.g. ``tensorfloat32``) and it is respected. Runs record the precision they used
(``versions["matmul_precision"]`` in ``results.json``).

Example::

  from audit import numerics
  numerics.full_float32_matmuls()   # before building models, in a script of your own
"""

from __future__ import annotations

import os

ENV_VAR = "JAX_DEFAULT_MATMUL_PRECISION"
FULL_FLOAT32 = "highest"


def full_float32_matmuls() -> str:
    """Sets JAX's default matmul precision to full float32 unless the environment already
    chose one; also sets the environment variable, so that spawned worker processes (a
    suite's, fresh interpreters) compute the same way.

    Returns:
      the precision now in force (the environment's choice, or ``"highest"``).
    """
    import jax

    chosen = os.environ.get(ENV_VAR) or FULL_FLOAT32
    os.environ[ENV_VAR] = chosen
    # Applied here too: the user's variable may have been set after JAX was imported
    # (JAX reads it at import), and JAX checks the value.
    try:
        jax.config.update("jax_default_matmul_precision", chosen)
    except ValueError as error:
        raise ValueError(f"${ENV_VAR}: expected a JAX matmul precision such as "
                         f"'highest', 'float32' or 'tensorfloat32', got {chosen!r}") from error
    return chosen


def matmul_precision() -> str:
    """JAX's default matmul precision now in force (``"default"`` when none was set)."""
    import jax

    return str(jax.config.jax_default_matmul_precision or "default")
