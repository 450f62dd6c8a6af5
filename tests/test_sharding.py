"""The seed axis sharded over devices: the same numbers as on one device.

The test session's JAX runs on one CPU device (its backend has started, so the count
cannot change); the runs on 8 simulated devices are subprocesses started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from audit.sharding import devices_for, seed_parallel

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# GAN training vmapped over seeds: XLA compiles a block of 1 seed per device into another
# program than 8 seeds on one device, so sums round differently (observed on jax 0.10.2,
# CPU: up to 4e-6 apart after two iterations, in the losses and the discriminator's
# weights; the seeds' runs themselves are independent). Longer runs drift further apart,
# as any two roundings of a chaotic training run do: the bound holds for this run.
RELATIVE, ABSOLUTE = 1e-4, 1e-5


def test_devices_for_takes_the_most_devices_that_divide_the_seed_count():
    devices = list(range(8))
    assert devices_for(8, devices) == devices
    assert devices_for(16, devices) == devices
    assert devices_for(6, devices) == [0, 1, 2, 3, 4, 5]
    assert devices_for(12, devices) == [0, 1, 2, 3, 4, 5]
    assert devices_for(7, devices) == [0, 1, 2, 3, 4, 5, 6]
    assert devices_for(11, devices) == [0]
    assert devices_for(3, [0]) == [0]
    with pytest.raises(ValueError, match="count: expected a seed axis of length >= 1"):
        devices_for(0, devices)


def test_on_one_device_it_is_jit_of_vmap_and_checks_the_seed_axis():
    def run(key, scale):
        return jax.random.normal(key, (3,)) * scale

    keys = jax.random.split(jax.random.key(0), 4)
    parallel = seed_parallel(run, in_axes=(0, None))
    np.testing.assert_array_equal(parallel(keys, 2.0), jax.jit(jax.vmap(run, (0, None)))(
        keys, 2.0))
    with pytest.raises(ValueError, match="share one leading"):
        seed_parallel(lambda a, b: a + b)(np.zeros(4), np.zeros(3))


def small_gan_run(seeds: int):
    """A small GAN run vmapped over ``seeds`` keys with :func:`seed_parallel`:
    ``(metrics, evaluations, final discriminator leaves, device count used)``."""
    from flax import nnx

    from audit import gan, ppo, registry
    from audit.discriminator import DiscriminatorConfig
    from audit.rollout import rollout_expert
    from models.discriminators import StepDiscriminator
    from models.imitators import MLPImitator

    env, params = registry.get("environments", "offswitch").build("train")
    demos = rollout_expert(registry.get("planners", "demonstrator").make(env), env, params,
                           jax.random.key(0), 16, 48)
    config = gan.GANConfig(iterations=2, episodes=8, ppo_minibatches=2, view="actions",
                           eval_every=2, eval_episodes=8,
                           discriminator=DiscriminatorConfig(updates=2, batch_episodes=4))
    train, _ = gan.make_train(
        config, env, params, lambda k: MLPImitator((9, 9, 8), 6, (32,), rngs=nnx.Rngs(k)),
        lambda k: ppo.Critic(9 * 9 * 8, (32,), rngs=nnx.Rngs(k)),
        lambda k, f: StepDiscriminator(f, (32,), rngs=nnx.Rngs(k)), demos)
    keys = jax.random.split(jax.random.key(7), seeds)
    state, metrics, evaluations = seed_parallel(train)(keys)
    used = len(jax.tree.leaves(state.actor)[0].sharding.device_set)
    leaves = {f"disc_{i}": np.asarray(leaf)
              for i, leaf in enumerate(jax.tree.leaves(state.discriminator))}
    return ({k: np.asarray(v) for k, v in metrics.items()},
            {k: np.asarray(v) for k, v in evaluations.items()}, leaves, used)


def _save_small_gan_run(path: str, seeds: int) -> None:
    metrics, evaluations, leaves, used = small_gan_run(seeds)
    np.savez(path, used=used, devices=len(jax.devices()),
             **{f"m_{k}": v for k, v in metrics.items()},
             **{f"e_{k}": v for k, v in evaluations.items()}, **leaves)


def _in_subprocess(devices: int, code: str, tmp_path) -> None:
    environment = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count="
                       f"{devices}", JAX_PLATFORMS="cpu")
    environment.pop("JAX_NUM_CPU_DEVICES", None)
    subprocess.run([sys.executable, "-c", f"import sys; sys.path[:0] = [{str(TESTS)!r}, "
                    f"{str(ROOT)!r}]\n{code}"], check=True, env=environment, cwd=tmp_path,
                   capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.ci
def test_gan_training_sharded_over_8_devices_gives_the_numbers_of_one(tmp_path):
    path = tmp_path / "eight.npz"
    try:
        _in_subprocess(8, "import test_sharding\n"
                       f"test_sharding._save_small_gan_run({str(path)!r}, 8)", tmp_path)
    except subprocess.CalledProcessError as error:
        pytest.fail(f"the 8-device run failed:\n{error.stderr[-3000:]}")
    with np.load(path) as eight:
        assert int(eight["devices"]) == 8 and int(eight["used"]) == 8  # really sharded
        metrics, evaluations, leaves, used = small_gan_run(8)
        assert used == 1
        for name, value in metrics.items():
            np.testing.assert_allclose(eight[f"m_{name}"], value, rtol=RELATIVE,
                                       atol=ABSOLUTE, err_msg=name)
        for name, value in evaluations.items():
            np.testing.assert_allclose(eight[f"e_{name}"], value, rtol=RELATIVE,
                                       atol=ABSOLUTE, err_msg=name)
        for name, value in leaves.items():
            np.testing.assert_allclose(eight[name], value, rtol=RELATIVE, atol=ABSOLUTE,
                                       err_msg=name)


# A user's plug-in file: the tiny suite of test_bench (organisms trained in seconds, loose
# validity bounds: this tests that sharding changes no number, not the organisms).
TINY_SUITE = '''
import dataclasses

from audit import registry
from audit.bc import BCConfig
from audit.discriminator import DiscriminatorConfig
from audit.gan import GANConfig
from audit.ppo import PPOSettings
from audit.protocol import Suite
from benchmarks import organisms

registry.register("organisms", "honest", dataclasses.replace(
    organisms.HONEST, kl_bound=1e9, event_rate_range=(0.0, 1.0)), replace=True)
registry.register("organisms", "loose_defector", dataclasses.replace(
    organisms.LONG_HORIZON, name="loose_defector", kl_bound=1e9,
    event_rate_range=(0.0, 1.0)))
registry.register("suites", "tiny_sharded", Suite(
    name="tiny_sharded", envs=("offswitch",), organisms=("honest", "loose_defector"),
    views=("actions", "activations+noise"), baselines=("mahalanobis", "random_direction"),
    post_hoc=False, organism=organisms.OrganismConfig(
        hidden_sizes=(16,), episodes=16, bc=BCConfig(updates=30, batch_episodes=8),
        check_episodes=16),
    gan=GANConfig(iterations=2, episodes=8, ppo_minibatches=2,
                  ppo=PPOSettings(update_epochs=1), eval_every=2, eval_episodes=8,
                  discriminator=DiscriminatorConfig(updates=2, batch_episodes=8)),
    discriminator_settings=(("mlp", (("hidden_sizes", (16, 16)),)),), trusted_episodes=16,
    heldout_episodes=16, calibration_episodes=100, test_episodes=16, resamples=20))
'''

# Figures of the 2-device suite against the 1-device one. Scores move by float rounding
# (see RELATIVE above); a rank-based figure changes only if two scores that tie within
# that rounding swap, which moves an AUROC over 16 + 16 episodes by 1/256 per swap.
FIGURE_TOLERANCE = 0.02


@pytest.mark.ci
@pytest.mark.slow
def test_a_suite_with_its_seeds_sharded_over_2_devices_has_the_rows_of_one(
        isolated_registry, tmp_path, capsys):
    import json

    from audit.cli import main

    plugin = tmp_path / "tiny.py"
    plugin.write_text(TINY_SUITE)
    argv = ["--plugin", str(plugin), "bench", "--suite", "tiny_sharded", "--seeds", "2",
            "--processes", "1", "--no-report", "--quiet"]
    sharded = [*argv, "--out", str(tmp_path / "two"), "--cache-dir", str(tmp_path / "c2")]
    try:
        _in_subprocess(2, f"from audit.cli import main\nsys.exit(main({sharded!r}))", tmp_path)
    except subprocess.CalledProcessError as error:
        pytest.fail(f"the 2-device run failed:\n{error.stderr[-3000:]}")
    assert main([*argv, "--out", str(tmp_path / "one"), "--cache-dir",
                 str(tmp_path / "c1")]) == 0, capsys.readouterr().err
    two, one = (json.loads((tmp_path / run / "results.json").read_text())["rows"]
                for run in ("two", "one"))
    assert [(r["organism"], r["detector"], r["view"]) for r in two] == \
        [(r["organism"], r["detector"], r["view"]) for r in one]
    compared, largest = 0, 0.0
    for sharded_row, row in zip(two, one, strict=True):
        # The null control's noise is keyed to the exact bits of its fitting data (so that
        # two models draw independent noise): rounding draws other noise, equally null.
        if row["detector"] == "null":
            continue
        for key, value in row.items():
            if isinstance(value, float) and value == value:
                largest = max(largest, abs(sharded_row[key] - value))
                assert abs(sharded_row[key] - value) <= FIGURE_TOLERANCE, (row["detector"], key)
                compared += 1
    assert compared > 100
    print(f"{compared} figures compared; the largest difference {largest:.4f}")
