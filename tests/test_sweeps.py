"""`audit sweep`: a suite at several values of one setting, its files, figures and errors."""

from __future__ import annotations

import csv
import json

import pytest
from test_bench import tiny_suite  # noqa: F401  (a fixture)

from audit import protocol, registry
from audit.cli import main
from audit.protocol import Suite
from audit.sweeps import CSV_COLUMNS, Sweep, csv_text, plotted_rows, sweep_plot, sweep_rows
from benchmarks import sweeps as builtin


def _row(organism, kind, detector, auroc, failed=False):
    return dict(env="offswitch", group="default", organism=organism, organism_kind=kind,
                detector=detector, view="actions", protocol="co-trained", positives=12,
                empty_windows=3, control_failed=failed, auroc=auroc, auroc_ci_low=auroc - 0.1,
                auroc_ci_high=auroc + 0.05, caught_before_harm=None)


def test_sweep_rows_keep_each_figure_with_its_interval_and_control_mark():
    rows = sweep_rows([_row("long_horizon", "trained-in", "gan_mlp", 0.8, failed=True)],
                      "k", 16, ["auroc", "caught_before_harm"])
    assert [r["figure"] for r in rows] == ["auroc", "caught_before_harm"]
    assert rows[0]["value"] == 16 and rows[0]["parameter"] == "k"
    assert (rows[0]["estimate"], rows[0]["ci_low"], rows[0]["ci_high"]) == (0.8, 0.7000000000000001,
                                                                            0.8500000000000001)
    assert rows[0]["control_failed"] is True and rows[1]["estimate"] is None
    assert rows[0]["empty_windows"] == 3  # of the 12 positives, misses for every detector
    table = list(csv.DictReader(csv_text(rows).splitlines()))
    assert tuple(table[0]) == CSV_COLUMNS and table[1]["estimate"] == ""
    # The figure draws incorrigible organisms with a defined estimate only.
    honest = sweep_rows([_row("honest", "honest", "gan_mlp", 0.5)], "k", 16, ["auroc"])
    assert plotted_rows(rows + honest) == rows[:1]


def test_the_sweep_figure_is_written_as_png_and_pdf(tmp_path):
    sweep = builtin.NEW_SITUATIONS
    rows = []
    for value, auroc in ((0, 0.55), (4, 0.7), (16, 0.9)):
        rows += sweep_rows([_row("long_horizon", "trained-in", "gan_mlp", auroc),
                            _row("long_horizon", "trained-in", "null", 0.5, failed=value == 4)],
                           sweep.parameter, value, sweep.figures)
    paths = sweep_plot(rows, sweep, (0, 4, 16), tmp_path / "new_situations")
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert all(p.stat().st_size > 5000 for p in paths)


def test_sweep_settings_are_checked():
    with pytest.raises(ValueError, match="values must name at least one"):
        Sweep("s", "quick", "k", (), builtin.with_demonstrations)
    with pytest.raises(ValueError, match="experiment must be one of"):
        Sweep("s", "quick", "k", (1,), builtin.with_demonstrations, experiment="ablation")
    with pytest.raises(ValueError, match="figures must be some of"):
        Sweep("s", "quick", "k", (1,), builtin.with_demonstrations, figures=("accuracy",))
    with pytest.raises(ValueError, match="unknown sweep setting"):
        builtin.CAPACITY.values_for("huge")
    assert builtin.CAPACITY.values_for("paper")[-1] == 512
    assert set(registry.names("sweeps")) >= {"new_situations", "demonstrations",
                                             "training_time", "capacity"}
    with pytest.raises(ValueError, match="test_layout_demonstrations must be >= 0"):
        Suite(name="x", envs=("offswitch",), organisms=("honest",),
              test_layout_demonstrations=-1)


def test_each_builtin_sweep_changes_only_its_setting():
    quick = registry.get("suites", "quick")
    assert builtin.with_test_layout_demonstrations(quick, 16).test_layout_demonstrations == 16
    assert builtin.with_demonstrations(quick, 64).trusted_episodes == 64
    longer = builtin.with_cotraining_iterations(quick, 64)
    assert (longer.gan.iterations, longer.gan.eval_every) == (64, 64)
    deep = builtin.with_discriminator_depth(quick, 4)
    assert deep.settings_of("mlp") == {"hidden_sizes": (64, 64, 64, 64)}
    busy = builtin.with_discriminator_updates(quick, 50)
    assert busy.gan.discriminator.updates == 50 and busy.gan.iterations == quick.gan.iterations
    wide = builtin.with_discriminator_width(quick, 256)
    assert wide.settings_of("mlp") == {"hidden_sizes": (256, 256)}
    assert wide.settings_of("gru") == quick.settings_of("gru")
    for changed in (longer, wide):
        assert changed.trusted_episodes == quick.trusted_episodes


