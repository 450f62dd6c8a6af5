"""Full float32 matmuls by default (audit.numerics)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import build
from flax import nnx

from audit import numerics, runs
from audit.rollout import rollout, teacher_forced
from models.imitators import MLPImitator


@pytest.fixture
def restore_precision():
    before = jax.config.jax_default_matmul_precision
    yield
    jax.config.update("jax_default_matmul_precision", before)


def test_full_float32_is_set_for_this_process_and_its_workers(monkeypatch, restore_precision):
    monkeypatch.delenv(numerics.ENV_VAR, raising=False)
    jax.config.update("jax_default_matmul_precision", None)
    assert numerics.matmul_precision() == "default"
    assert numerics.full_float32_matmuls() == "highest"
    assert numerics.matmul_precision() == "highest"
    import os

    assert os.environ[numerics.ENV_VAR] == "highest"  # spawned workers read it at import


def test_a_precision_the_user_chose_is_kept(monkeypatch, restore_precision):
    monkeypatch.setenv(numerics.ENV_VAR, "tensorfloat32")
    jax.config.update("jax_default_matmul_precision", "tensorfloat32")
    assert numerics.full_float32_matmuls() == "tensorfloat32"
    assert numerics.matmul_precision() == "tensorfloat32"


def test_runs_record_the_precision_they_used():
    # The test session runs at full float32 (conftest), as the command line does.
    assert runs.versions()["matmul_precision"] == "highest"


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="on GPUs the default precision is TensorFloat-32: that is the point")
def test_on_cpu_full_float32_changes_no_bit():
    env, params = build("offswitch", "train")
    model = MLPImitator(env.observation_space(params).shape, 6, hidden_sizes=(32, 32),
                        rngs=nnx.Rngs(0))

    def run():
        jax.clear_caches()
        episodes = rollout(model, env, params, jax.random.key(1), 4, 16)
        logits, _ = teacher_forced(model, episodes)
        return np.asarray(episodes.action_probs), np.asarray(logits)

    with jax.default_matmul_precision("default"):
        default = run()
    with jax.default_matmul_precision("highest"):
        highest = run()
    for a, b in zip(default, highest, strict=True):
        np.testing.assert_array_equal(a, b)
