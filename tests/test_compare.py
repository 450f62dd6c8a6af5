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
from audit.ppo import Critic, PPOSettings
from benchmarks.perf import _imitation_side, compare
from models.discriminators import StepDiscriminator

TINY = gail.GAILConfig(num_envs=2, num_steps=8, rounds=2, ppo=PPOSettings(update_epochs=1),
                       minibatch_size=8, discriminator_updates=2, discriminator_batch=8)


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


@pytest.mark.slow
@pytest.mark.ci
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
    ("num_envs", 0), ("num_steps", 1.5), ("rounds", -1), ("minibatch_size", 3),
    ("discriminator_learning_rate", -1.0), ("gradient_penalty", -1.0),
    ("label_smoothing", 1.0), ("reward", "bogus"), ("view", "activations"),
    ("discriminator_max_grad_norm", 0.0), ("ppo", {"learning_rate": 1e-3}),
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


PROJECT = {"transitions_per_second": 300.0, "transitions_per_second_including_compile": 150.0,
           "final_return": 500.0, "final_return_min": 500.0}


def test_a_setting_counts_only_if_every_imitator_reaches_the_return():
    good = {"transitions_per_second": 10.0, "final_return": 480.0}
    counted = compare.compare_setting(PROJECT, good, require_return=True)
    assert counted["counts"] and counted["ratio"] == pytest.approx(30.0)
    assert counted["ratio_including_compile"] == pytest.approx(15.0)
    bad = dict(good, final_return=300.0)
    assert not compare.compare_setting(PROJECT, bad, require_return=True)["counts"]
    # A good mean over seeds does not hide a seed below the bar.
    one_bad_seed = dict(PROJECT, final_return=497.8, final_return_min=465.0)
    entry = compare.compare_setting(one_bad_seed, good, require_return=True)
    assert not entry["counts"] and "worst seed 465.0" in entry["counts_reason"]
    assert entry["project"]["final_return"] == 497.8  # the mean is still recorded
    assert not compare.compare_setting(PROJECT, good, require_return=False)["counts"]
    skipped = compare.compare_setting(PROJECT, None, require_return=True)
    assert skipped["ratio"] is None and skipped["ratio_including_compile"] is None
    assert not skipped["counts"]


def test_the_target_is_judged_with_and_without_compilation():
    imitation = {"transitions_per_second": 6.0, "final_return": 500.0}
    target = compare.target_status(compare.compare_setting(PROJECT, imitation, True))
    assert target["ratio"] == pytest.approx(50.0)
    assert target["ratio_including_compile"] == pytest.approx(25.0)
    assert target["met"] and not target["met_including_compile"]
    line = compare.target_summary(target)
    assert "met without compilation (50.0x)" in line
    assert "not met including compilation (25.0x)" in line
    fast = compare.target_status(compare.compare_setting(
        dict(PROJECT, transitions_per_second_including_compile=240.0), imitation, True))
    assert fast["met"] and fast["met_including_compile"]
    # Neither is met when the setting does not count, however large the ratio.
    failed = compare.target_status(compare.compare_setting(
        PROJECT, dict(imitation, final_return=100.0), True))
    assert not failed["met"] and not failed["met_including_compile"]
    assert compare.target_summary(failed).endswith("the setting does not count")


def test_the_printed_summary_states_both_ratios_and_the_target():
    imitation = {"transitions_per_second": 6.0, "final_return": 500.0}
    perf = {"matched": compare.compare_setting(PROJECT, imitation, True),
            "idiomatic": compare.compare_setting(
                dict(PROJECT, final_return=497.8, final_return_min=465.0), imitation, True)}
    perf["target"] = compare.target_status(perf["idiomatic"])
    matched, idiomatic, target = compare.format_summary(perf).splitlines()[1:]
    assert "50.0x" in matched and "25.0x" in matched and matched.endswith("True")
    assert "465.0/497.8/500.0" in idiomatic and idiomatic.endswith("False")
    assert target == ("target 30x in idiomatic: not met without compilation (50.0x), not met "
                      "including compilation (25.0x); the setting does not count")


def _linear_sizes(module) -> list[int]:
    """Output sizes of a module's hidden layers."""
    return [layer.kernel[...].shape[1] for layer in module.hidden]


def _mlp(module, x, activation):
    for layer in module.hidden:
        x = activation(x @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...]))
    return x @ np.asarray(module.head.kernel[...]) + np.asarray(module.head.bias[...])


ACTIVATIONS = {"tanh": np.tanh, "relu": lambda x: np.maximum(x, 0.0)}


@pytest.mark.parametrize("setting", compare.SETTINGS + compare.QUICK_SETTINGS,
                         ids=lambda s: s.name + ("-quick" if "quick" in s.description else ""))