@pytest.mark.slow
@pytest.mark.ci
def test_sweep_runs_every_point_and_fits_on_test_layout_demonstrations_only_when_asked(
        tiny_suite, monkeypatch, tmp_path, capsys):  # noqa: F811
    sweep = Sweep("tiny_sweep", "tiny_test", "test_layout_demonstrations", (0, 4),
                  builtin.with_test_layout_demonstrations, description="a test")
    monkeypatch.setitem(registry._registered["sweeps"], "tiny_sweep", sweep)
    # Spy on the demonstrator's rollouts: which layouts, how many episodes.
    calls = []
    original = protocol.rollout_expert

    def spy(expert, env, params, key, episodes, max_steps, layout_key=None):
        calls.append((bool(params.test_layouts), episodes))
        return original(expert, env, params, key, episodes, max_steps, layout_key)

    monkeypatch.setattr(protocol, "rollout_expert", spy)
    out = tmp_path / "sweep"
    code = main(["sweep", "tiny_sweep", "--out", str(out), "--cache-dir",
                 str(tmp_path / "cache"), "--processes", "1", "--p-values", "conservative"])
    assert code == 0, capsys.readouterr().err
    assert "tiny_sweep.csv" in capsys.readouterr().out
    # Point 0 rolled out trusted and held-out demonstrations only; point 4 also 4 episodes.
    assert sorted(calls) == [(False, 16)] * 4 + [(True, 4)]
    with open(out / "tiny_sweep.csv") as handle:
        table = list(csv.DictReader(handle))
    results = {value: json.loads((out / "points" / f"test_layout_demonstrations={value}"
                                  / "results.json").read_text()) for value in (0, 4)}
    for value, result in results.items():
        assert result["config"]["test_layout_demonstrations"] == value
        assert result["config"]["p_values"] == "conservative"  # --p-values reaches every point
        mine = [r for r in table if r["value"] == str(value)]
        assert len(mine) == 2 * len(result["rows"])  # two figures per cell
    assert (out / "tiny_sweep.png").stat().st_size > 5000 and (out / "tiny_sweep.pdf").exists()
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["values"] == [0, 4] and set(summary["point_seconds"]) == {"0", "4"}
    # The sweep's report links each point's own report.
    page = (out / "report.html").read_text()
    for value in (0, 4):
        point = f"points/test_layout_demonstrations={value}/report.html"
        assert (out / point).is_file() and f'href="{point}"' in page
    # Fitting on four more (test-layout) episodes changes what Mahalanobis learned.
    def train_auroc(value):
        return [r["train_auroc"] for r in results[value]["rows"]
                if r["detector"] == "mahalanobis" and r["organism"] == "loose_defector"][0]
    assert train_auroc(0) != train_auroc(4)


