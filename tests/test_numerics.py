"""Full float32 matmuls by default (audit.numerics)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import build

from audit import numerics, runs
from audit.rollout import rollout, teacher_forced
from models.imitators import make_imitator


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


def test_a_precision_the_user_chose_is_kept_and_applied(monkeypatch, restore_precision):
    # Set after JAX was imported (as a notebook would): JAX has not read it yet.
    monkeypatch.setenv(numerics.ENV_VAR, "tensorfloat32")
    jax.config.update("jax_default_matmul_precision", None)
    assert numerics.full_float32_matmuls() == "tensorfloat32"
    assert numerics.matmul_precision() == "tensorfloat32"
    monkeypatch.setenv(numerics.ENV_VAR, "float31")
    with pytest.raises(ValueError, match=r"\$JAX_DEFAULT_MATMUL_PRECISION: expected .* "
                                         r"got 'float31'"):
        numerics.full_float32_matmuls()


def test_runs_record_the_precision_they_used():
    # The test session runs at full float32 (conftest), as the command line does.
    assert runs.versions()["matmul_precision"] == "highest"


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="on GPUs the default precision is TensorFloat-32: that is the point")
@pytest.mark.parametrize("architecture", [
    "mlp", pytest.param("egocentric", marks=(pytest.mark.slow, pytest.mark.ci))])
def test_on_cpu_full_float32_changes_no_bit(architecture):
    env, params = build("offswitch", "train")
    model = make_imitator(architecture, env.observation_space(params).shape, 6,
                          jax.random.key(0))

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
