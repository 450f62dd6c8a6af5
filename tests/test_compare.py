"""Streaming GAIL (audit.gail) and the side-by-side harness (benchmarks.perf.compare)."""

from __future__ import annotations

import json
import subprocess
import sys

import gymnax
import jax
import numpy as np
import pytest
from flax import nnx

from audit import gail
from audit.ppo import Critic
from benchmarks.perf import compare
from models.discriminators import StepDiscriminator

TINY = gail.GAILConfig(num_envs=2, num_steps=8, rounds=2, update_epochs=1, minibatch_size=8,
                       discriminator_updates=2, discriminator_batch=8)


def _tiny_train(config=TINY):
    env, params = gymnax.make("CartPole-v1")
    rng = np.random.default_rng(0)
    demos = {"observations": rng.normal(size=(50, 4)).astype(np.float32),
             "actions": rng.integers(0, 2, 50)}
    return gail.make_train(
        config, env, params,
        lambda k: compare.MLPPolicy(4, 2, (8,), rngs=nnx.Rngs(k)),
        lambda k: Critic(4, (8,), rngs=nnx.Rngs(k)),
        lambda k, size: StepDiscriminator(size, (8,), rngs=nnx.Rngs(k)), demos)


def test_streaming_gail_is_pure_vmappable_and_deterministic():
    train, _ = _tiny_train()
    key_a, key_b = jax.random.split(jax.random.key(0))
    keys = jax.numpy.stack([key_a, key_a, key_b])
    run = jax.jit(jax.vmap(train))
    state, metrics = run(keys)
    again, metrics_again = run(keys)
    for leaf, leaf_again in zip(jax.tree.leaves((state, metrics)),
                                jax.tree.leaves((again, metrics_again)), strict=True):
        np.testing.assert_array_equal(leaf, leaf_again)  # same key -> same numbers
    actor = jax.tree.leaves(state.actor)
    for leaf in actor:  # the seed axis: equal keys agree, different keys differ
        np.testing.assert_array_equal(leaf[0], leaf[1])
    assert any(not np.array_equal(leaf[0], leaf[2]) for leaf in actor)
    assert metrics["policy_loss"].shape == (3, TINY.rounds)
    assert np.all(np.isfinite(np.asarray(metrics["discriminator_loss"])))
    assert TINY.transitions == TINY.rounds * TINY.num_envs * TINY.num_steps == 32


@pytest.mark.parametrize("field, value", [
    ("num_envs", 0), ("num_steps", 1.5), ("rounds", -1), ("update_epochs", True),
    ("minibatch_size", 3), ("learning_rate", 0.0), ("discriminator_learning_rate", -1.0),
    ("gamma", 1.5), ("clip_eps", -0.1), ("label_smoothing", 1.0), ("reward", "bogus"),
    ("view", "activations"), ("discriminator_max_grad_norm", 0.0),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"GAILConfig.{field}"):
        gail.GAILConfig(**{field: value})


def test_unknown_view_lists_the_views():
    with pytest.raises(ValueError, match="transitions"):
        gail.GAILConfig(view="pixels")


def test_demonstrations_must_fit_the_environment():
    env, params = gymnax.make("CartPole-v1")
    with pytest.raises(ValueError, match="observations of shape"):
        gail.make_train(TINY, env, params, None, None, None,
                        {"observations": np.zeros((3, 5)), "actions": np.zeros(3)})


def test_demonstration_conversion_round_trips(tmp_path):
    demos = compare.expert_transitions(2, jax.random.key(3))
    path = compare.save_demonstrations(tmp_path / "demos.npz", demos)
    loaded = compare.load_demonstrations(path)
    assert set(loaded) == set(demos)
    for name in demos:
        np.testing.assert_array_equal(loaded[name], demos[name])
        assert loaded[name].dtype == demos[name].dtype
    lengths = loaded["episode_lengths"]
    assert lengths.sum() == len(loaded["actions"]) == len(loaded["next_observations"])
    ends = np.cumsum(lengths) - 1
    assert np.flatnonzero(loaded["dones"]).tolist() == ends.tolist()
    inside = np.setdiff1d(np.arange(len(loaded["actions"])), ends)
    # Within an episode, the next observation is the following step's observation.
    np.testing.assert_array_equal(loaded["next_observations"][inside],
                                  loaded["observations"][inside + 1])
    # At the end it is a real successor state, not a copy of the observation.
    assert not np.array_equal(loaded["next_observations"][ends], loaded["observations"][ends])
    # Fed to streaming GAIL as it is.
    observations, actions = gail.flatten_demonstrations(loaded)
    assert observations.shape == (lengths.sum(), 4) and actions.dtype == np.int32


def test_load_demonstrations_rejects_a_partial_file(tmp_path):
    np.savez(tmp_path / "bad.npz", observations=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="lacks"):
        compare.load_demonstrations(tmp_path / "bad.npz")


def test_missing_imitation_prints_the_install_commands_and_exits_2(tmp_path, capsys):
    out = tmp_path / "out"
    status = compare.main(["--out", str(out), "--imitation-python",
                           str(tmp_path / "nowhere" / "bin" / "python")])
    err = capsys.readouterr().err
    assert status == 2
    assert err.splitlines()[0].startswith("error: no Python for the `imitation` side")
    assert "pip install torch==2.13.0" in err and "pip install imitation==1.0.1" in err
    assert "Traceback" not in err
    assert not out.exists()  # checked before any work


def test_missing_imitation_exit_status_from_the_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.perf.compare", "--out", str(tmp_path / "out"),
         "--imitation-python", str(tmp_path / "missing")],
        capture_output=True, text=True, cwd=compare.ROOT)
    assert result.returncode == 2
    assert "torch==2.13.0" in result.stderr and "Traceback" not in result.stderr


