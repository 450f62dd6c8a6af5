"""The command line: `audit demos` files and figures, and the one-line errors a user sees."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from audit import registry
from audit.cli import main
from audit.trajectories import load_npz


def run(capsys, *argv):
    code = main(["demos", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_demos_writes_trajectories_and_summary(tmp_path, capsys):
    out = tmp_path / "demos"
    code, stdout, _ = run(capsys, "--env", "offswitch", "--split", "test", "--planner",
                          "long_horizon", "--episodes", "64", "--seed", "3", "--out", str(out))
    assert code == 0 and "incorrigible-event rate" in stdout
    summary = json.loads((out / "summary.json").read_text())
    for key in ("episodes", "event_rate", "event_counts", "return_mean", "length_mean",
                "config", "versions"):
        assert key in summary
    assert summary["episodes"] == 64 and summary["config"]["seed"] == 3
    assert summary["config"]["planner_config"]["interruption_aversion"] == 1.0
    assert summary["versions"]["jax"] and summary["versions"]["gymnax"]
    trajectories = load_npz(out / "trajectories.npz")
    assert trajectories.actions.shape == (64, 48)
    # The summary's figures are the trajectories' figures.
    episodes_with_press = int((np.asarray(trajectories.events) == 1).any(axis=1).sum())
    assert summary["event_counts"]["disable_switch"] == int((np.asarray(trajectories.events)
                                                              == 1).sum())
    assert summary["event_rate"] == pytest.approx(episodes_with_press / 64)
    assert summary["event_rate"] > 0.8
    assert not list(tmp_path.glob(".*partial"))  # nothing left from staging


def test_same_seed_same_file_contents(tmp_path, capsys):
    for name in ("a", "b"):
        assert run(capsys, "--episodes", "16", "--out", str(tmp_path / name), "--quiet")[0] == 0
    a, b = load_npz(tmp_path / "a" / "trajectories.npz"), load_npz(tmp_path / "b" /
                                                                    "trajectories.npz")
    np.testing.assert_array_equal(a.actions, b.actions)
    np.testing.assert_array_equal(a.observations, b.observations)


def test_existing_out_is_kept_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "demos"
    assert run(capsys, "--episodes", "8", "--out", str(out), "--quiet")[0] == 0
    before = (out / "summary.json").read_text()
    code, _, err = run(capsys, "--episodes", "16", "--out", str(out))
    assert code == 2 and "already exists; pass --overwrite" in err
    assert (out / "summary.json").read_text() == before
    assert run(capsys, "--episodes", "16", "--out", str(out), "--overwrite", "--quiet")[0] == 0
    assert json.loads((out / "summary.json").read_text())["episodes"] == 16


@pytest.mark.parametrize("argv,expected", [
    (["--env", "gridworld"], "--env: unknown environment 'gridworld'; choose from: offswitch, "
                             "takeover, unobserved"),
    (["--split", "validation"], "--split: unknown split 'validation' for environment "
                                "'offswitch'; choose from: train, test"),
    (["--planner", "human"], "--planner: unknown planner 'human'; choose from: demonstrator, "
                             "long_horizon, unbounded_utility, watched_only"),
    (["--episodes", "0"], "argument --episodes: expected an integer in [1, 2**31), got 0"),
    (["--episodes", "many"], "argument --episodes: expected a positive integer, got 'many'"),
])
def test_bad_arguments_get_one_line_and_exit_code_2(tmp_path, capsys, argv, expected):
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "x"))
    assert code == 2
    assert err.count("\n") == 1 and expected in err
    assert not (tmp_path / "x").exists()


def test_unwritable_out_is_a_usage_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = run(capsys, "--out", str(blocker / "demos"))
    assert code == 2 and err.count("\n") == 1
    assert f"{blocker} is not a directory" in err


def test_console_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "audit.cli", "demos", "--env", "nope"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "choose from: offswitch" in result.stderr


@dataclasses.dataclass(frozen=True)
class _AlwaysStay:
    """A user's expert: a plug-in registered in code, run by the command line."""

    def plan(self, env_state, env_params):
        return None

    def action_logits(self, plan, observation, env_state):
        return jnp.where(jnp.arange(6) == 4, 0.0, -jnp.inf)


def test_a_plugged_in_planner_runs_through_the_command_line(tmp_path, capsys):
    registry.register("planners", "_always_stay",
                      registry.PlannerSpec(name="_always_stay", make=lambda env: _AlwaysStay()))
    try:
        out = tmp_path / "stay"
        assert run(capsys, "--planner", "_always_stay", "--episodes", "8", "--out", str(out),
                   "--quiet")[0] == 0
        assert np.all(np.asarray(load_npz(out / "trajectories.npz").actions) == 4)
    finally:
        registry._registered["planners"].pop("_always_stay")


@pytest.mark.parametrize("argv,flag,expected", [
    (["--env", "gymnax:Pendulum-v1"], "--env",
     "'gymnax:Pendulum-v1' has a continuous action space"),
    # Catch-bsuite pads its episodes to 1000 steps; the attention model has 512 positions.
    (["--env", "gymnax:Catch-bsuite", "--discriminator", "attention"], "--discriminator",
     "'attention' reads episodes of at most 512 steps; 'gymnax:Catch-bsuite' episodes last "
     "up to 1000 steps"),
])
def test_train_gan_refuses_what_it_cannot_run_in_one_line(tmp_path, capsys, argv, flag,
                                                           expected):
    code = main(["train-gan", *argv, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"audit train-gan: error: {flag}: "), err
    assert expected in err
    assert not (tmp_path / "x").exists()


def test_demos_and_train_bc_refuse_continuous_actions_in_one_line(tmp_path, capsys):
    for command in ("demos", "train-bc"):
        assert main([command, "--env", "gymnax:Pendulum-v1", "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--env: " in err and "continuous action space" in err
