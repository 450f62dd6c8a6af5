"""The same seed gives the same arrays, bit for bit, on the same machine.

Each command runs twice: once in the test process (its JIT caches warm from other tests)
and once in a fresh Python process, and every array the two runs wrote is compared
exactly (``np.array_equal``, NaN equal to NaN), with every figure in their JSON files
apart from timings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from audit.cli import main

ROOT = Path(__file__).resolve().parent.parent
# Wall-clock figures, and where the files were written: the only things that may differ.
UNTIMED = {"timings", "versions", "out", "demos"}


def _timed(key: str) -> bool:
    return key in UNTIMED or "seconds" in key or "per_second" in key


def _fresh_process(argv: list[str], cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "audit.cli", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def _same_arrays(first: Path, second: Path) -> int:
    with np.load(first, allow_pickle=False) as a, np.load(second, allow_pickle=False) as b:
        assert sorted(a.files) == sorted(b.files), first.name
        for name in a.files:
            if name == "__meta__":  # the store's settings as JSON bytes, timings included
                assert _untimed(json.loads(a[name].tobytes())) == \
                    _untimed(json.loads(b[name].tobytes()))
                continue
            assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
            assert np.array_equal(a[name], b[name], equal_nan=a[name].dtype.kind in "fc"), \
                f"{first.name}: {name} differs between two runs of one seed"
        return len(a.files)


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not _timed(k)}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _same_runs(first: Path, second: Path) -> int:
    """Every .npz array and every untimed JSON value of two run directories equal."""
    names = sorted(p.name for p in first.iterdir() if p.suffix in (".npz", ".json"))
    assert names == sorted(p.name for p in second.iterdir() if p.suffix in (".npz", ".json"))
    arrays = 0
    for name in names:
        if name.endswith(".npz"):
            arrays += _same_arrays(first / name, second / name)
        else:
            assert _untimed(json.loads((first / name).read_text())) == \
                _untimed(json.loads((second / name).read_text())), name
    return arrays


@pytest.mark.slow
@pytest.mark.ci
def test_demos_train_bc_and_train_gan_are_bit_identical_for_one_seed(tmp_path, capsys):
    demos = ["demos", "--env", "takeover", "--episodes", "16", "--seed", "11", "--quiet"]
    bc = ["train-bc", "--env", "offswitch", "--imitator", "mlp", "--episodes", "32",
          "--updates", "20", "--eval-episodes", "16", "--seed", "5", "--quiet"]
    gan = ["train-gan", "--env", "offswitch", "--imitator", "mlp", "--discriminator", "mlp",
           "--steps", "4", "--eval-every", "2", "--episodes", "16", "--rollout-episodes", "4",
           "--eval-episodes", "4", "--seed", "3", "--quiet"]
    for argv in (demos, bc, gan):
        here, fresh = tmp_path / f"{argv[0]}-here", tmp_path / f"{argv[0]}-fresh"
        assert main([*argv, "--out", str(here)]) == 0, capsys.readouterr().err
        _fresh_process([*argv, "--out", str(fresh)], tmp_path)
        assert _same_runs(here, fresh) > 0, argv[0]


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize("suite_name", ["tiny_sharded"])
def test_a_suite_gives_bit_identical_scores_and_rows_for_one_seed(isolated_registry,
                                                                  tmp_path, capsys,
                                                                  suite_name):
    from test_sharding import TINY_SUITE

    plugin = tmp_path / "tiny.py"
    plugin.write_text(TINY_SUITE)
    argv = ["--plugin", str(plugin), "bench", "--suite", suite_name, "--no-cache",
            "--processes", "1", "--no-report", "--quiet", "--seed", "4"]
    assert main([*argv, "--out", str(tmp_path / "here")]) == 0, capsys.readouterr().err
    _fresh_process([*argv, "--out", str(tmp_path / "fresh")], tmp_path)
    assert _same_runs(tmp_path / "here", tmp_path / "fresh") > 50


@pytest.mark.slow
def test_the_quick_suite_gives_bit_identical_rows_and_scores_for_one_seed(tmp_path):
    """Two runs of the quick suite from an empty organism cache (about 7 minutes)."""
    for run in ("first", "second"):
        _fresh_process(["bench", "--suite", "quick", "--no-cache", "--no-report", "--quiet",
                        "--out", str(tmp_path / run)], tmp_path)
    assert _same_runs(tmp_path / "first", tmp_path / "second") > 300  # 334 arrays, 1 seed
