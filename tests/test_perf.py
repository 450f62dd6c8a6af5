"""`python -m benchmarks.perf.all`: its choices and refusals (the scripts' own figures
are measured by running them, not by tests)."""

from __future__ import annotations

import pytest

from benchmarks.perf import all as perf_all
from benchmarks.perf import planner as perf_planner


def test_every_documented_script_is_run_and_the_report_only_with_a_run(tmp_path):
    assert list(perf_all.scripts(tmp_path, None, False)) == [
        "envs", "imitation", "planner", "gan", "devices", "compare", "figures"]
    with_report = perf_all.scripts(tmp_path, tmp_path / "run", True)
    assert "report" in with_report
    assert "--skip-imitation" not in with_report["compare"][0]
    assert "--skip-imitation" in perf_all.scripts(tmp_path, None, False)["compare"][0]


@pytest.mark.parametrize("argv, expected", [
    (["--only", "gan,bogus"], "--only: unknown script(s) bogus; choose from envs, "),
    (["--report-run", "nowhere"], "--report-run nowhere: no report.html there"),
])
def test_bad_choices_are_refused_on_one_line_before_running_anything(argv, expected, tmp_path,
                                                                     capsys):
    with pytest.raises(SystemExit) as stopped:
        perf_all.main([*argv, "--out", str(tmp_path / "perf.json")])
    assert stopped.value.code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "perf.json").exists()


def test_an_existing_out_is_not_replaced_without_overwrite(tmp_path, capsys):
    out = tmp_path / "perf.json"
    out.write_text("{}")
    with pytest.raises(SystemExit):
        perf_all.main(["--out", str(out), "--only", "gan"])
    assert "pass --overwrite" in capsys.readouterr().err and out.read_text() == "{}"


def test_the_figures_benchmark_times_both_ways_and_checks_they_agree(capsys):
    from benchmarks.perf import figures as perf_figures

    assert perf_figures.main(["--resamples", "20", "--seeds", "2", "--cells", "2",
                              "--episodes", "16"]) == 0
    printed = capsys.readouterr().out
    assert "| resampled (default) |" in printed and "| per resample (reference) |" in printed
    assert "largest difference between the two" in printed
    assert "calibration resampled" in printed  # the suites' bootstrap, by default
    assert perf_figures.main(["--resamples", "20", "--seeds", "2", "--cells", "2",
                              "--episodes", "16", "--calibration-bootstrap", "fixed"]) == 0
    assert "calibration fixed" in capsys.readouterr().out


@pytest.mark.parametrize("batches", ["0", "32,", "a", "32,32"])
def test_planner_script_refuses_bad_batch_sizes_on_one_line(batches, capsys):
    with pytest.raises(SystemExit) as stopped:
        perf_planner.main(["--batches", batches])
    assert stopped.value.code == 2
    assert f"expected distinct comma-separated batch sizes >= 1, e.g. 32,256; got {batches!r}" \
        in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.ci
def test_planner_script_prints_every_piece_for_every_batch_size(capsys):
    perf_planner.main(["--batches", "2,3", "--calls", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["piece", "batch", "2", "batch", "3"]
    rows = {line[:26].strip(): line[26:].split() for line in lines[2:]}
    assert list(rows) == ["imitator forward", "imitator gradient", "reward network forward",
                          "reward network gradient", "value iteration forward",
                          "value iteration gradient"]
    assert all(len(costs) == 2 and all(float(cost) > 0 for cost in costs)
               for costs in rows.values())