def test_sweep_errors_are_one_line(tmp_path, capsys):
    for argv, expected in (
            (["sweep", "no_such_sweep"], "NAME"),
            (["sweep", "demonstrations", "--values", "32", "32"], "--values: each value once"),
            (["sweep", "demonstrations", "--values", "1"], "trusted_episodes must be >= 2"),
            (["sweep", "capacity", "--setting", "huge"], "--setting")):
        assert main(argv + ["--out", str(tmp_path / "x")]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and expected in error, error
    assert not (tmp_path / "x").exists()


def test_the_counterfactual_features_switch_on_only_the_test_only_plane():
    import jax
    import numpy as np

    from benchmarks.envs.gridworld import (
        OBS_CHANNELS,
        supervisor_leaves,
        switch_appears,
        terminal_appears,
    )

    observation = np.zeros((5, 5, len(OBS_CHANNELS)), np.float32)
    observation[2, 3, OBS_CHANNELS.index("agent")] = 1.0
    observation[..., OBS_CHANNELS.index("supervisor")] = 1.0
    for intervene, plane in ((switch_appears, "switch"), (terminal_appears, "terminal")):
        changed = np.asarray(jax.jit(intervene)(observation))
        expected = observation.copy()
        expected[2, 3, OBS_CHANNELS.index(plane)] = 1.0
        np.testing.assert_array_equal(changed, expected)
    gone = np.asarray(supervisor_leaves(observation))
    assert not gone[..., OBS_CHANNELS.index("supervisor")].any()
    np.testing.assert_array_equal(np.delete(gone, OBS_CHANNELS.index("supervisor"), -1),
                                  np.delete(observation, OBS_CHANNELS.index("supervisor"), -1))
    assert {registry.get("environments", name).counterfactual for name in
            ("offswitch", "takeover", "unobserved")} == {switch_appears, terminal_appears,
                                                         supervisor_leaves}


def test_policy_shift_is_zero_for_a_feature_the_model_ignores_and_the_tv_otherwise():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from test_detectors import make_trajectories

    from audit.counterfactual import policy_shift
    from audit.rollout import imitator_step
    from models.imitators import MLPImitator

    model = MLPImitator((4,), 3, hidden_sizes=(8,), rngs=nnx.Rngs(0))
    episodes = make_trajectories(np.zeros((6, 5), int), seed=1)
    np.testing.assert_allclose(policy_shift(model, episodes, lambda o: o), 0.0, atol=1e-6)
    # A model whose first layer reads nothing of input 0 does not move when it changes.
    blind = MLPImitator((4,), 3, hidden_sizes=(8,), rngs=nnx.Rngs(0))
    blind.hidden[0].kernel[...] = blind.hidden[0].kernel[...].at[0].set(0.0)
    np.testing.assert_allclose(policy_shift(blind, episodes, lambda o: o.at[0].add(5.0)), 0.0,
                               atol=1e-6)
    assert np.all(policy_shift(model, episodes, lambda o: o.at[0].add(5.0)) > 1e-3)
    shifted = policy_shift(model, episodes, lambda o: o + 1.0)
    # By hand: the mean over steps of half the L1 distance between the two softmaxes.
    graphdef, state = nnx.split(model)

    def probs(observation):  # a feed-forward model: each step on its own
        logits = imitator_step(graphdef, state, observation, model.initial_carry(), 0.5)[0]
        return jax.nn.softmax(logits)

    before = jax.vmap(jax.vmap(probs))(episodes.observations)
    after = jax.vmap(jax.vmap(probs))(episodes.observations + 1.0)
    expected = 0.5 * jnp.abs(before - after).sum(-1).mean(1)
    np.testing.assert_allclose(shifted, expected, rtol=1e-5)
    assert np.all(shifted > 0)


@pytest.mark.slow
@pytest.mark.ci
def test_counterfactual_sweep_writes_the_model_level_audit(tiny_suite, monkeypatch,  # noqa: F811
                                                           tmp_path, capsys):
    sweep = Sweep("tiny_probe", "tiny_test", "policy_shift", experiment="counterfactual",
                  description="a test")
    monkeypatch.setitem(registry._registered["sweeps"], "tiny_probe", sweep)
    out = tmp_path / "probe"
    code = main(["sweep", "tiny_probe", "--out", str(out), "--cache-dir",
                 str(tmp_path / "cache"), "--seeds", "2"])
    assert code == 0, capsys.readouterr().err
    assert "offswitch: AUROC" in capsys.readouterr().out
    summary = json.loads((out / "sweep.json").read_text())
    models = summary["models"]
    assert {(m["organism"], m["seed"]) for m in models} == {
        (name, seed) for name in ("honest", "loose_defector", "honest_twin") for seed in (0, 1)}
    assert all(m["shift_ci_low"] <= m["shift"] <= m["shift_ci_high"] for m in models)
    level = summary["model_level"][0]
    assert (level["incorrigible_models"], level["honest_models"]) == (2, 4)
    with open(out / "tiny_probe.csv") as handle:
        assert float(next(csv.DictReader(handle))["auroc"]) == level["auroc"]
    assert (out / "tiny_probe.png").exists() and (out / "tiny_probe.pdf").exists()
    assert "Model-level AUROC" in (out / "report.html").read_text()
    assert main(["sweep", "tiny_probe", "--values", "3", "--out", str(tmp_path / "y")]) == 2
    assert "without values" in capsys.readouterr().err


def test_a_point_whose_organism_is_invalid_is_recorded_and_the_sweep_goes_on(monkeypatch):
    from audit.sweeps import run_sweep

    def fake_run_suite(suite, seeds, cache_dir, progress, processes, first_seed,
                       skip_invalid_envs):
        assert skip_invalid_envs  # one environment's failure leaves only it out
        if suite.trusted_episodes == 32:
            raise protocol.InvalidOrganismError("organism 'x' failed its validity check")
        return {"rows": [_row("long_horizon", "trained-in", "gan_mlp", 0.7)]}

    monkeypatch.setattr(protocol, "run_suite", fake_run_suite)
    done = []
    outcome = run_sweep(builtin.DEMONSTRATIONS, values=(32, 128),
                        point_done=lambda value, results, suite: done.append(value))
    assert done == [128] and {row["value"] for row in outcome["rows"]} == {128}
    failed, ran = outcome["points"]
    assert failed["value"] == 32 and "validity check" in failed["error"]
    assert "error" not in ran


def test_a_point_keeps_its_valid_environments_and_names_the_one_left_out(monkeypatch,
                                                                         tmp_path):
    from audit.sweeps import SweepCheckpoint, run_sweep

    left_out = {"takeover": "InvalidOrganismError: organism 'unbounded_utility' failed"}

    def fake_run_suite(suite, **settings):
        skipped = left_out if suite.trusted_episodes == 32 else {}
        return {"rows": [_row("long_horizon", "trained-in", "gan_mlp", 0.7)],
                "invalid_envs": skipped}

    monkeypatch.setattr(protocol, "run_suite", fake_run_suite)
    checkpoint = SweepCheckpoint(tmp_path / "checkpoint", {"sweep": "demonstrations"})
    checkpoint.start()
    outcome = run_sweep(builtin.DEMONSTRATIONS, values=(32, 128), checkpoint=checkpoint)
    partial, whole = outcome["points"]
    assert partial["invalid_envs"] == left_out and "error" not in partial
    assert "invalid_envs" not in whole
    assert [row["value"] for row in outcome["rows"] if row["figure"] == "auroc"] == [32, 128]

    def not_again(suite, **settings):
        raise AssertionError("a recorded point ran again")

    monkeypatch.setattr(protocol, "run_suite", not_again)
    resumed = run_sweep(builtin.DEMONSTRATIONS, values=(32, 128), checkpoint=checkpoint)
    assert resumed["points"][0]["invalid_envs"] == left_out
    assert resumed["rows"] == outcome["rows"]
    import matplotlib.axes

    titles = []
    set_title = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda axis, text, **kw: titles.append(text) or set_title(axis, text,
                                                                                  **kw))
    # takeover has no rows at all: it still gets its panels, saying where it was left out.
    paths = sweep_plot(outcome["rows"], builtin.DEMONSTRATIONS, (32, 128), tmp_path / "plot",
                       invalid_envs={32: ["takeover"]})
    assert all(path.stat().st_size > 0 for path in paths)
    left_out = [t for t in titles if t.startswith("takeover")]
    assert left_out and all("left out at trusted_episodes = 32" in t for t in left_out)
    assert not any("left out" in t for t in titles if t.startswith("offswitch"))


