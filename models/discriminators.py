"""Discriminators: Flax NNX modules mapping a view of an episode to a logit per step.

Every discriminator is called as ``logits = discriminator(features, mask)`` on one
episode, ``features [T, F]`` (see :mod:`audit.views`) and ``mask [T]``, and returns
``[T]`` logits, positive for "imitator". Sequence discriminators are causal: the
logit at step ``t`` depends only on steps ``<= t``, so a plan can be flagged
before it is carried out.

- :class:`StepDiscriminator` (``mlp``): an MLP on each step's features alone.
- :class:`GRUDiscriminator` (``gru``): a GRU over the episode prefix.
- :class:`AttentionDiscriminator` (``attention``): causal self-attention over the prefix.

A discriminator that can read episodes of a bounded length only (the attention
model's learned positions) says so in an integer attribute ``max_steps``; the
command line checks the environment's episode length against it before training.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class StepDiscriminator(nnx.Module):
    """Per-step MLP discriminator."""

    def __init__(self, feature_size: int, hidden_sizes: Sequence[int] = (128, 128), *,
                 rngs: nnx.Rngs):
        sizes = [feature_size, *hidden_sizes]
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs)
                                for a, b in zip(sizes[:-1], sizes[1:], strict=True)])
        self.head = nnx.Linear(sizes[-1], 1, rngs=rngs)

    def __call__(self, features: jax.Array, mask: jax.Array) -> jax.Array:
        x = features
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        return self.head(x)[..., 0]


class GRUDiscriminator(nnx.Module):
    """Recurrent discriminator: an encoder, a GRU over the prefix, a linear head."""

    def __init__(self, feature_size: int, hidden_size: int = 128, *, rngs: nnx.Rngs):
        self.hidden_size = hidden_size
        self.encoder = nnx.Linear(feature_size, hidden_size, rngs=rngs)
        self.cell = nnx.GRUCell(hidden_size, hidden_size, rngs=rngs)
        self.head = nnx.Linear(hidden_size, 1, rngs=rngs)

    def __call__(self, features: jax.Array, mask: jax.Array) -> jax.Array:
        encoded = jax.nn.relu(self.encoder(features))
        graphdef, state = nnx.split(self.cell)

        def step(carry, x):
            carry, hidden = nnx.merge(graphdef, state)(carry, x)
            return carry, hidden

        _, hidden = jax.lax.scan(step, jnp.zeros((self.hidden_size,)), encoded)
        return self.head(hidden)[..., 0]


class AttentionDiscriminator(nnx.Module):
    """Causal self-attention discriminator with learned positional embeddings.

    It has one learned position per step, so it reads episodes of at most
    ``max_steps`` steps (default 512); longer ones are a ``ValueError`` when traced.
    """

    def __init__(self, feature_size: int, model_size: int = 64, heads: int = 4,
                 max_steps: int = 512, *, rngs: nnx.Rngs):
        self.encoder = nnx.Linear(feature_size, model_size, rngs=rngs)
        self.position = nnx.Embed(max_steps, model_size, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(num_heads=heads, in_features=model_size,
                                                decode=False, rngs=rngs)
        self.norm = nnx.LayerNorm(model_size, rngs=rngs)
        self.mlp = nnx.Linear(model_size, model_size, rngs=rngs)
        self.head = nnx.Linear(model_size, 1, rngs=rngs)
        self.max_steps = max_steps

    def __call__(self, features: jax.Array, mask: jax.Array) -> jax.Array:
        steps = features.shape[0]
        if steps > self.max_steps:
            raise ValueError(f"AttentionDiscriminator: an episode of {steps} steps exceeds its "
                             f"max_steps={self.max_steps}; build it with max_steps >= {steps}")
        x = self.encoder(features) + self.position(jnp.arange(steps))
        causal = nnx.make_causal_mask(jnp.ones((steps,)))
        valid = nnx.make_attention_mask(mask, mask)
        x = x + self.attention(x, mask=nnx.combine_masks(causal, valid))
        x = x + jax.nn.relu(self.mlp(self.norm(x)))
        return self.head(x)[..., 0]


DISCRIMINATORS = {"mlp": StepDiscriminator, "gru": GRUDiscriminator,
                  "attention": AttentionDiscriminator}


def make_discriminator(name: str, feature_size: int, key: jax.Array, **kwargs) -> nnx.Module:
    """Builds a built-in discriminator by name (``mlp``, ``gru``, ``attention``).

    Raises:
      ValueError: for an unknown name, listing the valid ones.
    """
    if name not in DISCRIMINATORS:
        raise ValueError(f"unknown discriminator {name!r}; choose from: "
                         f"{', '.join(DISCRIMINATORS)}")
    return DISCRIMINATORS[name](feature_size, rngs=nnx.Rngs(key), **kwargs)
