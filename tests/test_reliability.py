"""Bad input is refused before any computation, in one line naming the flag or file, with
exit code 2; nothing silently wrong (wrapped seeds, NaN trained on, corrupt caches used)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bench import tiny_suite  # noqa: F401  (a fixture)

from audit import registry
from audit.cli import main
from audit.trajectories import check_values, load_npz


def one_line_error(capsys, argv) -> str:
    """Runs the command; asserts exit code 2, one line on stderr, no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    return err.strip()


@pytest.fixture(scope="module")
def demos_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demos") / "good"
    assert main(["demos", "--episodes", "4", "--out", str(out), "--quiet"]) == 0
    return out


def _variant(demos_dir: Path, tmp_path: Path, name: str, change) -> Path:
    """A copy of the good demonstrations with ``change(arrays)`` applied, or ``change`` as
    the file's raw bytes."""
    out = tmp_path / name
    out.mkdir()
    target = out / "trajectories.npz"
    if isinstance(change, bytes):
        target.write_bytes(change)
        return out
    with np.load(demos_dir / "trajectories.npz") as data:
        arrays = {k: data[k] for k in data.files}
    change(arrays)
    np.savez(target, **arrays)
    return out


def _set(field, value):
    def change(arrays):
        arrays[field] = value(arrays[field]) if callable(value) else value
    return change


def _nan_at_first_step(array):
    array = array.astype(np.float32).copy()
    array[0, 0] = np.nan
    return array


def _probs_not_summing(array):
    array = array.copy()
    array[0, 0] = array[0, 0] * 3
    return array


CORRUPT_DEMOS = {
    "empty": (b"", "not a readable .npz"),
    "not_a_zip": (b"observations,actions\n1,2\n", "not a readable .npz"),
    "missing_field": (lambda a: a.pop("action_probs"), "missing action_probs"),
    "object_array": (_set("rewards", lambda r: np.array(r.tolist(), dtype=object)),
                     "object array"),
    "float_actions": (_set("actions", lambda x: x.astype(np.float32)), "actions must have an "
                                                                       "integer/bool dtype"),
    "nan_observations": (_set("observations", _nan_at_first_step),
                         "observations is not finite at 1 valid step"),
    "nan_action_probs": (_set("action_probs", _nan_at_first_step),
                         "action_probs is not finite"),
    "probs_not_a_distribution": (_set("action_probs", _probs_not_summing),
                                 "action_probs is not a distribution"),
    "all_false_mask": (_set("mask", lambda m: np.zeros_like(m)), "no valid step"),
    "zero_episodes": (lambda a: a.update({k: v[:0] for k, v in a.items()}), "no valid step"),
    "action_out_of_range": (_set("actions", lambda x: np.full_like(x, 99)),
                            "actions must be in [0, 6)"),
}


@pytest.mark.parametrize("name", sorted(CORRUPT_DEMOS))
def test_train_bc_refuses_corrupt_demonstrations_naming_the_file(name, demos_dir, tmp_path,
                                                                 capsys):
    change, expected = CORRUPT_DEMOS[name]
    bad = _variant(demos_dir, tmp_path, name, change)
    err = one_line_error(capsys, ["train-bc", "--demos", str(bad), "--updates", "2",
                                  "--out", str(tmp_path / "out")])
    assert err.startswith("audit train-bc: error: --demos: ") and expected in err, err
    assert str(bad / "trajectories.npz") in err
    assert not (tmp_path / "out").exists()