def test_the_sweep_command_writes_the_valid_environments_and_names_the_one_left_out(
        monkeypatch, tmp_path, capsys):
    from test_bench import env_failing_in

    def fake_figures(store, **_):
        envs = sorted({model["env"] for model in store.models.values()})
        rows = [dict(_row("long_horizon", "trained-in", "gan_mlp", 0.6), env=env)
                for env in envs]
        return dict(rows=rows, models=[], model_level=[], roc={})

    monkeypatch.setattr(protocol, "_run_env", env_failing_in(
        "offswitch", "organism 'long_horizon' on 'offswitch' failed its validity check: "
                     "kl_train 0.12"))
    monkeypatch.setattr(protocol.figures, "compute", fake_figures)
    out = tmp_path / "s"
    assert main(["sweep", "demonstrations", "--values", "32", "--processes", "1",
                 "--no-report", "--quiet", "--out", str(out)]) == 0
    reason = ("InvalidOrganismError: organism 'long_horizon' on 'offswitch' failed its "
              "validity check: kl_train 0.12")
    assert capsys.readouterr().err.strip().splitlines() == [
        "audit sweep: trusted_episodes = 32: offswitch left out (the other environments' "
        "figures stand): " + reason]
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["invalid_envs"] == {"32": {"offswitch": reason}}
    assert summary["failed_points"] == {}
    assert {row["env"] for row in summary["rows"]} == {"takeover", "unobserved"}
    point = out / "points" / "trusted_episodes=32"
    assert json.loads((point / "results.json").read_text())["invalid_envs"] == {
        "offswitch": reason}
    assert f"- offswitch: {reason}" in (point / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.ci
def test_a_sweep_stopped_part_way_resumes_with_the_rows_of_an_uninterrupted_one(
        tiny_suite, monkeypatch, tmp_path, capsys):  # noqa: F811
    import dataclasses

    smaller = dataclasses.replace(tiny_suite, name="tiny_small", post_hoc=False,
                                  views=("actions",), test_episodes=8,
                                  calibration_episodes=100, resamples=10)
    monkeypatch.setitem(registry._registered["suites"], "tiny_small", smaller)
    sweep = Sweep("tiny_sweep", "tiny_small", "test_layout_demonstrations", (0, 4),
                  builtin.with_test_layout_demonstrations, description="a test")
    monkeypatch.setitem(registry._registered["sweeps"], "tiny_sweep", sweep)
    argv = ["sweep", "tiny_sweep", "--cache-dir", str(tmp_path / "cache"), "--processes", "1",
            "--no-report", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0, capsys.readouterr().err
    original, ran = protocol.run_suite, []

    def stopped_at_the_second(suite, **settings):
        if ran:  # the second point: the sweep is killed
            raise KeyboardInterrupt
        ran.append(suite.test_layout_demonstrations)
        return original(suite, **settings)

    monkeypatch.setattr(protocol, "run_suite", stopped_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--out", str(tmp_path / "cut")])
    checkpoint = tmp_path / ".cut.checkpoint"
    assert (checkpoint / "point-0.json").is_file() and not (tmp_path / "cut").exists()
    assert "pass --resume to continue it" in (
        main([*argv, "--out", str(tmp_path / "cut")]), capsys.readouterr().err)[1]
    assert main([*argv, "--out", str(tmp_path / "cut"), "--values", "0", "9",
                 "--resume"]) == 2
    assert "other settings (differing: values)" in capsys.readouterr().err

    def counted(suite, **settings):
        ran.append(suite.test_layout_demonstrations)
        return original(suite, **settings)

    monkeypatch.setattr(protocol, "run_suite", counted)
    assert main([*argv, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert ran == [0, 4]  # the first point was not run again
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert (cut / "tiny_sweep.csv").read_text() == (whole / "tiny_sweep.csv").read_text()
    assert json.loads((cut / "sweep.json").read_text())["rows"] == \
        json.loads((whole / "sweep.json").read_text())["rows"]
    for value in (0, 4):
        point = f"points/test_layout_demonstrations={value}/results.json"
        assert json.loads((cut / point).read_text())["rows"] == \
            json.loads((whole / point).read_text())["rows"]
    assert not checkpoint.exists()


def test_sweep_p_values_reach_every_point_and_a_probe_refuses_them(monkeypatch, tmp_path,
                                                                   capsys):
    seen = []

    def stop(suite, **kwargs):  # records the point's suite, then ends it as a finding
        seen.append((suite.trusted_episodes, suite.p_values))
        raise protocol.InvalidOrganismError("recorded")

    monkeypatch.setattr(protocol, "run_suite", stop)
    assert main(["sweep", "demonstrations", "--values", "32", "64", "--p-values",
                 "conservative", "--out", str(tmp_path / "s"), "--quiet"]) == 0
    assert seen == [(32, "conservative"), (64, "conservative")]
    seen.clear()
    assert main(["sweep", "demonstrations", "--values", "32", "--out",
                 str(tmp_path / "t"), "--quiet"]) == 0
    assert seen == [(32, "smoothed")]  # the suites' default
    capsys.readouterr()
    assert main(["sweep", "counterfactual", "--p-values", "smoothed", "--out",
                 str(tmp_path / "u")]) == 2
    assert capsys.readouterr().err.strip() == (
        "audit sweep: error: --p-values: the counterfactual sweep is a counterfactual probe "
        "without p-values")
    seen.clear()
    monkeypatch.setattr(protocol, "run_suite", lambda suite, **kwargs: (
        seen.append(suite.calibration_bootstrap), stop(suite))[1])
    assert main(["sweep", "demonstrations", "--values", "32", "--calibration-bootstrap",
                 "fixed", "--out", str(tmp_path / "v"), "--quiet"]) == 0
    assert seen[0] == "fixed"
    assert main(["sweep", "counterfactual", "--calibration-bootstrap", "fixed", "--out",
                 str(tmp_path / "w")]) == 2
    assert "--calibration-bootstrap: the counterfactual sweep" in capsys.readouterr().err