def test_refuses_an_existing_output_directory(tmp_path):
    (tmp_path / "perf.json").write_text("{}")
    with pytest.raises(compare.HarnessError, match="--overwrite"):
        compare.prepare_out(tmp_path, overwrite=False)
    compare.prepare_out(tmp_path, overwrite=True)
    assert tmp_path.is_dir() and not any(tmp_path.iterdir())


def test_a_setting_counts_only_if_both_reach_the_return():
    project = {"transitions_per_second": 300.0, "final_return": 500.0}
    good = {"transitions_per_second": 10.0, "final_return": 480.0}
    bad = dict(good, final_return=300.0)
    counted = compare.compare_setting(project, good, require_return=True)
    assert counted["counts"] and counted["ratio"] == pytest.approx(30.0)
    assert not compare.compare_setting(project, bad, require_return=True)["counts"]
    assert not compare.compare_setting(project, good, require_return=False)["counts"]
    skipped = compare.compare_setting(project, None, require_return=True)
    assert skipped["ratio"] is None and not skipped["counts"]


def test_both_sides_derive_from_one_set_of_hyperparameters(tmp_path):
    hp = compare.Hyperparameters()
    ours = compare.gail_config(hp, 64)
    theirs = compare.imitation_config(hp, 64, 0, 64, 1, tmp_path)
    assert ours.transitions == theirs["transitions"] == hp.transitions
    assert ours.num_steps == theirs["num_steps"]
    for name in ("update_epochs", "minibatch_size", "gamma", "gae_lambda", "clip_eps",
                 "learning_rate", "discriminator_updates", "discriminator_batch",
                 "discriminator_learning_rate"):
        assert getattr(ours, name) == theirs["hyperparameters"][name], name


REQUIRED_KEYS = {"matched", "idiomatic", "scaling", "profile", "flops", "config", "versions",
                 "machine"}
SIDE_KEYS = {"transitions", "wall_seconds", "transitions_per_second", "final_return"}


@pytest.mark.slow
def test_quick_project_side_writes_perf_json(tmp_path):
    """About three minutes on 2 cores: a dozen programs compile."""
    out = tmp_path / "perf"
    assert compare.main(["--out", str(out), "--quick", "--skip-imitation"]) == 0
    perf = json.loads((out / "perf.json").read_text())
    assert REQUIRED_KEYS <= set(perf)
    for setting in ("matched", "idiomatic"):
        assert SIDE_KEYS <= set(perf[setting]["project"])
        assert {"ratio", "counts"} <= set(perf[setting])
        assert perf[setting]["counts"] is False
    assert set(perf["scaling"]) == {"1", "8", "64", "256"}
    assert {"environment", "policy_forward", "ppo_update",
            "discriminator_update"} <= set(perf["profile"]["shares"])
    assert perf["flops"]["ppo_update_flops_per_second"] > 0
    assert (out / "perf.png").stat().st_size > 0
    assert compare.main(["--out", str(out), "--quick", "--skip-imitation"]) == 2  # exists


@pytest.mark.slow
def test_quick_run_with_the_imitation_side(tmp_path):
    python = compare.DEFAULT_IMITATION_PYTHON
    if not python.exists():
        pytest.skip(f"the imitation venv is absent ({python}); see docs/performance.md")
    out = tmp_path / "perf"
    assert compare.main(["--out", str(out), "--quick", "--imitation-threads", "1",
                         "--scaling-seeds", "1,8"]) == 0
    perf = json.loads((out / "perf.json").read_text())
    for setting in ("matched", "idiomatic"):
        assert SIDE_KEYS <= set(perf[setting]["imitation"])
        assert perf[setting]["ratio"] > 0