def test_a_truncated_demonstrations_file_is_refused(demos_dir, tmp_path, capsys):
    whole = (demos_dir / "trajectories.npz").read_bytes()
    bad = _variant(demos_dir, tmp_path, "truncated", whole[: len(whole) // 2])
    err = one_line_error(capsys, ["train-bc", "--demos", str(bad), "--out", str(tmp_path / "o")])
    assert "not a readable .npz" in err


def test_good_demonstrations_pass_every_check(demos_dir):
    check_values(load_npz(demos_dir / "trajectories.npz"))


@pytest.mark.parametrize("argv,expected", [
    (["train-bc", "--learning-rate", "inf"], "argument --learning-rate: expected a finite "
                                             "number > 0, got inf"),
    (["train-bc", "--learning-rate", "nan"], "argument --learning-rate: expected a finite"),
    (["train-bc", "--learning-rate", "0"], "argument --learning-rate"),
    (["demos", "--seed", str(2**63)], "argument --seed: expected an integer in [0, 2**32)"),
    (["demos", "--seed", str(2**64)], "argument --seed: expected an integer in [0, 2**32)"),
    (["demos", "--seed", str(2**32)], "argument --seed: expected an integer in [0, 2**32)"),
    (["train-gan", "--seed", "-1"], "argument --seed: expected an integer in [0, 2**32)"),
    (["bench", "--seed", str(2**32 - 1), "--seeds", "2"], "--seeds: seeds 4294967295..4294967296 "
                                                          "go past 2**32 - 1"),
    (["demos", "--episodes", "99999999999999"], "argument --episodes: expected an integer in "
                                                "[1, 2**31)"),
    (["demos", "--episodes", str(2**31 - 1)], "--episodes: 2147483647 episodes of 48 steps need "
                                              "about"),
    (["train-gan", "--bc-warm-start", "-5"], "argument --bc-warm-start: expected an integer in "
                                             "[0, 2**31), got -5"),
    (["train-gan", "--entropy-coef", "-0.1"], "argument --entropy-coef: expected a finite "
                                              "number >= 0"),
    (["train-gan", "--label-smoothing", "1"], "argument --label-smoothing: expected a finite "
                                              "number in [0, 1)"),
    (["train-gan", "--view", "activations", "--activations", "no_such_layer", "--steps", "1"],
     "--activations: view 'activations' needs activations ['no_such_layer']"),
    (["train-gan", "--env", "gymnax:Pendulum-v1"], "has a continuous action space"),
    (["render", "--env", "offswitch", "--frame-seconds", "inf"], "argument --frame-seconds"),
])
def test_bad_flags_are_one_line_before_any_work(argv, expected, tmp_path, capsys):
    err = one_line_error(capsys, [*argv, "--out", str(tmp_path / "out")])
    assert expected in err, err
    assert not (tmp_path / "out").exists()


def test_the_unknown_gymnax_name_lists_only_environments_with_discrete_actions(capsys):
    err = one_line_error(capsys, ["train-gan", "--env", "gymnax:Nope"])
    assert "gymnax:CartPole-v1" in err and "Pendulum" not in err
    assert "MountainCarContinuous" not in err


def test_out_may_not_be_the_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    for out in (".", str(tmp_path), ".."):
        err = one_line_error(capsys, ["demos", "--episodes", "2", "--out", out, "--overwrite"])
        assert "is the current directory or contains it" in err
    assert (tmp_path / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]  # no hidden staging left


def test_train_bc_that_diverges_writes_nothing_and_says_so(tmp_path, capsys):
    out = tmp_path / "bc"
    code = main(["train-bc", "--episodes", "8", "--updates", "20", "--learning-rate", "1e30",
                 "--eval-episodes", "4", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "training diverged" in err and "--learning-rate" in err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.ci
def test_a_corrupt_organism_cache_entry_is_rebuilt_with_a_warning_naming_it(tmp_path):
    from audit.bc import BCConfig
    from benchmarks import organisms

    spec = dataclasses.replace(organisms.HONEST, kl_bound=1e9, event_rate_range=(0.0, 1.0))
    config = organisms.OrganismConfig(hidden_sizes=(8,), episodes=8,
                                      bc=BCConfig(updates=5, batch_episodes=4),
                                      check_episodes=8)
    env_spec = registry.get("environments", "offswitch")
    first = organisms.build_organisms(env_spec, [spec], config, seed=0, cache_dir=tmp_path)
    [params_file] = tmp_path.glob("*.npz")
    whole = params_file.read_bytes()
    params_file.write_bytes(whole[: len(whole) // 3])  # a run killed while writing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = organisms.build_organisms(env_spec, [spec], config, seed=0, cache_dir=tmp_path)
    messages = [str(w.message) for w in caught]
    assert any(params_file.name in m and "rebuilding" in m for m in messages), messages
    assert again[0].validity == first[0].validity  # rebuilt: the same organism
    with np.load(params_file) as rebuilt:  # and written back whole
        assert len(rebuilt.files) > 0 and all(np.isfinite(rebuilt[k]).all()
                                              for k in rebuilt.files)


# Values that no flag of its kind accepts.
BAD_COUNTS = ("0", "-3", "1.5", "many", "", str(2**31), "nan")
BAD_RATES = ("nan", "inf", "-inf", "-1", "0", "fast", "")
BAD_WEIGHTS = ("nan", "inf", "-1", "heavy", "")
BAD_SEEDS = ("-3", "1.5", "many", "", str(2**32), "nan")
FLAGS = {
    "demos": {"--episodes": BAD_COUNTS, "--max-steps": BAD_COUNTS, "--seed": BAD_SEEDS,
              "--env": ("nowhere",), "--planner": ("nobody",), "--split": ("sideways",)},
    "train-bc": {"--updates": BAD_COUNTS, "--batch-episodes": BAD_COUNTS,
                 "--eval-episodes": BAD_COUNTS, "--learning-rate": BAD_RATES,
                 "--imitator": ("cnn",), "--seed": BAD_SEEDS},
    "train-gan": {"--steps": BAD_COUNTS, "--rollout-episodes": BAD_COUNTS,
                  "--discriminator-updates": BAD_COUNTS, "--eval-every": BAD_COUNTS,
                  "--learning-rate": BAD_RATES, "--discriminator-learning-rate": BAD_RATES,
                  "--gradient-penalty": BAD_WEIGHTS, "--bc-coef": BAD_WEIGHTS,
                  "--entropy-coef": BAD_WEIGHTS, "--label-smoothing": BAD_WEIGHTS + ("1",),
                  "--bc-warm-start": ("-1", "x", "1.5"), "--view": ("pixels",),
                  "--reward": ("money",), "--discriminator": ("oracle",),
                  "--ppo-epochs": BAD_COUNTS, "--ppo-minibatches": BAD_COUNTS,
                  "--discriminator-batch-episodes": BAD_COUNTS,
                  "--gamma": BAD_WEIGHTS + ("1.01",), "--gae-lambda": BAD_WEIGHTS + ("2",)},
    "bench": {"--suite": ("gigantic",), "--seeds": BAD_COUNTS, "--seed": BAD_SEEDS,
              "--processes": BAD_COUNTS, "--discriminator-updates": BAD_COUNTS},
    "sweep": {"--values": ("x", "1.5"), "--seeds": BAD_COUNTS, "--setting": ("huge",)},
    "render": {"--episodes": BAD_COUNTS, "--scale": BAD_COUNTS,
               "--frame-seconds": BAD_RATES, "--split": ("sideways",)},
}
# What each command needs besides the bad flag (small, so that a value that slipped
# through would still end quickly and fail the assertion rather than hang).
BASE = {"demos": ["--episodes", "2"], "train-bc": ["--episodes", "4", "--updates", "2"],
        "train-gan": ["--steps", "1", "--episodes", "4", "--rollout-episodes", "4",
                      "--eval-episodes", "4"],
        "bench": ["--suite", "quick"], "sweep": ["capacity"], "render": ["--env", "offswitch"]}


@st.composite
def bad_command_lines(draw):
    command = draw(st.sampled_from(sorted(FLAGS)))
    flag = draw(st.sampled_from(sorted(FLAGS[command])))
    value = draw(st.sampled_from(FLAGS[command][flag]))
    base = list(BASE[command])
    if flag in base:  # the bad value replaces the base's
        index = base.index(flag)
        del base[index:index + 2]
    return [command, *base, flag, value]


def _fuzz(argv, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    suffix = ["--out", str(out.with_suffix(".gif") if argv[0] == "render" else out)]
    one_line_error(capsys, [*argv, *suffix])
    assert not out.exists()


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=bad_command_lines())
def test_random_bad_flags_get_exit_2_and_one_line(argv, tmp_path, capsys):
    _fuzz(argv, tmp_path, capsys)


@pytest.mark.slow
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=bad_command_lines())
def test_many_random_bad_flags_get_exit_2_and_one_line(argv, tmp_path, capsys):
    _fuzz(argv, tmp_path, capsys)


GAN_RUN = ["train-gan", "--env", "offswitch", "--imitator", "mlp", "--discriminator", "mlp",
           "--steps", "40", "--eval-every", "2", "--checkpoint-every", "2", "--episodes", "16",
           "--rollout-episodes", "4", "--eval-episodes", "4", "--seed", "3", "--quiet"]


@pytest.mark.slow
@pytest.mark.ci
def test_a_killed_train_gan_resumes_to_the_numbers_of_an_uninterrupted_run(tmp_path, capsys):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*GAN_RUN, "--out", str(whole)]) == 0
    progress = tmp_path / ".cut.checkpoint" / "progress.json"
    process = subprocess.Popen([sys.executable, "-m", "audit.cli", *GAN_RUN, "--out", str(cut)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.loads(progress.read_text())["next_block"] >= 3:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not cut.exists() and progress.is_file()
    # A second run on the same --out neither ignores nor silently replaces the checkpoint.
    err = one_line_error(capsys, [*GAN_RUN, "--out", str(cut)])
    assert "pass --resume to continue it or --overwrite" in err
    err = one_line_error(capsys, [*GAN_RUN, "--out", str(cut), "--seed", "4", "--resume"])
    assert "other settings (differing: seed)" in err
    assert main([*GAN_RUN, "--out", str(cut), "--resume"]) == 0
    first, second = (json.loads((run / "summary.json").read_text()) for run in (whole, cut))
    assert second["history"] == first["history"]
    assert second["evaluations"] == first["evaluations"]
    for figure in ("kl_train", "kl_test", "return_train", "return_test"):
        assert second[figure] == first[figure], figure
    assert not progress.parent.exists()  # the finished run leaves no checkpoint
    err = one_line_error(capsys, [*GAN_RUN, "--out", str(tmp_path / "new"), "--resume"])
    assert "--resume: no checkpoint of --out" in err


def test_a_co_training_record_is_read_in_the_structure_asked_for_only_when_there_is_one(
        tmp_path):
    """The structure may be made on demand (tracing a co-training run for its shapes
    costs seconds): it is asked for only when a record exists, and the record comes back
    in it."""
    import jax
    import jax.numpy as jnp

    from audit.protocol import SuiteCheckpoint

    checkpoint = SuiteCheckpoint(tmp_path / "record", {"suite": "tiny"})
    checkpoint.start()
    tree = ({"weights": jnp.arange(6.0).reshape(2, 3)}, {"loss": jnp.array([0.5, 0.25])})
    asked = []

    def like():
        asked.append(True)
        return jax.eval_shape(lambda: tree)

    assert checkpoint.finished_cotraining("offswitch/default/mlp/honest", like) is None
    assert not asked
    checkpoint.save_cotraining("offswitch/default/mlp/honest", tree)
    assert checkpoint.finished_cotraining("offswitch/default/mlp/other", like) is None
    assert not asked
    for structure in (like, jax.eval_shape(lambda: tree)):
        found = checkpoint.finished_cotraining("offswitch/default/mlp/honest", structure)
        assert jax.tree.structure(found) == jax.tree.structure(tree)
        for got, want in zip(jax.tree.leaves(found), jax.tree.leaves(tree), strict=True):
            np.testing.assert_array_equal(got, want)
    assert asked == [True]


@pytest.mark.slow
@pytest.mark.ci
def test_a_bench_stopped_inside_an_environment_resumes_with_the_rows_of_an_uninterrupted_run(
        tiny_suite, monkeypatch, tmp_path, capsys):  # noqa: F811
    """Stopped while scoring the second environment's models: the first environment is
    loaded whole, the second's scored model too; only what was left is computed."""
    from audit import protocol

    suite = dataclasses.replace(tiny_suite, name="tiny_two", envs=("offswitch", "takeover"),
                                post_hoc=False, views=("actions",), test_episodes=8,
                                calibration_episodes=100, resamples=10)
    monkeypatch.setitem(registry._registered["suites"], "tiny_two", suite)
    argv = ["bench", "--suite", "tiny_two", "--processes", "1", "--no-report", "--quiet",
            "--cache-dir", str(tmp_path / "cache")]
    run_env, audit_model = protocol._run_env, protocol._audit_model
    envs, audited, stop_at = [], [], [None]

    def counted_env(suite, env_spec, *rest):
        envs.append(env_spec.name)
        return run_env(suite, env_spec, *rest)

    def counted_model(suite, env_spec, env, label, model, *rest):
        if len(audited) == stop_at[0]:
            raise KeyboardInterrupt
        audited.append((env_spec.name, model.name))
        return audit_model(suite, env_spec, env, label, model, *rest)

    monkeypatch.setattr(protocol, "_run_env", counted_env)
    monkeypatch.setattr(protocol, "_audit_model", counted_model)
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    every_model = list(audited)
    first_env = sum(env == "offswitch" for env, _ in every_model)
    assert len(every_model) - first_env >= 2  # takeover has models before and after the stop
    envs.clear(), audited.clear()
    stop_at[0] = first_env + 1  # while scoring takeover's second model
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--out", str(tmp_path / "cut")])
    checkpoint = tmp_path / ".cut.checkpoint"
    assert (checkpoint / "env-offswitch.json").is_file() and not (tmp_path / "cut").exists()
    assert not (checkpoint / "env-takeover.json").exists()
    assert len(list((checkpoint / "models").glob("*.json"))) == first_env + 1
    err = one_line_error(capsys, [*argv, "--out", str(tmp_path / "cut")])
    assert "pass --resume to continue it or --overwrite" in err

    assert len(list((checkpoint / "cotraining").glob("*.npz"))) == 2  # both envs' runs

    envs.clear(), audited.clear()
    stop_at[0] = None
    trained = []
    seed_parallel = protocol.seed_parallel
    monkeypatch.setattr(protocol, "seed_parallel",
                        lambda *a, **k: trained.append(1) or seed_parallel(*a, **k))
    assert main([*argv, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert envs == ["takeover"]  # offswitch was loaded whole
    assert not trained  # takeover's finished co-training run was loaded, not run again
    # takeover's first model was loaded from the checkpoint; the rest were scored now.
    assert audited == every_model[first_env + 1:]
    whole, cut = (json.loads((tmp_path / run / "results.json").read_text())
                  for run in ("whole", "cut"))
    assert cut["rows"] == whole["rows"] and cut["model_level"] == whole["model_level"]
    assert cut["cotraining"] == whole["cotraining"]
    assert not checkpoint.exists()


@pytest.mark.slow
def test_the_quick_suite_killed_with_sigkill_resumes_to_identical_rows(tmp_path):
    """The real quick suite, in worker processes: SIGKILL once one environment is
    checkpointed, resume, compare with an uninterrupted run (about 10 minutes)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    base = [sys.executable, "-m", "audit.cli", "bench", "--suite", "quick", "--quiet",
            "--no-report", "--cache-dir", str(tmp_path / "cache")]
    subprocess.run([*base, "--out", str(tmp_path / "whole")], check=True)
    process = subprocess.Popen([*base, "--out", str(tmp_path / "cut")])
    checkpoint = tmp_path / ".cut.checkpoint"
    deadline = time.monotonic() + 1200
    while (time.monotonic() < deadline and process.poll() is None
           and not list(checkpoint.glob("env-*.json"))):
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)  # its worker processes are orphaned, as in life
    process.wait()
    subprocess.run([*base, "--out", str(tmp_path / "cut"), "--resume"], check=True)
    whole, cut = (json.loads((tmp_path / run / "results.json").read_text())
                  for run in ("whole", "cut"))
    assert cut["rows"] == whole["rows"]


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (Linux /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone while listing
            continue
        if fields[0] != "Z":  # a zombie has finished
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


@pytest.mark.slow
@pytest.mark.ci
def test_a_bench_in_worker_processes_has_the_rows_of_one_process(tmp_path):
    """Two environments in 2 worker processes, each drawing its rows' bootstraps, give
    the rows and model-level figures of one process drawing them all (the
    second run reuses the first one's organisms)."""
    import subprocess
    import sys

    from test_sharding import TINY_SUITE

    plugin = tmp_path / "tiny.py"
    plugin.write_text(TINY_SUITE.replace('envs=("offswitch",)', 'envs=("offswitch", "takeover")'))
    results = {}
    for processes in ("2", "1"):
        out = tmp_path / f"run{processes}"
        done = subprocess.run(
            [sys.executable, "-m", "audit.cli", "--plugin", str(plugin), "bench", "--suite",
             "tiny_sharded", "--processes", processes, "--no-report", "--quiet",
             "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
            capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        results[processes] = json.loads((out / "results.json").read_text())
    two, one = results["2"], results["1"]
    assert two["rows"] and two["rows"] == one["rows"]
    assert two["model_level"] == one["model_level"] and two["models"] == one["models"]
    # The workers drew the bootstraps (their time is theirs); one process drew them all.
    assert {"offswitch/figures", "takeover/figures"} <= set(two["timings"])
    assert not any(key.endswith("/figures") for key in one["timings"])


def _bench_with_workers(tmp_path: Path, out: str):
    """``audit bench`` of a two-environment tiny suite in 2 worker processes, started
    as a process of its own; returns it once both workers run."""
    import subprocess
    import sys
    import time

    from test_sharding import TINY_SUITE

    plugin = tmp_path / "tiny.py"
    plugin.write_text(TINY_SUITE.replace('envs=("offswitch",)', 'envs=("offswitch", "takeover")'))
    process = subprocess.Popen(
        [sys.executable, "-m", "audit.cli", "--plugin", str(plugin), "bench", "--suite",
         "tiny_sharded", "--processes", "2", "--no-report", "--quiet", "--cache-dir",
         str(tmp_path / "cache"), "--out", str(tmp_path / out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        workers = [pid for pid in _children(process.pid)
                   if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        if len(workers) >= 2:
            time.sleep(3)  # the workers import JAX and start building organisms
            return process
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"bench never ran two workers: {process.communicate()[1][-2000:]}")


def _gone_within(pids: set[int], seconds: float) -> set[int]:
    import time

    deadline = time.monotonic() + seconds
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(pids)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_sigterm_stops_bench_and_its_workers_and_leaves_nothing_behind(tmp_path):
    import signal

    process = _bench_with_workers(tmp_path, "run")
    descendants = _children(process.pid)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("audit bench: stopped by SIGTERM"), err
    assert "Traceback" not in err and "leaked" not in err, err[-2000:]
    assert not _gone_within(descendants, 10), "worker processes outlived the run"
    assert not (tmp_path / "run").exists()
    assert not list(tmp_path.glob(".run.*.partial"))
    # The checkpoint directory is kept on purpose (--resume): a new run on the same --out
    # is told so rather than tripping over it.
    assert (tmp_path / ".run.checkpoint").is_dir()


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_workers_of_a_bench_killed_with_sigkill_end_by_themselves(tmp_path):
    import signal

    process = _bench_with_workers(tmp_path, "run")
    descendants = _children(process.pid)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    from audit.workers import ORPHAN_CHECK_SECONDS

    # Each orphan notices within ORPHAN_CHECK_SECONDS; allow for a loaded machine.
    assert not _gone_within(descendants, 20 * ORPHAN_CHECK_SECONDS), \
        "orphaned workers kept running after their parent was killed"
