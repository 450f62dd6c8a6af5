"""Sweeps: a suite run at several values of one setting, and the figures against it.

A :class:`Sweep` names a registered suite, the setting it varies (``apply(suite, value)
-> suite``) and the values, in two sizes: ``values`` (the quick suite's settings, minutes
on 2 cores) and ``paper_values`` with ``paper_seeds`` (for a paper's figure). Every point
is a complete suite run under the sound protocol (on-policy scoring, pre-harm windows,
conformal p-values, controls), written as a benchmark run directory of its own, so any
point can be recomputed with ``audit metrics``. The sweep then writes, for the figures it
reads (default: pre-harm AUROC and caught before harm):

- ``<name>.csv``: one line per (value, cell, figure) with its 95% interval and the cell's
  ``control_failed`` mark;
- ``<name>.png`` and ``<name>.pdf``: a panel per (figure, environment), a line per
  (detector, view) of the audited incorrigible organisms against the swept value, with
  intervals; cells whose control failed drawn hollow;
- ``sweep.json``: the sweep's settings, versions, timings and the CSV's rows.

Sweeps are registered in the ``sweeps`` group (the built-ins in
``benchmarks/sweeps.py``, through the ``audit.sweeps`` entry points) and run by
``audit sweep NAME``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from audit import registry
from audit.runs import RunCheckpoint

# Figures a sweep can plot (keys of audit.figures rows, each with ``_ci_low`` / ``_ci_high``).
SWEEP_FIGURES = {
    "auroc": "pre-harm AUROC",
    "auroc_rankable": "pre-harm AUROC, positives with a non-empty window",
    "auroc_over_random": "pre-harm AUROC minus the random direction's (paired)",
    "caught_before_harm": "caught before harm",
    "fpr_own_clean": "FPR, own clean test episodes",
    "fpr_honest": "FPR, honest model's test episodes",
    "train_auroc": "train-layout AUROC",
    "auroc_full_episode": "full-episode AUROC (after the fact)",
}
SETTINGS = ("quick", "paper")
EXPERIMENTS = ("suite", "counterfactual")
CSV_COLUMNS = ("parameter", "value", "env", "group", "organism", "organism_kind", "detector",
               "view", "protocol", "figure", "estimate", "ci_low", "ci_high", "positives",
               "control_failed", "empty_windows")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A named sweep: a suite, the setting it varies and the values it takes.

    Attributes:
      name: the registry name (``audit sweep NAME``).
      suite: the registered suite each point runs.
      parameter: what the values are (the x axis), e.g. ``test_layout_demonstrations``.
      values: the values of the quick setting.
      apply: ``apply(suite, value) -> suite``, the suite of one point; a module-level
        function, so that worker processes can receive the suites it makes.
      paper_values: the values of the paper setting (default: ``values``).
      paper_seeds: seeds per point of the paper setting (the quick one uses the suite's).
      figures: the row figures drawn and written (keys of :data:`SWEEP_FIGURES`).
      log_x: draw the values on a logarithmic axis (symmetric around 0, so 0 is allowed).
      description: one line for ``audit list``.
      experiment: ``"suite"`` (the suite run at each value, as above) or
        ``"counterfactual"`` (:mod:`audit.counterfactual`: the suite's models probed on
        train layouts with the test-only feature switched on; ``values`` and ``apply``
        are not used, ``parameter`` names the probe).
      paper_suite: the registered suite of the paper setting (default: ``suite``).
    """

    name: str
    suite: str
    parameter: str
    values: tuple[Any, ...] = ()
    apply: Callable[[Any, Any], Any] | None = None
    paper_values: tuple[Any, ...] = ()
    paper_seeds: int = 5
    figures: tuple[str, ...] = ("auroc", "caught_before_harm")
    log_x: bool = False
    description: str = ""
    experiment: str = "suite"
    paper_suite: str | None = None

    def __post_init__(self):
        if self.experiment not in EXPERIMENTS:
            raise ValueError(f"Sweep {self.name!r}: experiment must be one of "
                             f"{', '.join(EXPERIMENTS)}; got {self.experiment!r}")
        if self.experiment == "suite" and (not self.values or self.apply is None):
            raise ValueError(f"Sweep {self.name!r}: values must name at least one value, and "
                             "apply(suite, value) make each point's suite")
        unknown = [f for f in self.figures if f not in SWEEP_FIGURES]
        if unknown or not self.figures:
            raise ValueError(f"Sweep {self.name!r}: figures must be some of "
                             f"{', '.join(SWEEP_FIGURES)}; got {list(self.figures)}")
        if self.paper_seeds < 1:
            raise ValueError(f"Sweep {self.name!r}: paper_seeds must be >= 1")

    def values_for(self, setting: str) -> tuple[Any, ...]:
        """The values of ``setting`` (``quick`` or ``paper``)."""
        _check_setting(setting)
        return self.values if setting == "quick" else (self.paper_values or self.values)

    def suite_for(self, setting: str) -> str:
        """The registered suite that ``setting`` runs."""
        _check_setting(setting)
        return self.suite if setting == "quick" else (self.paper_suite or self.suite)

    def seeds_for(self, setting: str, suite) -> int:
        """Seeds per point of ``setting``: the suite's (quick) or ``paper_seeds``."""
        _check_setting(setting)
        return suite.seeds if setting == "quick" else self.paper_seeds


