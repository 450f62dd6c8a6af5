"""`python -m benchmarks.perf.all`: its choices and refusals (the scripts' own figures
are measured by running them, not by tests)."""

from __future__ import annotations

import pytest

from benchmarks.perf import all as perf_all


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
