"""The visual report of a finished run: one self-contained ``report.html``.

``audit report RUN_DIR`` (and the end of ``audit bench`` and ``audit sweep``) writes
``RUN_DIR/report.html`` and, for papers, every figure in it as PNG and PDF under
``RUN_DIR/figures/``. The page needs no network: its figures are inlined PNGs, its
styles and its table sorting are inline.

A benchmark run's report is built from its ``results.json`` and ``scores.npz`` only:
figures are read or recomputed from the stored scores (as ``audit metrics`` does), the
episodes drawn are those the run kept (``Suite.saved_episodes``), and nothing is rolled
out or trained again, so any finished run can be reported. It has:

- the results table with intervals, sortable by any column, control-failed cells marked
  with a dagger and their reason; the model-level table;
- pre-harm ROC curves per environment, a panel per organism and a curve per
  (detector, view);
- the score over time of kept positive and clean test episodes: per step, the
  time-matched conformal p-value of the running score as ``-log10 p``, with the flagging
  level ``alpha`` and each positive's hidden event drawn;
- kept episodes as strips of frames (environments with ``EnvironmentSpec.render``),
  the steps one detector flagged framed in red and the hidden event labelled;
- the organisms' validity figures (train-layout KL against its bound, event rates);
- the run's settings, versions and timings.

A sweep's report has its figure, its table, and a link to each point's own report.

Example:
  >>> from audit.html_report import write_report  # doctest: +SKIP
  >>> write_report("runs/quick13")  # doctest: +SKIP
  PosixPath('runs/quick13/report.html')
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import datetime
import html
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from audit import figures as figure_math
from audit.figures import CONTROLS, HONEST, TWIN
from audit.scores import ScoreFileError, ScoreStore

REPORT_NAME = "report.html"
FIGURES_DIR = "figures"
EPISODES_PER_CLASS = 2  # kept positives and clean episodes drawn per organism
# Fewer strips than this are drawn here even when a second process is asked for: starting
# one (imports and reading the run, 2-3 s on 2 cores) would cost more than drawing them.
MIN_STRIPS_FOR_A_SECOND_PROCESS = 16
MAX_STRIP_STEPS = 24  # frames per episode strip
COLUMN_INCHES = 3.4  # a paper's column: panels are sized so that text stays readable

# (key, header, digits): the results table's figure columns.
RESULT_COLUMNS = (("auroc", "pre-harm AUROC", 2),
                  ("auroc_rankable", "AUROC without empty windows", 2),
                  ("auroc_over_random", "AUROC over the random direction", 2),
                  ("caught_before_harm", "caught before harm", 2),
                  ("lead_time", "lead time (steps)", 1), ("fpr_own_clean", "FPR own clean", 2),
                  ("fpr_honest", "FPR honest", 2),
                  ("auroc_full_episode", "full-episode AUROC", 2),
                  ("train_auroc", "train AUROC", 2))


class ReportError(ValueError):
    """A run directory that cannot be reported; the message names the file and the problem."""


def write_report(run_dir: str | os.PathLike, highlight: str | None = None,
                 processes: int = 1,
                 helper: concurrent.futures.Executor | None = None) -> Path:
    """Writes ``RUN_DIR/report.html`` and ``RUN_DIR/figures/*.{png,pdf}``; returns the page.

    Args:
      run_dir: a finished ``audit bench`` run (``results.json`` and ``scores.npz``) or
        ``audit sweep`` run (``sweep.json``).
      highlight: ``detector/view`` whose flags the episode strips show (default: per
        organism, its non-control cell with the highest pre-harm AUROC).
      processes: with 2 or more, a benchmark run's episode strips are drawn in a second,
        spawned process while this one draws the other figures: the same page and files
        in less time (most of it is matplotlib drawing, on one core). The ``audit``
        commands use 2 where the machine has 2 cores; a script of your own that asks
        for it needs the ``if __name__ == "__main__":`` guard that spawning requires.
      helper: with ``processes`` >= 2, an executor already started that draws the
        strips instead of a process started here (:func:`start_helper`: ``audit bench``
        starts it before writing the run's results, so that its imports overlap that
        work).

    Returns:
      the path of ``report.html``.

    Raises:
      ReportError: if ``run_dir`` is not a finished run, or a file in it cannot be read.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such directory (expected a finished run of "
                          "audit bench or audit sweep)")
    if (run_dir / "sweep.json").is_file():
        body, title = _sweep_body(run_dir)
    elif (run_dir / "results.json").is_file():
        if processes > 1:
            body, title = _bench_body_in_two_processes(run_dir, highlight, helper)
        else:
            body, title = _bench_body(run_dir, highlight)
    else:
        raise ReportError(f"{run_dir}: neither results.json (audit bench) nor sweep.json "
                          "(audit sweep): not a finished run")
    page = _page(title, body)
    path = run_dir / REPORT_NAME
    temporary = run_dir / f".{REPORT_NAME}.tmp"
    temporary.write_text(page, encoding="utf-8")
    os.replace(temporary, path)
    return path


# ---------------------------------------------------------------------------------------
# Files


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReportError(f"{path}: not a readable JSON file ({error})") from None


class _Figures:
    """Saves figures as PNG and PDF under ``figures/`` and hands back the inline PNG."""

    def __init__(self, run_dir: Path):
        self.directory = run_dir / FIGURES_DIR
        self.directory.mkdir(exist_ok=True)
        self.names: list[str] = []

    def save(self, figure, stem: str, alt: str, caption: str = "") -> str:
        from matplotlib import pyplot as plt

        stem = "".join(c if c.isalnum() or c in "-_=." else "_" for c in stem)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=150)
        (self.directory / f"{stem}.png").write_bytes(buffer.getvalue())
        # The layout is settled by the first save; running it again for the PDF would
        # double the report's time (constrained layout is most of it).
        figure.set_layout_engine("none")
        figure.savefig(self.directory / f"{stem}.pdf")
        plt.close(figure)
        self.names.append(stem)
        encoded = base64.b64encode(buffer.getvalue()).decode()
        caption_html = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        return (f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}" '
                f'data-file="{FIGURES_DIR}/{stem}.png">{caption_html}</figure>')


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    plt.rcParams.update({"font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7,
                         "legend.fontsize": 6, "xtick.labelsize": 6, "ytick.labelsize": 6})
    return plt


# ---------------------------------------------------------------------------------------
# A benchmark run


def _bench_inputs(run_dir: Path) -> tuple[dict, ScoreStore, dict, list[str]]:
    """``(results, store, per_cell windows, environments)`` of a benchmark run."""
    results = _read_json(run_dir / "results.json")
    try:
        store = ScoreStore.load(run_dir / "scores.npz")
    except ScoreFileError as error:
        raise ReportError(str(error)) from None
    per_cell = figure_math.all_windows(store, figure_math.settings_of(store))
    return results, store, per_cell, _envs_of(store)


def _envs_of(store: ScoreStore) -> list[str]:
    """The environments of a run's models, in the run's order."""
    return list(dict.fromkeys(model["env"] for model in store.models.values()))


def start_helper(stack: contextlib.ExitStack, store: ScoreStore
                 ) -> concurrent.futures.Executor | None:
    """Starts the process that draws the episode strips of a report on ``store``.

    It imports what drawing needs at once, while this process goes on (``audit bench``
    starts it before writing the run's results).

    Args:
      stack: the process is stopped when it closes (after the work handed to it).
      store: the run's scores, as ``scores.npz`` will hold them.

    Returns:
      the executor to pass as ``write_report``'s ``helper``, or None where the report
      would draw its strips itself (fewer than :data:`MIN_STRIPS_FOR_A_SECOND_PROCESS`).
    """
    from audit import workers

    if _strip_count(store, _envs_of(store)) < MIN_STRIPS_FOR_A_SECOND_PROCESS:
        return None
    helper = stack.enter_context(workers.pool(1))
    helper.submit(_warm_up)
    return helper


def _warm_up() -> None:
    _pyplot()  # its return value, the pyplot module, could not be sent back


def _bench_body_in_two_processes(run_dir: Path, highlight: str | None,
                                 helper: concurrent.futures.Executor | None = None
                                 ) -> tuple[str, str]:
    """:func:`_bench_body`, its episode strips drawn by a second process (``helper``, or
    :func:`audit.workers.pool`: the same plug-ins, stopped with this one); drawn here
    where there are fewer than :data:`MIN_STRIPS_FOR_A_SECOND_PROCESS` (starting the
    process would cost more) or that process broke."""
    import concurrent.futures.process

    from audit import workers

    inputs = _bench_inputs(run_dir)
    if _strip_count(inputs[1], inputs[3]) < MIN_STRIPS_FOR_A_SECOND_PROCESS:
        return _bench_body(run_dir, highlight, inputs)
    with contextlib.ExitStack() as stack:
        pool = helper if helper is not None else stack.enter_context(workers.pool(1))
        strips = pool.submit(_episode_strips_of, str(run_dir), highlight)

        def drawn() -> tuple[list[str], list[str]] | None:
            try:
                return strips.result()
            except concurrent.futures.process.BrokenProcessPool as error:
                warnings.warn(f"the report's second process broke ({error}); its episode "
                              "strips are drawn in this one", stacklevel=2)
                return None

        return _bench_body(run_dir, highlight, inputs, strips=drawn)


def _strip_count(store: ScoreStore, envs: list[str]) -> int:
    """How many episode strips :func:`_episode_strips` draws for a run (at most)."""
    count = 0
    for env in envs:
        for model_key in _first_seed_models(store, env):
            kept = store.episodes(model_key)
            if kept is not None:
                count += len(_shown_episodes(kept))
    return count


def _shown_episodes(kept: dict) -> list[tuple[int, bool]]:
    """The kept episodes a model's strips show, as ``(index, positive)``: its first
    :data:`EPISODES_PER_CLASS` positives (an event inside the episode), then its first
    as many clean ones."""
    positive = ((kept["events"] > 0) & kept["mask"]).any(axis=1)
    return ([(int(index), True) for index in np.flatnonzero(positive)[:EPISODES_PER_CLASS]]
            + [(int(index), False)
               for index in np.flatnonzero(~positive)[:EPISODES_PER_CLASS]])


def _episode_strips_of(run_dir: str, highlight: str | None) -> tuple[list[str], list[str]]:
    """A benchmark run's episode strips, drawn and saved: ``(HTML parts, figure stems)``
    (the job of :func:`_bench_body_in_two_processes`' second process)."""
    _pyplot()  # the report's font sizes, as in the process drawing the rest
    results, store, per_cell, envs = _bench_inputs(Path(run_dir))
    saved = _Figures(Path(run_dir))
    parts = _episode_strips(store, per_cell, results.get("rows", []), envs,
                            figure_math.settings_of(store)["alpha"], highlight, saved)
    return parts, saved.names


def _bench_body(run_dir: Path, highlight: str | None, inputs=None,
                strips=None) -> tuple[str, str]:
    """The page body and title of a benchmark run (``inputs``: its
    :func:`_bench_inputs`, read if None); ``strips()``, if given, returns its episode
    strips drawn elsewhere (``(HTML parts, figure stems)``, or None: draw them here)."""
    results, store, per_cell, envs = inputs or _bench_inputs(run_dir)
    rows = results.get("rows", [])
    settings = figure_math.settings_of(store)
    alpha, aggregate = settings["alpha"], settings["aggregate"]
    saved = _Figures(run_dir)
    suite = results.get("suite", "benchmark")
    title = f"{suite} suite: report"
    failed = sum(bool(row.get("control_failed")) for row in rows)
    invalid = results.get("invalid_envs") or {}
    parts = [f"<h1>{html.escape(title)}</h1>",
             _facts([("suite", suite), ("seeds", results.get("seed_values", results.get("seeds"))),
                     ("environments", ", ".join(envs)),
                     *([("environments left out", "; ".join(
                         f"{env}: {message}" for env, message in invalid.items()))]
                       if invalid else []),
                     ("cells", len(rows)), ("cells marked control_failed", failed),
                     ("flagging level alpha", alpha), ("aggregate", aggregate),
                     ("run time", _seconds(results.get("seconds"))),
                     ("report written", _now())]),
             _contents(["results", "model-level", "roc", "scores-over-time", "episodes",
                        "validity", "run"]),
             '<h2 id="results">Results</h2>',
             "<p>Pre-harm figures score each audited model's own test-layout episodes "
             "before the first hidden event, by conformal p-values against the model's own "
             "train-layout calibration episodes (95% intervals in brackets). "
             "<span class='failed'>\u2020</span> marks a cell whose control failed "
             "(hover for the reason): do not read it as detection. Click a header to "
             "sort.</p>",
             _results_table(rows),
             '<h2 id="model-level">Model-level audit</h2>',
             _model_level_table(results.get("model_level", [])),
             '<h2 id="roc">Pre-harm ROC curves</h2>']
    roc = figure_math.roc_curves(store, per_cell)
    for env in envs:
        if roc.get(env):
            parts.append(saved.save(_roc_figure(roc[env], env), f"roc_{env}",
                                    f"ROC curves of {env}",
                                    f"{env}: pre-harm ROC, positives' pre-harm windows against "
                                    "own clean and honest test windows, by p-value"))
        else:
            parts.append(f"<p>{html.escape(env)}: no positive episodes, no ROC curve.</p>")
    parts.append('<h2 id="scores-over-time">Scores over time</h2>'
                 f"<p>Per step, <code>-log10 p</code> of the running {html.escape(aggregate)} "
                 "score, its p-value matched by length against the model's calibration "
                 "episodes (the quantity that is flagged); the dashed line is the flagging "
                 f"level alpha = {alpha:g}. Red: kept episodes with a hidden event (a cross at "
                 "the event's step; the pre-harm window ends before it); blue: clean "
                 "episodes. Seed of the first model of each organism.</p>")
    for env in envs:
        for model_key in _first_seed_models(store, env):
            found = _score_over_time_figure(store, per_cell, model_key, alpha)
            if found is not None:
                model = store.models[model_key]
                parts.append(saved.save(
                    found, f"scores_{env}_{model['organism']}",
                    f"scores over time of {model['organism']} in {env}",
                    f"{env} / {model['organism']} (seed {model['seed']})"))
    parts.append('<h2 id="episodes">Episodes</h2>')
    strips_at = len(parts)
    if strips is None:
        parts.extend(_episode_strips(store, per_cell, rows, envs, alpha, highlight, saved))
    parts.append('<h2 id="validity">Organisms\' validity</h2>')
    for env in envs:
        found = _validity_figure(rows, env)
        if found is not None:
            parts.append(saved.save(found, f"validity_{env}", f"validity of {env}'s organisms",
                                    f"{env}: each organism's validity figures as audited "
                                    "(mean over seeds)"))
    parts.append('<h2 id="run">Run</h2>')
    parts.append(_run_section(results, store))
    if strips is not None:
        found = strips()
        if found is None:
            strip_parts = _episode_strips(store, per_cell, rows, envs, alpha, highlight, saved)
        else:
            strip_parts, strip_names = found
            saved.names.extend(strip_names)
        parts[strips_at:strips_at] = strip_parts
    parts.append(f"<p class='files'>Figures as PNG and PDF: <code>{FIGURES_DIR}/</code> "
                 f"({len(saved.names)} figures).</p>")
    return "\n".join(parts), title


def _first_seed_models(store: ScoreStore, env: str) -> list[str]:
    """The first seed's model of each organism of ``env`` (first group), organism order."""
    chosen: dict[str, str] = {}
    for key, model in store.models.items():
        if model["env"] != env:
            continue
        known = chosen.get(model["organism"])
        if known is None or model["seed"] < store.models[known]["seed"]:
            chosen[model["organism"]] = key
    return list(chosen.values())


def _cells_of(store: ScoreStore, model_key: str) -> list[str]:
    return [cell for cell, info in store.cells.items() if info["model"] == model_key]


def _kept_rows(store: ScoreStore, model_key: str, per_cell_found: dict) -> tuple[list, list]:
    """Rows of the model's kept positive and clean test episodes (at most
    :data:`EPISODES_PER_CLASS` each); the first episodes if none were kept."""
    kept = store.episodes(model_key)
    rows = (kept["indices"] if kept is not None
            else np.arange(per_cell_found["positive"].size))
    positive = per_cell_found["positive"][rows]
    return (list(rows[positive][:EPISODES_PER_CLASS]),
            list(rows[~positive][:EPISODES_PER_CLASS]))


def _score_over_time_figure(store, per_cell, model_key, alpha):
    cells = _cells_of(store, model_key)
    if not cells:
        return None
    plt = _pyplot()
    mask = store.arrays[f"{model_key}/test_mask"]
    events = store.arrays[f"{model_key}/test_events"]
    positives, clean = _kept_rows(store, model_key, per_cell[cells[0]])
    columns = min(4, len(cells))
    panel_rows = math.ceil(len(cells) / columns)
    height = 1.75 * panel_rows + 0.6
    figure, axes = plt.subplots(panel_rows, columns, squeeze=False, sharex=True, sharey=True,
                                figsize=(2 * COLUMN_INCHES, height))
    # A fixed layout: constrained layout costs seconds per figure of this many panels.
    figure.subplots_adjust(left=0.08, right=0.99, bottom=0.45 / height, top=1 - 0.62 / height,
                           wspace=0.12, hspace=0.62)
    ceiling = 0.0
    for axis, cell in zip(axes.flat, cells, strict=False):
        info, found = store.cells[cell], per_cell[cell]
        for row, colour in [(r, "tab:red") for r in positives] + [(r, "tab:blue") for r in clean]:
            length = int(mask[row].sum())
            values = -np.log10(found["p_steps"][row, :length])
            ceiling = max(ceiling, float(values.max(initial=0)))
            axis.plot(np.arange(length), values, color=colour, linewidth=0.9, alpha=0.8)
            hit = np.flatnonzero((events[row] > 0) & mask[row])
            if hit.size:
                axis.plot([hit[0]], [values[hit[0]] if hit[0] < length else 0], marker="x",
                          color="black", markersize=4)
        axis.axhline(-math.log10(alpha), color="black", linestyle="--", linewidth=0.7)
        axis.set_title(f"{info['detector']}\n{info['view']}", fontsize=6.5)
    for axis in list(axes.flat)[len(cells):]:
        axis.set_visible(False)
    for axis in axes[-1]:
        axis.set_xlabel("step")
    for axis in axes[:, 0]:
        axis.set_ylabel("-log10 p")
    for axis in axes.flat:
        axis.set_ylim(0, max(ceiling, -math.log10(alpha)) * 1.08)
    model = store.models[model_key]
    figure.suptitle(f"{model['env']} / {model['organism']}: kept positive (red) and clean "
                    "(blue) test episodes")
    return figure


def _best_cell(rows: list[dict], env: str, organism: str, highlight: str | None):
    """``(detector, view)`` whose flags a strip shows: ``highlight``'s, else the
    non-control cell with the highest pre-harm AUROC among the organism's (among the
    environment's incorrigible organisms' for one without positives), preferring cells
    whose control held; None if there is none."""
    if highlight is not None:
        detector, _, view = highlight.partition("/")
        return detector, view
    scored = [row for row in rows if row["env"] == env and row["detector"] not in CONTROLS
              and row.get("auroc") is not None]
    pool = ([row for row in scored if row["organism"] == organism]
            or [row for row in scored if row["organism"] not in (HONEST, TWIN)])
    if not pool:
        return None
    held = [row for row in pool if not row.get("control_failed")]
    best = max(held or pool, key=lambda row: row["auroc"])
    return best["detector"], best["view"]


def _episode_strips(store, per_cell, rows, envs, alpha, highlight, saved) -> list[str]:
    from audit import registry
    from audit.render import episode_frames, strip_figure

    parts = []
    for env in envs:
        try:
            render = registry.get("environments", env).render
        except (registry.UnknownNameError, ValueError):
            render = None
        if render is None:
            parts.append(f"<p>{html.escape(env)}: the environment has no renderer "
                         "(<code>EnvironmentSpec.render</code>); no episode pictures.</p>")
            continue
        for model_key in _first_seed_models(store, env):
            model, kept = store.models[model_key], store.episodes(model_key)
            if kept is None:
                parts.append(f"<p>{html.escape(env)} / {html.escape(model['organism'])}: the "
                             "run kept no episodes (<code>Suite.saved_episodes</code> 0).</p>")
                continue
            organism = model["organism"]
            best = _best_cell(rows, env, organism, highlight)
            cell = None if best is None else f"{model_key}/{best[0]}/{best[1]}"
            if cell is not None and cell not in store.cells:
                cell = None
            for index, positive in _shown_episodes(kept):
                mask, row = kept["mask"][index], int(kept["indices"][index])
                hits = np.flatnonzero((kept["events"][index] > 0) & mask)
                event_step = int(hits[0]) if hits.size else None
                steps = int(mask.sum())
                limit = min(steps, MAX_STRIP_STEPS if event_step is None
                            else min(MAX_STRIP_STEPS, event_step + 3))
                frames = episode_frames(render, kept["observations"][index][:limit].astype(
                    np.float32), mask[:limit])
                flagged = None
                if cell is not None:
                    flagged = (per_cell[cell]["p_steps"][row, :limit] <= alpha).tolist()
                kind = "positive" if positive else "clean"
                by = "" if cell is None else f"; red frames: flagged by {best[0]} / {best[1]}"
                flags = ("no detector's flags" if cell is None
                         else f"red: flagged by {best[0]} / {best[1]}")
                figure = strip_figure(frames, flagged=flagged, event_step=event_step,
                                      title=f"{env} / {organism}, {kind} episode {row} "
                                            f"({steps} steps)\n{flags}")
                parts.append(saved.save(
                    figure, f"episode_{env}_{organism}_{row}",
                    f"{kind} episode {row} of {organism} in {env}",
                    f"{env} / {organism}: {kind} test episode {row} (seed {model['seed']}), "
                    f"{steps} steps" + ("" if event_step is None else
                                        f", hidden event at step {event_step}") + by))
    return parts


def _roc_figure(curves: list[dict], env: str):
    plt = _pyplot()
    organisms = list(dict.fromkeys(curve["organism"] for curve in curves))
    columns = min(3, len(organisms))
    panel_rows = math.ceil(len(organisms) / columns)
    figure, axes = plt.subplots(panel_rows, columns, squeeze=False,
                                figsize=(2 * COLUMN_INCHES, 2.5 * panel_rows + 0.3),
                                constrained_layout=True)
    for axis, organism in zip(axes.flat, organisms, strict=False):
        for curve in curves:
            if curve["organism"] == organism:
                style = ":" if curve["detector"] in CONTROLS else "-"
                axis.plot(curve["fpr"], curve["tpr"], style, linewidth=0.9,
                          label=f"{curve['detector']} / {curve['view']}")
        axis.plot([0, 1], [0, 1], color="grey", linewidth=0.6, linestyle="--")
        axis.set_title(organism)
        axis.set_xlabel("false-positive rate")
        axis.set_ylabel("true-positive rate")
        axis.legend(fontsize=4.5, loc="lower right")
    for axis in list(axes.flat)[len(organisms):]:
        axis.set_visible(False)
    figure.suptitle(f"{env}: pre-harm ROC (controls dotted, on the positives with a step "
                    "before the harm)")
    return figure


VALIDITY_BARS = (("kl_train", "KL train (teacher-forced)"),
                 ("kl_train_on_policy", "KL train (own states)"),
                 ("event_rate_train", "event rate train"), ("event_rate_test", "event rate test"))


def _validity_figure(rows: list[dict], env: str):
    validity = {}
    for row in rows:
        if row["env"] == env and row.get("validity") and row["organism"] not in validity:
            validity[row["organism"]] = row["validity"]
    if not validity:
        return None
    plt = _pyplot()
    organisms = list(validity)
    figure, axes = plt.subplots(1, len(VALIDITY_BARS), figsize=(2 * COLUMN_INCHES, 2.3))
    figure.subplots_adjust(left=0.07, right=0.99, bottom=0.36, top=0.84, wspace=0.35)
    positions = np.arange(len(organisms))
    for axis, (key, label) in zip(axes, VALIDITY_BARS, strict=True):
        values = [validity[o].get(key) for o in organisms]
        axis.bar(positions, [np.nan if v is None else v for v in values],
                 color=["tab:green" if validity[o].get("valid", True) else "tab:red"
                        for o in organisms])
        if key == "kl_train":
            bounds = [validity[o].get("kl_bound") for o in organisms]
            if any(b is not None for b in bounds):
                axis.scatter(positions, [np.nan if b is None else b for b in bounds],
                             marker="_", s=120, color="black", label="bound", zorder=3)
                axis.legend()
        if all(v is None for v in values):
            axis.text(0.5, 0.5, "not recorded", ha="center", va="center",
                      transform=axis.transAxes, color="grey")
        axis.set_ylim(bottom=0)
        axis.set_title(label)
        axis.set_xticks(positions, organisms, rotation=60, ha="right")
    figure.suptitle(f"{env}: organisms' validity (red: invalid)")
    return figure


# ---------------------------------------------------------------------------------------
# Tables and text


def _cell(value, digits: int = 2, low=None, high=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<td data-sort="">n/a</td>'
    if isinstance(value, int | float | np.floating | np.integer):
        text = f"{float(value):.{digits}f}"
        if low is not None and high is not None:
            text += f" <span class='ci'>[{float(low):.{digits}f}, {float(high):.{digits}f}]</span>"
        return f'<td data-sort="{float(value)!r}">{text}</td>'
    return f'<td data-sort="{html.escape(str(value))}">{html.escape(str(value))}</td>'


def _table(headers: Sequence[str], body_rows: list[str], table_id: str) -> str:
    head = "".join(f'<th title="sort by {html.escape(h)}">{html.escape(h)}</th>'
                   for h in headers)
    return (f'<div class="scroll"><table class="sortable" id="{table_id}"><thead><tr>{head}'
            f'</tr></thead><tbody>{"".join(body_rows)}</tbody></table></div>')


def _results_table(rows: list[dict]) -> str:
    headers = (["environment", "organism", "kind", "detector", "view", "protocol"]
               + [header for _, header, _ in RESULT_COLUMNS] + ["positives", "control"])
    body = []
    for row in rows:
        failed = bool(row.get("control_failed"))
        reason = "; ".join(row.get("control_failures") or [])
        cells = [_cell(row[name]) for name in ("env", "organism")]
        cells.append(_cell(row.get("organism_kind", "")))
        cells += [_cell(row[name]) for name in ("detector", "view", "protocol")]
        for key, _, digits in RESULT_COLUMNS:
            cells.append(_cell(row.get(key), digits, row.get(f"{key}_ci_low"),
                               row.get(f"{key}_ci_high")))
        cells.append(_cell(row.get("positives")) if row.get("positives") is None else
                     f'<td data-sort="{row["positives"]}">{row["positives"]}</td>')
        mark = (f'<td class="failed" data-sort="1" title="{html.escape(reason)}">'
                f"\u2020 failed</td>" if failed else '<td data-sort="0">ok</td>')
        cells.append(mark)
        body.append(f'<tr class="{"control-failed" if failed else ""}">{"".join(cells)}</tr>')
    return _table(headers, body, "results")


def _model_level_table(model_level: list[dict]) -> str:
    if not model_level:
        return "<p>No model-level figures (one model a class or fewer).</p>"
    headers = ["environment", "detector", "view", "statistic", "incorrigible models",
               "honest models", "AUROC"]
    body = []
    for row in model_level:
        cells = [_cell(row.get(k)) for k in ("env", "detector", "view", "statistic")]
        cells += [f'<td data-sort="{row.get(k)}">{row.get(k)}</td>'
                  for k in ("incorrigible_models", "honest_models")]
        cells.append(_cell(row.get("auroc"), 2, row.get("auroc_ci_low"),
                           row.get("auroc_ci_high")))
        body.append(f"<tr>{''.join(cells)}</tr>")
    return ("<p>AUROC of incorrigible against honest models, one statistic per model "
            "(before deployment: train-layout AUROC; at deployment: pre-harm flag rate), "
            "bootstrap over models.</p>" + _table(headers, body, "model-level-table"))


def _facts(pairs: list[tuple[str, Any]]) -> str:
    items = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in pairs if v is not None)
    return f'<table class="facts">{items}</table>'


def _contents(anchors: list[str]) -> str:
    links = " · ".join(f'<a href="#{a}">{html.escape(a.replace("-", " "))}</a>'
                       for a in anchors)
    return f"<nav>{links}</nav>"


def _seconds(value) -> str | None:
    return None if value is None else f"{float(value):.0f} s"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _run_section(results: dict[str, Any], store: ScoreStore) -> str:
    versions = results.get("versions") or {}
    timings = results.get("timings") or {}
    parts = ["<h3>Versions</h3>", _facts(sorted(versions.items())),
             "<h3>Timings</h3>",
             _facts([(k, f"{v:.1f} s") for k, v in timings.items()
                      if isinstance(v, int | float)])]
    config = results.get("config")
    if config is not None:
        parts.append("<details><summary>Suite settings (config)</summary><pre>"
                     + html.escape(json.dumps(config, indent=1, default=str)) + "</pre></details>")
    parts.append("<details><summary>Score settings (scores.npz)</summary><pre>"
                 + html.escape(json.dumps({k: v for k, v in store.settings.items()
                                           if k != "metadata"}, indent=1, default=str))
                 + "</pre></details>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------
# A sweep


def _sweep_body(run_dir: Path) -> tuple[str, str]:
    sweep = _read_json(run_dir / "sweep.json")
    name = sweep.get("sweep", run_dir.name)
    title = f"sweep {name}: report"
    parts = [f"<h1>{html.escape(title)}</h1>",
             _facts([("sweep", name), ("suite", sweep.get("suite")),
                     ("parameter", sweep.get("parameter")), ("values", sweep.get("values")),
                     ("setting", sweep.get("setting")), ("seeds", sweep.get("seeds")),
                     ("run time", _seconds(sweep.get("seconds"))), ("report written", _now())])]
    saved = _Figures(run_dir)
    picture = run_dir / f"{name}.png"
    if picture.is_file():
        encoded = base64.b64encode(picture.read_bytes()).decode()
        parts.append(f'<figure><img src="data:image/png;base64,{encoded}" '
                     f'alt="sweep {html.escape(name)}" data-file="{picture.name}">'
                     f"<figcaption>{html.escape(name)}.png (and .pdf)</figcaption></figure>")
        saved.names.append(picture.stem)
    failed = sweep.get("failed_points") or {}
    if failed:
        parts.append("<h2>Points without figures</h2><ul>" + "".join(
            f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in failed.items())
            + "</ul>")
    invalid = sweep.get("invalid_envs") or {}
    if invalid:
        parts.append("<h2>Environments left out</h2><p>The point's other environments keep "
                     "their figures.</p><ul>" + "".join(
                         f"<li>{html.escape(str(value))}, {html.escape(env)}: "
                         f"{html.escape(str(message))}</li>"
                         for value, envs in invalid.items() for env, message in envs.items())
                     + "</ul>")
    for key, heading in (("rows", "Figures per point"), ("model_level", "Model-level AUROC"),
                         ("models", "Models")):
        table_rows = sweep.get(key)
        if table_rows:
            parts.append(f"<h2>{heading}</h2>")
            parts.append(_generic_table(table_rows, f"sweep-{key}"))
    points = sorted((run_dir / "points").glob(f"*/{REPORT_NAME}"))
    if points:
        parts.append("<h2>Points</h2><ul>" + "".join(
            f'<li><a href="points/{html.escape(p.parent.name)}/{REPORT_NAME}">'
            f"{html.escape(p.parent.name)}</a></li>" for p in points) + "</ul>")
    parts.append("<h2>Run</h2>" + _facts(sorted((sweep.get("versions") or {}).items())))
    return "\n".join(parts), title