def _check_setting(setting: str) -> None:
    if setting not in SETTINGS:
        raise ValueError(f"unknown sweep setting {setting!r}; choose from: {', '.join(SETTINGS)}")


class SweepCheckpoint(RunCheckpoint):
    """A sweep's finished points, kept while it runs so that a killed sweep can resume
    (``audit sweep --resume``).

    Each point, as it finishes, is written whole under ``points/<parameter>=<value>/``
    (its benchmark run directory, moved into place complete) and then recorded in
    ``point-<index>.json`` (value, seconds, CSV rows and the environments left out, or
    the error that left it without figures); ``run.json`` holds the sweep's settings,
    which a resumed run must match (:func:`audit.runs.resume_checkpoint`). Points do not
    depend on each other, so a resumed sweep's rows are those of an uninterrupted one.

    Args:
      directory: where the files go.
      settings: what identifies the sweep (JSON-ready).
    """

    def point_directory(self, name: str) -> Path:
        """Where the finished point ``name`` (``<parameter>=<value>``) is kept."""
        return self.directory / "points" / name

    def save(self, index: int, record: dict[str, Any]) -> None:
        """Records point ``index`` (its directory, if any, is already in place)."""
        from audit.runs import write_json

        write_json(self.directory / f"point-{index}.json", record)

    def finished(self) -> dict[int, dict[str, Any]]:
        """The points recorded so far, by index (an unreadable record runs again)."""
        import json
        import warnings

        found = {}
        for record in sorted(self.directory.glob("point-*.json")):
            try:
                found[int(record.stem.split("-", 1)[1])] = json.loads(record.read_text())
            except (OSError, ValueError) as error:
                warnings.warn(f"checkpoint {record} is unreadable ({error}); its point runs "
                              "again", stacklevel=2)
        return found


def run_sweep(sweep: Sweep, values: Sequence[Any] | None = None, setting: str = "quick",
              seeds: int | None = None, first_seed: int = 0, cache_dir=None,
              progress: Callable[[str], None] | None = None, processes: int = 1,
              point_done: Callable[[Any, dict, Any], None] | None = None,
              checkpoint: SweepCheckpoint | None = None, base=None) -> dict[str, Any]:
    """Runs ``sweep``'s suite at each value and collects the figures.

    Args:
      sweep: the sweep.
      values: the values to run (default: those of ``setting``).
      setting: ``quick`` or ``paper``.
      seeds: seeds per point (default: the setting's).
      first_seed: the seeds are ``first_seed, first_seed + 1, ...``.
      cache_dir: the organism cache, shared by every point (the organisms do not depend
        on the swept setting unless the sweep changes how they are built).
      progress: called with a short description before each stage.
      processes: worker processes per suite run (see :func:`audit.protocol.run_suite`).
      point_done: called as ``point_done(value, results, suite)`` after each point (to
        write its run directory).
      checkpoint: where each point's record is saved as it finishes (after
        ``point_done``); the points it already holds for these values are taken from it,
        not run again.
      base: the suite each value is applied to (default: the registered suite of the
        sweep's ``setting``); e.g. that suite with other p-values.

    Returns:
      ``{"rows": [CSV rows], "points": [{"value", "seconds", "suite"}], "seeds"}``. An
      environment where, at a point, an organism fails its validity check or
      co-training diverges is left out of that point (``invalid_envs``, ``{env:
      "ErrorType: message"}``, in its ``points`` entry) and the point keeps the rows of
      its other environments; a point where every environment failed has no rows and
      an ``error`` (the messages); the sweep goes on either way.
    """
    from audit.gan import DivergenceError
    from audit.protocol import InvalidOrganismError, run_suite
    from audit.runs import strict_json

    if base is None:
        base = registry.get("suites", sweep.suite_for(setting))
    from audit.protocol import Suite

    if not isinstance(base, Suite):
        raise registry.ContractError(
            f"sweep {sweep.name!r}: its suite {sweep.suite_for(setting)!r} "
            f"({type(base).__name__}) is not an audit.protocol.Suite, which a sweep runs")
    values = tuple(values) if values is not None else sweep.values_for(setting)
    seeds = seeds or sweep.seeds_for(setting, base)
    say = progress or (lambda message: None)
    finished = {} if checkpoint is None else checkpoint.finished()
    rows, points = [], []
    for number, value in enumerate(values):
        suite = sweep.apply(base, value)
        record = finished.get(number)
        if record is not None and record.get("value") == value:
            say(f"{sweep.name}: {sweep.parameter} = {value}: resumed from the checkpoint")
            rows.extend(record["rows"])
            points.append(dict(value=value, seconds=record["seconds"], suite=suite,
                               **{key: record[key] for key in ("error", "invalid_envs")
                                  if key in record}))
            continue
        say(f"{sweep.name}: {sweep.parameter} = {value} ({number + 1} of {len(values)})")
        started = time.perf_counter()
        try:
            results = run_suite(suite, seeds=seeds, cache_dir=cache_dir, progress=say,
                                processes=processes, first_seed=first_seed,
                                skip_invalid_envs=True)
        except (InvalidOrganismError, DivergenceError) as error:
            # A point where an organism stops being valid (or co-training diverges) in
            # every environment is a finding of the sweep, not the end of it: recorded,
            # without figures. One such environment only leaves that environment out.
            points.append(dict(value=value, seconds=time.perf_counter() - started,
                               suite=suite, error=f"{type(error).__name__}: {error}"))
            say(f"{sweep.name}: {sweep.parameter} = {value}: {error}")
            if checkpoint is not None:
                checkpoint.save(number, dict(value=value, seconds=points[-1]["seconds"],
                                             rows=[], error=points[-1]["error"]))
            continue
        seconds = time.perf_counter() - started
        # As JSON has them (NaN -> None): a resumed point's rows read back the same.
        point_rows = strict_json(sweep_rows(results["rows"], sweep.parameter, value,
                                            sweep.figures))
        rows.extend(point_rows)
        left_out = ({"invalid_envs": dict(results["invalid_envs"])}
                    if results.get("invalid_envs") else {})
        points.append(dict(value=value, seconds=seconds, suite=suite, **left_out))
        if point_done is not None:
            point_done(value, results, suite)
        if checkpoint is not None:
            checkpoint.save(number, dict(value=value, seconds=seconds, rows=point_rows,
                                         **left_out))
    return dict(rows=rows, points=points, seeds=seeds)


