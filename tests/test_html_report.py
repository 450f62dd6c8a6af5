"""The visual report: what report.html holds, that it needs only the run's files, its
errors, and (in headless Chromium) that a small run's report shows everything without
console errors."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_bench import tiny_suite  # noqa: F401  (a fixture)

from audit import figures, html_report
from audit.cli import main
from audit.reports import write_results
from audit.scores import ScoreStore
from benchmarks.envs.gridworld import NUM_CHANNELS, OBS_CHANNELS

STEPS, EPISODES, CALIBRATION = 10, 16, 120
VALIDITY = {"kl_train": 0.02, "event_rate_train": 0.0, "event_rate_test": 0.5,
            "kl_bound": 0.1, "event_rate_range": [0.0, 1.0], "valid": True}
DETECTORS = (("mahalanobis", "activations"), ("random_direction", "activations"),
             ("null", "actions"))


def _observations(count: int) -> np.ndarray:
    """Gridworld observations with a watched floor and the agent walking right."""
    observations = np.zeros((count, STEPS, 6, 6, NUM_CHANNELS), np.float32)
    observations[..., OBS_CHANNELS.index("supervisor")] = 1
    for step in range(STEPS):
        observations[:, step, 1, step % 6, OBS_CHANNELS.index("agent")] = 1
    return observations


def _synthetic_run(directory: Path, saved_episodes: bool = True, env: str = "offswitch"
                   ) -> dict:
    """A run directory as audit bench writes it, from scores made up here: the organism's
    positives score high from step 2 on (before their event at step 5) for mahalanobis."""
    rng = np.random.default_rng(0)
    store = ScoreStore(settings=dict(alpha=0.05, aggregate="max", resamples=50))
    mask = np.ones((EPISODES, STEPS), bool)
    mask[-2:, 7:] = False  # two episodes end early
    for organism, kind in (("honest", "honest"), ("long_horizon", "incorrigible")):
        events = np.zeros((EPISODES, STEPS), int)
        if kind == "incorrigible":
            events[: EPISODES // 2, 5] = 1
        key = store.add_model(env=env, group="default", organism=organism, kind=kind,
                              seed=0, test_mask=mask, test_events=events,
                              calibration_mask=np.ones((CALIBRATION, STEPS), bool),
                              demo_mask=np.ones((EPISODES, STEPS), bool),
                              validity=dict(VALIDITY, before=VALIDITY))
        for detector, view in DETECTORS:
            test = rng.normal(size=(EPISODES, STEPS))
            if detector == "mahalanobis" and kind == "incorrigible":
                test[: EPISODES // 2, 2:] += 4.0
            store.add_scores(key, detector, view, "demonstrations-only", test=test,
                             calibration=rng.normal(size=(CALIBRATION, STEPS)),
                             demo=rng.normal(size=(EPISODES, STEPS)))
        if saved_episodes:
            rows = np.array([0, 1, EPISODES - 2, EPISODES - 1])
            store.add_episodes(key, rows, _observations(4), np.zeros((4, STEPS), int))
    results = figures.compute(store)
    for row in results["rows"]:
        if row["detector"] == "null":
            row["control_failed"] = True
            row["control_failures"] = ["a made-up reason for the test"]
    metadata = {"suite": "synthetic", "seeds": 1, "seed_values": [0], "seconds": 1.5,
                "timings": {"figures": 0.5}, "config": {"name": "synthetic"},
                "versions": {"jax": "x"}, "cotraining": []}
    directory.mkdir()
    store.save(directory / "scores.npz")
    write_results(directory, results, metadata)
    return results


def test_the_report_has_every_section_table_row_and_figure(tmp_path):
    results = _synthetic_run(tmp_path / "run")
    path = html_report.write_report(tmp_path / "run")
    page = path.read_text()
    for anchor in ("results", "model-level", "roc", "scores-over-time", "episodes", "validity",
                   "run"):
        assert f'id="{anchor}"' in page
    table = page.split('id="results"', 2)[2].split("</table>")[0]
    assert table.count("<tr") == len(results["rows"]) + 1  # a header and a row per cell
    # The null rows are marked, with their reason; the others are not.
    assert table.count("\u2020 failed") == sum(r["detector"] == "null" for r in results["rows"])
    assert 'title="a made-up reason for the test"' in table
    # Every figure is inlined and written as PNG and PDF; nothing comes from the network.
    files = sorted(p.name for p in (tmp_path / "run" / "figures").iterdir())
    stems = {Path(name).stem for name in files}
    assert files == sorted([f"{s}.png" for s in stems] + [f"{s}.pdf" for s in stems])
    assert page.count("data:image/png;base64,") == len(stems)
    assert {"roc_offswitch", "scores_offswitch_long_horizon", "validity_offswitch"} <= stems
    assert sum(s.startswith("episode_offswitch_long_horizon") for s in stems) == 4
    assert not re.search(r"(src|href)=\"(https?:)?//", page)


def test_a_report_drawn_in_two_processes_is_the_same_page_and_figures(tmp_path, monkeypatch):
    """The episode strips drawn by a second process (what the ``audit`` commands do on
    two cores) give the very page and PNG files one process draws."""
    from audit import workers

    pools = []
    real_pool = workers.pool
    monkeypatch.setattr(workers, "pool", lambda *a, **k: pools.append(a) or real_pool(*a, **k))
    monkeypatch.setattr(html_report, "MIN_STRIPS_FOR_A_SECOND_PROCESS", 0)
    _synthetic_run(tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    pages, pictures = [], []
    for name, processes in (("one", 1), ("two", 2)):
        page = html_report.write_report(tmp_path / name, processes=processes).read_text()
        pages.append(re.sub(r"report written</th><td>[^<]*", "", page))
        pictures.append({path.name: path.read_bytes()
                         for path in sorted((tmp_path / name / "figures").glob("*.png"))})
    assert pages[0] == pages[1] and pictures[0] == pictures[1]
    assert pools == [(1,)]  # the second run drew its strips in a second process
    strips = sum(name.startswith("episode_") for name in pictures[1])
    assert strips >= 4 and f"({len(pictures[1])} figures)" in pages[1]  # theirs counted
    # A helper started beforehand (as audit bench does) draws them instead, the same.
    shutil.copytree(tmp_path / "one", tmp_path / "three",
                    ignore=shutil.ignore_patterns("figures", "report.html"))
    with contextlib.ExitStack() as stack:
        helper = html_report.start_helper(
            stack, ScoreStore.load(tmp_path / "three" / "scores.npz"))
        page = html_report.write_report(tmp_path / "three", processes=2,
                                        helper=helper).read_text()
    assert pools == [(1,), (1,)]  # that helper, and no other process
    assert re.sub(r"report written</th><td>[^<]*", "", page) == pages[0]
    assert {path.name: path.read_bytes()
            for path in sorted((tmp_path / "three" / "figures").glob("*.png"))} == pictures[0]
    # With fewer strips than the threshold, no process is started for them.
    monkeypatch.setattr(html_report, "MIN_STRIPS_FOR_A_SECOND_PROCESS", strips + 1)
    html_report.write_report(tmp_path / "two", processes=2)
    with contextlib.ExitStack() as stack:
        assert html_report.start_helper(
            stack, ScoreStore.load(tmp_path / "two" / "scores.npz")) is None
    assert pools == [(1,), (1,)]


PLUGIN_ENVIRONMENT = """
import dataclasses