def test_imitation_gets_the_project_side_hyperparameters_and_networks(setting, tmp_path):
    """The kwargs the imitation side hands SB3 and imitation, against this side's own."""
    hp = compare.QUICK if "quick" in setting.description else compare.Hyperparameters()
    ours = compare.gail_config(hp, setting.project_envs)
    config = json.loads(json.dumps(compare.imitation_config(
        hp, setting.imitation_envs, 0, 64, 1, tmp_path)))  # as the side reads it
    theirs = _imitation_side.library_arguments(config)  # no torch in this venv
    ppo, gail_kwargs = theirs["PPO"], theirs["GAIL"]
    assert ppo["learning_rate"] == ours.ppo.learning_rate and not ours.ppo.anneal_lr
    assert ppo["n_epochs"] == ours.ppo.update_epochs
    assert ppo["batch_size"] == ours.minibatch_size
    assert ppo["gamma"] == ours.ppo.gamma and ppo["gae_lambda"] == ours.ppo.gae_lambda
    assert ppo["clip_range"] == ours.ppo.clip_eps
    assert ppo["max_grad_norm"] == ours.ppo.max_grad_norm
    assert ppo["ent_coef"] == ours.ppo.entropy_coef and ppo["vf_coef"] == ours.ppo.value_coef
    assert ppo["n_steps"] * theirs["make_vec_env"]["n_envs"] == ours.transitions_per_round
    assert theirs["make_vec_env"]["n_envs"] == setting.imitation_envs
    assert theirs["train"]["total_timesteps"] == ours.transitions
    assert gail_kwargs["demo_batch_size"] == ours.discriminator_batch
    assert gail_kwargs["n_disc_updates_per_round"] == ours.discriminator_updates
    assert gail_kwargs["disc_opt_kwargs"] == {"lr": ours.discriminator_learning_rate}

    env, env_params = compare._environment()
    make_actor, make_critic, make_discriminator = compare._module_factories(
        hp, env, env_params)
    actor, critic = make_actor(jax.random.key(0)), make_critic(jax.random.key(1))
    disc = make_discriminator(jax.random.key(2), 6)  # observation and one-hot action
    assert _linear_sizes(actor) == theirs["policy_kwargs"]["net_arch"]["pi"]
    assert _linear_sizes(critic) == theirs["policy_kwargs"]["net_arch"]["vf"]
    assert _linear_sizes(disc) == list(theirs["BasicRewardNet"]["hid_sizes"])
    # The activations named to the libraries are the ones these modules compute.
    obs = np.random.default_rng(0).normal(size=4).astype(np.float32)
    policy_act = ACTIVATIONS[theirs["policy_kwargs"]["activation_fn"]]
    logits, _ = actor(obs, actor.initial_carry(), None)
    np.testing.assert_allclose(logits, _mlp(actor, obs, policy_act), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(critic(obs), _mlp(critic, obs, policy_act)[0], rtol=1e-5,
                               atol=1e-6)
    features = np.random.default_rng(1).normal(size=6).astype(np.float32)
    disc_act = ACTIVATIONS[theirs["BasicRewardNet"]["activation"]]
    np.testing.assert_allclose(disc(features, None), _mlp(disc, features, disc_act)[0],
                               rtol=1e-5, atol=1e-6)


def test_library_arguments_name_a_missing_or_bad_field(tmp_path):
    config = compare.imitation_config(compare.QUICK, 8, 0, 8, 1, tmp_path)
    del config["hyperparameters"]["gamma"]
    with pytest.raises(ValueError, match=r"config\['hyperparameters'\] lacks gamma"):
        _imitation_side.library_arguments(config)
    config = compare.imitation_config(compare.QUICK, 8, 0, 8, 1, tmp_path)
    config["hyperparameters"]["policy_activation"] = "gelu"
    with pytest.raises(ValueError, match="policy_activation"):
        _imitation_side.library_arguments(config)


def test_the_faster_thread_count_wins_without_a_margin():
    assert _imitation_side.faster_thread_count({1: 100.0, 2: 101.0}) == 2
    assert _imitation_side.faster_thread_count({1: 100.0, 2: 99.0}) == 1
    assert _imitation_side.faster_thread_count({2: 50.0, 1: 50.0}) == 1  # a tie: fewer
    with pytest.raises(ValueError, match="rates"):
        _imitation_side.faster_thread_count({})


def test_default_arguments_parse():
    args = compare.parse_args(["--out", "x"])
    assert args.imitation_threads == "auto"
    assert args.scaling_seeds == compare.SCALING_SEEDS
    assert compare.parse_args(["--out", "x", "--imitation-threads", "2"]).imitation_threads == 2


@pytest.mark.parametrize("flag, value", [
    ("--rounds", "0"), ("--seeds", "0"), ("--seeds", "two"), ("--scaling-seeds", "1,0"),
    ("--scaling-seeds", "-8"), ("--scaling-seeds", "1,x"), ("--imitation-threads", "0"),
    ("--imitation-threads", "many"), ("--eval-episodes", "0"),
])
def test_bad_arguments_are_one_line_errors_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare.parse_args(["--out", "x", f"{flag}={value}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        f"python -m benchmarks.perf.compare: error: argument {flag}:")


def test_bad_rounds_from_the_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.perf.compare", "--out", str(tmp_path / "out"),
         "--rounds", "0", "--skip-imitation"],
        capture_output=True, text=True, cwd=compare.ROOT)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error: argument --rounds: must be a positive integer, got 0" in result.stderr
    assert not (tmp_path / "out").exists()


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
    assert compare.main(["--out", str(out), "--quick", "--scaling-seeds", "1,8"]) == 0
    perf = json.loads((out / "perf.json").read_text())
    threads = perf["imitation_threads"]
    assert threads["requested"] == "auto" and threads["chosen"] in (1, 2)
    rates = threads["calibration"]["transitions_per_second"]
    assert threads["chosen"] == max((1, 2), key=lambda n: (rates[str(n)], -n))
    for setting in ("matched", "idiomatic"):
        assert SIDE_KEYS <= set(perf[setting]["imitation"])
        assert perf[setting]["imitation"]["torch_threads"] == threads["chosen"]
        assert perf[setting]["ratio"] > 0 and perf[setting]["ratio_including_compile"] > 0
    assert {"met", "met_including_compile"} <= set(perf["target"])