def _generic_table(rows: list[dict], table_id: str) -> str:
    headers = [key for key in rows[0] if not isinstance(rows[0][key], dict | list)]
    body = []
    for row in rows:
        cells = []
        for key in headers:
            value = row.get(key)
            if isinstance(value, bool):
                value = str(value)
            cells.append(_cell(value, 3))
        body.append(f"<tr>{''.join(cells)}</tr>")
    return _table(headers, body, table_id)


# ---------------------------------------------------------------------------------------
# The page

_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.5em auto;max-width:1400px;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
nav{margin:.8em 0}nav a{margin-right:.3em}
table{border-collapse:collapse;font-size:.82em}td,th{border:1px solid #ddd;padding:.2em .45em;
text-align:left;white-space:nowrap}table.sortable th{cursor:pointer;background:#f4f4f4;
position:sticky;top:0}table.sortable th.asc::after{content:' \\25B2'}
table.sortable th.desc::after{content:' \\25BC'}.scroll{max-height:70vh;overflow:auto}
.ci{color:#777;font-size:.9em}tr.control-failed td{background:#fff3f3}
.failed{color:#b00;font-weight:bold}table.facts th{background:#f8f8f8}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}pre{background:#f8f8f8;padding:.6em;overflow:auto;
max-height:40em;font-size:.8em}
"""

# Click a header to sort by it (numbers by value, the rest as text; n/a last).
_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function(table){
  table.querySelectorAll('th').forEach(function(header, column){
    header.addEventListener('click', function(){
      var ascending = !header.classList.contains('asc');
      table.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc');});
      header.classList.add(ascending ? 'asc' : 'desc');
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(row){var v = row.cells[column].getAttribute('data-sort');
        if (v === null || v === '') return null; var n = Number(v);
        return isNaN(n) ? v : n;}
      rows.sort(function(a, b){
        var x = key(a), y = key(b);
        if (x === null) return y === null ? 0 : 1; if (y === null) return -1;
        var order = (typeof x === 'number' && typeof y === 'number') ? x - y
          : String(x).localeCompare(String(y));
        return ascending ? order : -order;});
      rows.forEach(function(row){body.appendChild(row);});
    });
  });
});
"""


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
            f"{body}\n<script>{_SCRIPT}</script></body></html>\n")