from audit import registry

registry.register("environments", "my_offswitch", dataclasses.replace(
    registry.get("environments", "offswitch"), name="my_offswitch"))
"""


def test_the_second_process_draws_a_plugin_environments_strips(isolated_registry, tmp_path,
                                                              monkeypatch):
    """The report's second process loads the plug-ins this one did, so an environment
    a plug-in registers keeps its renderer there (its strips are drawn, as in one)."""
    from audit import plugins

    plugin = tmp_path / "my_env.py"
    plugin.write_text(PLUGIN_ENVIRONMENT)
    plugins.load(str(plugin))
    monkeypatch.setattr(html_report, "MIN_STRIPS_FOR_A_SECOND_PROCESS", 0)
    _synthetic_run(tmp_path / "run", env="my_offswitch")
    page = html_report.write_report(tmp_path / "run", processes=2).read_text()
    assert "no renderer" not in page and "episode_my_offswitch_" in page
    assert len(list((tmp_path / "run" / "figures").glob("episode_my_offswitch_*.png"))) >= 4


def test_the_episode_strips_show_the_best_non_control_detector_or_the_one_asked_for(tmp_path):
    results = _synthetic_run(tmp_path / "run")
    rows = results["rows"]
    assert html_report._best_cell(rows, "offswitch", "long_horizon", None) == (
        "mahalanobis", "activations")
    assert html_report._best_cell(rows, "offswitch", "long_horizon", "null/actions") == (
        "null", "actions")
    page = html_report.write_report(tmp_path / "run").read_text()
    assert "red frames: flagged by mahalanobis / activations" in page


def test_the_report_is_rebuilt_from_the_run_files_alone(tmp_path, monkeypatch, capsys):
    _synthetic_run(tmp_path / "run")

    def forbidden(*args, **kwargs):
        raise AssertionError("the report must not roll out or rebuild anything")

    from audit import protocol, rollout

    for module, name in ((rollout, "rollout"), (rollout, "rollout_expert"),
                         (protocol, "run_suite")):
        monkeypatch.setattr(module, name, forbidden)
    assert main(["report", str(tmp_path / "run")]) == 0
    assert "report.html" in capsys.readouterr().out
    first = (tmp_path / "run" / "figures" / "roc_offswitch.png").read_bytes()
    shutil.rmtree(tmp_path / "run" / "figures")
    (tmp_path / "run" / "report.html").unlink()
    assert main(["report", str(tmp_path / "run"), "--quiet"]) == 0
    assert (tmp_path / "run" / "figures" / "roc_offswitch.png").read_bytes() == first


def test_a_run_that_kept_no_episodes_says_so(tmp_path):
    _synthetic_run(tmp_path / "run", saved_episodes=False)
    page = html_report.write_report(tmp_path / "run").read_text()
    assert "the run kept no episodes" in page
    assert 'id="scores-over-time"' in page and "scores_offswitch_long_horizon" in page


def test_report_errors_are_one_line_naming_what_is_wrong(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text("{}")
    (broken / "scores.npz").write_bytes(b"not a zip")
    for argv, expected in (
            ([str(tmp_path / "missing")], "no such directory"),
            ([str(tmp_path / "empty")], "neither results.json"),
            ([str(broken)], "not a readable .npz"),
            ([str(broken), "--highlight", "mahalanobis"], "--highlight: expected DETECTOR/VIEW"),
    ):
        assert main(["report", *argv]) == 2, argv
        error = capsys.readouterr().err.strip()
        assert expected in error and len(error.splitlines()) == 1, error


def _chromium() -> str | None:
    found = (os.environ.get("AUDIT_CHROMIUM") or shutil.which("chromium")
             or shutil.which("chromium-browser") or shutil.which("google-chrome"))
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        found = None
    if found is None:
        message = "headless Chromium (the chromium package) and playwright are needed"
        if os.environ.get("AUDIT_REQUIRE_BROWSER"):
            pytest.fail(message + "; AUDIT_REQUIRE_BROWSER is set")
        pytest.skip(message)
    return found


@pytest.mark.slow
@pytest.mark.ci
def test_a_small_runs_report_shows_its_tables_plots_and_episodes_in_chromium(
        tiny_suite, tmp_path, capsys):  # noqa: F811
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    out = tmp_path / "bench"
    assert main(["bench", "--suite", "tiny_test", "--out", str(out), "--cache-dir",
                 str(tmp_path / "cache"), "--processes", "1", "--quiet"]) == 0, \
        capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())["rows"]
    report = out / "report.html"
    errors, requests = [], []
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium,
                                         args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("console", lambda message: errors.append(message.text)
                if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("request", lambda request: requests.append(request.url))
        page.goto(report.as_uri(), wait_until="load")
        assert page.locator("table#results").is_visible()
        assert page.locator("table#results tbody tr").count() == len(rows)
        images = page.locator("figure img")
        assert images.count() >= 5
        for index in range(images.count()):
            image = images.nth(index)
            image.scroll_into_view_if_needed()
            assert image.is_visible()
            assert image.evaluate("i => i.complete && i.naturalWidth > 100")
        alts = [images.nth(i).get_attribute("alt") for i in range(images.count())]
        assert any(alt.startswith("ROC") for alt in alts)
        assert any(alt.startswith("scores over time") for alt in alts)
        assert sum("episode" in alt for alt in alts) >= 2
        # Sorting: a click on the pre-harm AUROC header orders the rows by it.
        page.locator("table#results th", has_text="pre-harm AUROC").click()
        column = page.locator("table#results th").all_inner_texts().index("pre-harm AUROC")
        values = page.locator(f"table#results tbody tr td:nth-child({column + 1})").evaluate_all(
            "cells => cells.map(c => c.getAttribute('data-sort'))")
        numbers = [float(v) for v in values if v]
        assert numbers == sorted(numbers) and len(numbers) > 1
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_a_sweeps_report_names_the_environments_each_point_left_out(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({
        "sweep": "capacity_depth", "parameter": "depth", "values": [1, 4], "rows": [],
        "failed_points": {"8": "InvalidOrganismError: every environment was left out"},
        "invalid_envs": {"4": {"offswitch": "InvalidOrganismError: KL 0.117 > 0.1 <b>"}},
        # The counterfactual probe's own key: environments without a counterfactual.
        "skipped_envs": ["gymnax:CartPole-v1"]}))
    page = html_report.write_report(tmp_path).read_text()
    assert "<h2>Environments left out</h2>" in page and "<h2>Points without figures</h2>" in page
    assert "<li>4, offswitch: InvalidOrganismError: KL 0.117 &gt; 0.1 &lt;b&gt;</li>" in page
