"""Several processes as one JAX runtime (jax.distributed): the numbers of one process.

Each multi-process run is two subprocesses on localhost, 4 simulated CPU devices each,
joined through a coordinator on a free port; the test session's own JAX (one device)
computes the same thing for comparison.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from audit import distributed
from audit.cli import main

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _run_processes(code: str, tmp_path: Path, count: int = 2, devices: int = 4,
                   timeout: int = 900, expect: int = 0) -> list[str]:
    """Runs ``code`` in ``count`` processes joined as one runtime; their stdout.

    ``code`` sees ``PROCESS`` (its id) and ``ADDRESS`` (the coordinator's). Each process
    must exit with ``expect``; where that is not 0 (a run stopped on purpose), a process
    may instead be aborted by JAX when another exits first.
    """
    address = f"localhost:{_free_port()}"
    environment = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count="
                       f"{devices}", JAX_PLATFORMS="cpu")
    environment.pop("JAX_NUM_CPU_DEVICES", None)
    started = []
    for process in range(count):
        program = (f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(ROOT)!r}]\n"
                   f"PROCESS, ADDRESS = {process}, {address!r}\n{code}")
        started.append(subprocess.Popen(
            [sys.executable, "-c", program], env=environment, cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for process in started:
            out, err = process.communicate(timeout=timeout)
            allowed = {expect} | ({-signal.SIGABRT} if expect else set())
            if process.returncode not in allowed:
                pytest.fail(f"a process of the multi-process run exited with "
                            f"{process.returncode}, not {expect}:\n{err[-3000:]}")
            outputs.append(out)
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
    return outputs


def small_run(keys):
    """Keys and a state in, keys and a state out: what the suites pass through."""
    from audit.sharding import seed_parallel

    def one(key, state, scale):
        split, noise = jax.random.split(key)
        total = jax.lax.fori_loop(0, 5, lambda _, x: x * scale + jax.random.normal(
            noise, x.shape), state["x"])
        return split, {"x": total, "mean": total.mean()}

    return seed_parallel(one, in_axes=(0, 0, None))(
        keys, {"x": np.ones((len(keys), 3), np.float32)}, np.float32(0.5))


def _save_small_run(path: str) -> None:
    from audit.sharding import devices_for

    keys, state = small_run(jax.random.split(jax.random.key(3), 8))
    used = devices_for(8)
    np.savez(path, keys=np.asarray(jax.random.key_data(keys)), x=np.asarray(state["x"]),
             mean=np.asarray(state["mean"]), processes=jax.process_count(),
             used_processes=len({device.process_index for device in used}),
             used=len(used), agree_all=distributed.all_agree(True),
             agree_one=distributed.all_agree(jax.process_index() == 0))


def test_settings_come_from_flags_or_the_environment_and_are_checked():
    assert distributed.settings_from(environ={}) is None
    assert distributed.settings_from("h:1", 2, 1, environ={}) == {
        "coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
    assert distributed.settings_from(environ={
        "JAX_COORDINATOR_ADDRESS": "node0:1234", "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "3"}) == {"coordinator_address": "node0:1234",
                                    "num_processes": 4, "process_id": 3}
    assert distributed.settings_from("auto", environ={}) == {}
    assert distributed.settings_from(environ={"AUDIT_DISTRIBUTED": "auto"}) == {}
    for arguments, environ, message in [
            (("h:1", None, None), {}, "missing: --num-processes .*JAX_NUM_PROCESSES"),
            ((None, 2, 0), {}, "missing: --coordinator-address"),
            (("h:1", 2, 2), {}, r"--process-id: expected an integer in \[0, 2\), got 2"),
            (("nohost", 2, 0), {}, "--coordinator-address: expected HOST:PORT"),
            (("auto", 2, None), {}, "give neither"),
            (("h:1", None, 0), {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES: expected"),
    ]:
        with pytest.raises(distributed.DistributedError, match=message):
            distributed.settings_from(*arguments, environ=environ)


def test_a_partial_or_misplaced_multi_process_request_is_one_line(capsys, monkeypatch):
    for variable in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(variable, raising=False)
    assert main(["--coordinator-address", "localhost:1", "bench", "--suite", "quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing: --num-processes" in err
    assert main(["--coordinator-address", "localhost:1", "--num-processes", "2",
                 "--process-id", "0", "train-gan"]) == 2
    err = capsys.readouterr().err
    assert "only `audit bench` runs over several processes" in err
    assert err.count("\n") == 1
    assert main(["--num-processes", "0", "bench"]) == 2
    assert "--num-processes: expected an integer in [1, 2**31)" in capsys.readouterr().err


def test_seed_parallel_over_2_processes_gives_the_numbers_of_one(tmp_path):
    _run_processes("import jax\nfrom audit import distributed\n"
                   "distributed.initialize(distributed.settings_from(ADDRESS, 2, PROCESS))\n"
                   "import test_distributed\n"
                   "test_distributed._save_small_run(f'run{PROCESS}.npz')", tmp_path)
    keys, state = small_run(jax.random.split(jax.random.key(3), 8))
    for process in (0, 1):
        with np.load(tmp_path / f"run{process}.npz") as run:
            assert int(run["processes"]) == 2
            assert int(run["used"]) == 8 and int(run["used_processes"]) == 2  # 4 + 4 devices
            assert bool(run["agree_all"]) and not bool(run["agree_one"])
            np.testing.assert_array_equal(run["keys"], jax.random.key_data(keys))
            np.testing.assert_array_equal(run["x"], state["x"])
            np.testing.assert_array_equal(run["mean"], state["mean"])


@pytest.mark.ci
@pytest.mark.slow
def test_a_tiny_suite_over_2_processes_has_the_rows_of_one_process(isolated_registry,
                                                                   tmp_path, capsys):
    from test_sharding import TINY_SUITE

    plugin = tmp_path / "tiny.py"
    plugin.write_text(TINY_SUITE)
    argv = ["--plugin", str(plugin), "bench", "--suite", "tiny_sharded", "--seeds", "2",
            "--no-report", "--quiet", "--cache-dir", str(tmp_path / "cache_two")]
    # Both processes name the same --out (the usual shared file system): process 0 writes.
    _run_processes("from audit.cli import main\n"
                   "code = main(['--coordinator-address', ADDRESS, '--num-processes', '2', "
                   f"'--process-id', str(PROCESS), *{argv!r}, '--out', 'two'])\n"
                   "sys.exit(code)", tmp_path)
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["processes"] == 2 and two["devices"] == 8
    _assert_rows_of_one_process(two, argv, tmp_path, capsys)


# Both processes stop right after process 0 recorded the first scored model of the second
# environment (each process calls save_model at the same point of the SPMD program; the
# barrier holds the others until process 0 has written it).
STOP_IN_TAKEOVER = """
import os
from jax.experimental import multihost_utils
from audit import protocol
recorded = protocol.AgreedCheckpoint.save_model
def record_then_stop(self, unit, store, cotraining):
    recorded(self, unit, store, cotraining)
    if unit.startswith('takeover/'):
        multihost_utils.sync_global_devices('recorded')
        os._exit(3)
protocol.AgreedCheckpoint.save_model = record_then_stop
"""
# What each process of the resumed run computes and what it takes from process 0's record.
WATCH_RESUMPTION = """
from audit import protocol
def note(text):
    with open(f'resumed{PROCESS}.txt', 'a') as out:
        out.write(text + '\\n')
run_env = protocol._run_env
def noted_run_env(suite, env_spec, *rest, **kwargs):
    note('ran ' + env_spec.name)
    return run_env(suite, env_spec, *rest, **kwargs)
protocol._run_env = noted_run_env
for method in ('finished_model', 'finished_cotraining'):
    def loaded(self, unit, *rest, _found=getattr(protocol.AgreedCheckpoint, method),
               _name=method):
        found = _found(self, unit, *rest)
        if found is not None:
            note(_name + ' ' + unit.split('/')[0])
        return found
    setattr(protocol.AgreedCheckpoint, method, loaded)
"""


@pytest.mark.ci
@pytest.mark.slow
def test_a_killed_run_over_2_processes_resumes_from_process_0s_record(isolated_registry,
                                                                      tmp_path, capsys):
    from test_sharding import TINY_SUITE
    plugin = tmp_path / "tiny.py"
    plugin.write_text(TINY_SUITE + """
registry.register("suites", "tiny_two_envs", dataclasses.replace(
    registry.get("suites", "tiny_sharded"), name="tiny_two_envs",
    envs=("offswitch", "takeover")))
""")
    argv = ["--plugin", str(plugin), "bench", "--suite", "tiny_two_envs", "--seeds", "2",
            "--no-report", "--quiet", "--cache-dir", str(tmp_path / "cache_two")]
    launch = ("from audit.cli import main\n"
              "code = main(['--coordinator-address', ADDRESS, '--num-processes', '2', "
              f"'--process-id', str(PROCESS), *{argv!r}, '--out', 'two'{{resume}}])\n"
              "sys.exit(code)")
    _run_processes(STOP_IN_TAKEOVER + launch.format(resume=""), tmp_path, expect=3)
    record = tmp_path / ".two.checkpoint"
    assert (record / "env-offswitch.json").is_file() and not (tmp_path / "two").exists()
    assert list((record / "models").glob("*.json")) and list((record / "cotraining").glob("*"))

    _run_processes(WATCH_RESUMPTION + launch.format(resume=", '--resume'"), tmp_path)
    for process in (0, 1):  # both skip offswitch and take takeover's finished parts
        notes = (tmp_path / f"resumed{process}.txt").read_text().split("\n")
        assert "ran offswitch" not in notes and "ran takeover" in notes
        assert "finished_cotraining takeover" in notes and "finished_model takeover" in notes
    assert not record.exists()  # the run is written: nothing left to resume
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["processes"] == 2

    _assert_rows_of_one_process(two, argv, tmp_path, capsys)


def _assert_rows_of_one_process(two: dict, argv: list[str], tmp_path: Path, capsys) -> None:
    """``two``'s rows equal those of ``argv`` run in one process (its own organism cache),
    within the sharding test's tolerance; the null control aside (its noise is keyed to
    the bits of its fitting data)."""
    from test_sharding import FIGURE_TOLERANCE
    argv = [*argv[:-1], str(tmp_path / "cache_one")]
    assert main([*argv, "--processes", "1", "--out", str(tmp_path / "one")]) == 0, \
        capsys.readouterr().err
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert [(r["env"], r["organism"], r["detector"], r["view"]) for r in two["rows"]] == \
        [(r["env"], r["organism"], r["detector"], r["view"]) for r in one["rows"]]
    compared = 0
    for row_two, row in zip(two["rows"], one["rows"], strict=True):
        if row["detector"] == "null":
            continue
        for key, value in row.items():
            if isinstance(value, float) and value == value:
                assert abs(row_two[key] - value) <= FIGURE_TOLERANCE, (row["detector"], key)
                compared += 1
    assert compared > 100