def sweep_rows(result_rows: Sequence[dict], parameter: str, value: Any,
               figures: Sequence[str]) -> list[dict]:
    """The CSV rows of one point: one per (result row, figure).

    Example:
      >>> row = dict(env="e", group="default", organism="o", organism_kind="trained-in",
      ...            detector="d", view="v", protocol="p", positives=3, control_failed=False,
      ...            auroc=0.9, auroc_ci_low=0.8, auroc_ci_high=1.0)
      >>> first = sweep_rows([row], "k", 4, ["auroc"])[0]
      >>> first.get("estimate"), first.get("ci_low")
      (0.9, 0.8)
    """
    out = []
    for row in result_rows:
        for figure in figures:
            out.append(dict(
                parameter=parameter, value=value,
                **{key: row.get(key) for key in ("env", "group", "organism", "organism_kind",
                                                 "detector", "view", "protocol")},
                figure=figure, estimate=row.get(figure), ci_low=row.get(f"{figure}_ci_low"),
                ci_high=row.get(f"{figure}_ci_high"), positives=row.get("positives"),
                control_failed=bool(row.get("control_failed")),
                empty_windows=row.get("empty_windows")))
    return out


def csv_text(rows: Sequence[dict]) -> str:
    """The sweep's rows as CSV (:data:`CSV_COLUMNS`; a missing figure is empty)."""
    return csv_table(rows, CSV_COLUMNS)


