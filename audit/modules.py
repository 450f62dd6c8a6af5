"""Small functional helpers around Flax NNX modules and optax, shared by the trainers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def abstract_module(make: Callable[[jax.Array], nnx.Module]) -> tuple[Any, Any]:
    """``(graphdef, abstract_state)`` of ``make(key)``, built without allocating weights."""
    return nnx.split(nnx.eval_shape(lambda: make(jax.random.key(0))))


def initial_carry_of(graphdef, abstract_state) -> jax.Array:
    """The imitator's ``initial_carry()``, its very value, from the abstract module.

    The imitator contract (:mod:`models.imitators`) makes the initial carry a constant
    that does not depend on the weights, so it can be read without allocating them.
    Its value matters: an imitator may mark "no step taken yet" in it (the model
    organisms' plan bit starts at -1 and is set at the first step).

    Raises:
      ValueError: if ``initial_carry()`` depends on the weights (it is not concrete).
    """
    message = ("an imitator's initial_carry() must be a constant array that does not depend "
               "on its weights; got {}")
    # Trainers build their loops inside jax.jit (a warm start inside the GAN's train),
    # where jnp.zeros would be a tracer: a constant is evaluated here, not traced.
    with jax.ensure_compile_time_eval():
        try:
            carry = nnx.merge(graphdef, abstract_state).initial_carry()
        except TypeError as error:  # arithmetic on an abstract (weightless) parameter
            raise ValueError(message.format(f"an error computing it: {error}")) from error
    if isinstance(carry, jax.ShapeDtypeStruct | jax.core.Tracer):
        raise ValueError(message.format(repr(carry)))
    return jnp.asarray(carry)


def flat_state(state) -> dict[str, Any]:
    """``{"path/to/leaf": value}`` of an NNX State (parameters or captured intermediates)."""
    flat = {}
    for path, value in nnx.to_flat_state(state):
        value = value.get_value() if hasattr(value, "get_value") else value
        flat["/".join(str(part) for part in path)] = value
    return flat


def scan_updates(loss_fn: Callable, optimizer: optax.GradientTransformation, params, opt_state,
                 inputs, has_aux: bool = False,
                 on_step: Callable[[Any], None] | None = None):
    """One optax step per element of ``inputs``, as a ``lax.scan``.

    Args:
      loss_fn: ``loss_fn(params, input) -> loss`` (or ``(loss, aux)`` with ``has_aux``);
        the input usually carries a PRNG key or minibatch indices.
      optimizer: the optax transformation.
      params: initial parameters.
      opt_state: its optimiser state (``optimizer.init(params)`` for a fresh run).
      inputs: a pytree with a leading axis, one slice per update.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      on_step: optional traced hook called with each input after its update.

    Returns:
      ``(params, opt_state, outputs)``, ``outputs`` the stacked loss (or ``(loss, aux)``).
    """

    def update(carry, item):
        params, opt_state = carry
        output, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, item)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        if on_step is not None:
            on_step(item)
        return (optax.apply_updates(params, updates), opt_state), output

    (params, opt_state), outputs = jax.lax.scan(update, (params, opt_state), inputs)
    return params, opt_state, outputs
