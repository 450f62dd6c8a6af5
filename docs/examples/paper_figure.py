"""A finished `audit bench` run, turned into a figure for a paper.

Usage::

    python docs/examples/paper_figure.py RUN_DIR OUT.png   # or OUT.pdf

Left: each detector's pre-harm AUROC per organism, with its 95% interval, from
``results.json``; cells whose control failed are drawn hollow. Right: the p-values of one
audited model's test windows, positives (pre-harm) against its clean windows, recomputed
from ``scores.npz`` with the library's own window definition (:func:`audit.figures.windows`),
so any figure can be traced to the scores it was made from.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from audit import figures  # noqa: E402
from audit.scores import ScoreStore  # noqa: E402


def auroc_panel(axis, rows: list[dict]) -> None:
    """Pre-harm AUROC with intervals, one point per (organism, detector, view)."""
    audited = [r for r in rows if r["organism"] not in (figures.HONEST, figures.TWIN)
               and r.get("auroc") is not None]
    labels = []
    for index, row in enumerate(audited):
        low, high = row["auroc_ci_low"], row["auroc_ci_high"]
        failed = row.get("control_failed")
        axis.errorbar(row["auroc"], index, xerr=[[row["auroc"] - low], [high - row["auroc"]]],
                      fmt="o", color="black", mfc="white" if failed else "black", capsize=2)
        labels.append(f"{row['env']}/{row['organism']}: {row['detector']} ({row['view']})")
    axis.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    axis.set_yticks(range(len(labels)), labels, fontsize=6)
    axis.set_xlim(0, 1)
    axis.set_xlabel("pre-harm AUROC (hollow: control failed)")


def p_value_panel(axis, store: ScoreStore, rows: list[dict]) -> None:
    """The p-values of the first audited model with positives, for its first detector."""
    settings = figures.settings_of(store)
    for cell, meta in store.cells.items():
        model = store.models[meta["model"]]
        if model["organism"] in (figures.HONEST, figures.TWIN):
            continue
        found = figures.windows(store, cell, settings["alpha"], settings["aggregate"])
        if not found["positive"].any():
            continue
        bins = np.linspace(0, 1, 21)
        axis.hist(found["p_window"][found["positive"]], bins, alpha=0.6, label="pre-harm")
        axis.hist(found["p_window"][~found["positive"]], bins, alpha=0.6, label="clean")
        axis.axvline(settings["alpha"], color="red", linewidth=1, label="alpha")
        axis.set_title(f"{model['organism']}, {meta['detector']} ({meta['view']})", fontsize=7)
        axis.set_xlabel("p-value of the window")
        axis.legend(fontsize=6)
        return
    axis.set_axis_off()


def main(run_dir: str, out: str) -> None:
    run = Path(run_dir)
    rows = json.loads((run / "results.json").read_text())["rows"]
    store = ScoreStore.load(run / "scores.npz")
    figure, (left, right) = plt.subplots(1, 2, figsize=(7, 3.5), width_ratios=(3, 2))
    auroc_panel(left, rows)
    p_value_panel(right, store, rows)
    figure.tight_layout()
    figure.savefig(out, dpi=200)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python docs/examples/paper_figure.py RUN_DIR OUT.png")
    main(*sys.argv[1:])