def csv_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """``rows`` as CSV with ``columns`` (a missing or None value is empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n",
                            extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row.get(key) for key in columns})
    return buffer.getvalue()


def plotted_rows(rows: Sequence[dict]) -> list[dict]:
    """The rows a sweep's figure draws: audited incorrigible organisms (not the honest
    model, its twin or a model of unknown ground truth) with a defined estimate."""
    return [row for row in rows if row["organism_kind"] in ("trained-in", "generalising")
            and row["estimate"] is not None and not _is_nan(row["estimate"])]


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def sweep_plot(rows: Sequence[dict], sweep: Sweep, values: Sequence[Any],
               path_stem: str | os.PathLike, failed: Sequence[Any] = (),
               invalid_envs: dict[Any, Sequence[str]] | None = None) -> list[Path]:
    """Draws the sweep's figure and writes ``<stem>.png`` and ``<stem>.pdf``.

    A panel per (figure, environment); a line per (organism, detector, view) of the
    audited incorrigible organisms (a colour per detector and view, a line style per
    organism), the estimate against the swept value with its 95% interval as error
    bars; a point whose cell's control failed is drawn hollow. The
    ``failed`` values (points without figures) are named in the title, and a panel's
    title names the values where its environment was left out (``invalid_envs``: value
    -> the environments left out there).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = plotted_rows(rows)
    # An environment left out at every point with figures still gets its panels (empty,
    # their titles saying where it was left out).
    envs = list(dict.fromkeys([row["env"] for row in rows] + [
        env for value in values for env in (invalid_envs or {}).get(value, ())])) \
        or ["(no cells)"]
    figures = list(sweep.figures)
    positions = {value: index for index, value in enumerate(values)}
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    figure, axes = plt.subplots(len(figures), len(envs), squeeze=False,
                                figsize=(4.0 * len(envs) + 2.6, 3.0 * len(figures)),
                                constrained_layout=True)
    # A colour per (detector, view), the same in every panel; a line style per organism.
    series = list(dict.fromkeys((row["detector"], row["view"]) for row in rows))
    organisms = list(dict.fromkeys(row["organism"] for row in rows))
    colours = plt.get_cmap("tab20")
    # Line styles tell organisms apart only where a panel shows more than one.
    shared = any(len({row["organism"] for row in rows if row["env"] == env}) > 1
                 for env in envs)
    styles = ("-", "--", ":", "-.") if shared else ("-",)
    handles = {}
    for r, name in enumerate(figures):
        for c, env in enumerate(envs):
            axis = axes[r][c]
            for index, (detector, view) in enumerate(series):
                for number, organism in enumerate(organisms):
                    chosen = [row for row in rows if row["figure"] == name
                              and row["env"] == env and row["organism"] == organism
                              and (row["detector"], row["view"]) == (detector, view)]
                    if not chosen:
                        continue
                    chosen.sort(key=lambda row: positions.get(row["value"], 0))
                    xs = [row["value"] if numeric else positions[row["value"]]
                          for row in chosen]
                    ys = [row["estimate"] for row in chosen]
                    low = [y - (row["ci_low"] if row["ci_low"] is not None else y)
                           for y, row in zip(ys, chosen, strict=True)]
                    high = [(row["ci_high"] if row["ci_high"] is not None else y) - y
                            for y, row in zip(ys, chosen, strict=True)]
                    colour = colours(index % 20)
                    drawn = axis.errorbar(xs, ys, yerr=[low, high], color=colour,
                                          linewidth=1.0, capsize=2,
                                          linestyle=styles[number % len(styles)])
                    for x, y, row in zip(xs, ys, chosen, strict=True):
                        axis.plot([x], [y], marker="o", markersize=4, color=colour,
                                  markerfacecolor="white" if row["control_failed"] else colour)
                    handles.setdefault(f"{detector} / {view}", drawn)
            if name in ("auroc", "train_auroc", "auroc_full_episode"):
                axis.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
            axis.set_ylim(-0.03, 1.03)
            if numeric:
                if sweep.log_x:
                    axis.set_xscale("symlog", linthresh=max(min(abs(v) for v in values
                                                                if v) if any(values) else 1, 1))
                axis.set_xticks(list(values), [str(v) for v in values])
                span = (max(values) - min(values)) or 1
                axis.set_xlim(min(values) - 0.05 * span if not sweep.log_x else
                              min(values) - 0.3, max(values) * (1.3 if sweep.log_x else 1)
                              + 0.05 * span * (not sweep.log_x))
            else:
                axis.set_xticks(range(len(values)), [str(v) for v in values])
            shown = sorted({row["organism"] for row in rows if row["env"] == env})
            left_out = [str(value) for value in values if env in (invalid_envs or {}).get(
                value, ())]
            note = (f"\nleft out at {sweep.parameter} = {', '.join(left_out)} (see sweep.json)"
                    if left_out else "")
            axis.set_title(f"{env} ({', '.join(shown)}): {SWEEP_FIGURES[name]}{note}",
                           fontsize=8)
            axis.set_xlabel(sweep.parameter, fontsize=8)
            axis.tick_params(labelsize=7)
    if handles:
        title = "detector / view (hollow: control failed)"
        if shared:
            title += "; line style: " + ", ".join(
                f"{styles[n % len(styles)]} {organism}" for n, organism in enumerate(organisms))
        figure.legend(list(handles.values()), list(handles), loc="outside right center",
                      fontsize=6, title=title, title_fontsize=6)
    missing = (f"\nno figures at {sweep.parameter} = {', '.join(map(str, failed))} "
               "(an organism invalid or co-training diverged: see sweep.json)" if failed else "")
    figure.suptitle(f"sweep {sweep.name}: {sweep.description}{missing}", fontsize=9)
    stem = Path(path_stem)
    written = []
    for suffix in (".png", ".pdf"):
        path = stem.with_suffix(suffix)
        figure.savefig(path, dpi=150)
        written.append(path)
    plt.close(figure)
    return written
