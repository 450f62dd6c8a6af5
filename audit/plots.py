"""Figures written next to results (matplotlib, no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# (panel title, [(key, source)]); source: per-iteration "metrics" or "evaluations"
TRAINING_PANELS = (
    ("discriminator loss", [("discriminator_loss", "metrics")]),
    ("discriminator accuracy", [("discriminator_accuracy_demonstrator", "metrics"),
                                ("discriminator_accuracy_imitator", "metrics")]),
    ("held-out AUROC (episodes)", [("heldout_auroc", "metrics")]),
    ("imitator return", [("imitator_return", "metrics"), ("return_test", "evaluations")]),
    ("KL(demonstrator || imitator), train", [("kl_train", "evaluations")]),
    ("incorrigible-event rate", [("imitator_event_rate", "metrics"),
                                 ("event_rate_test", "evaluations")]),
)

def training_curves(metrics: dict, evaluations: dict, path: str | os.PathLike,
                    title: str = "") -> Path:
    """Plots adversarial-training curves to the PNG ``path``; returns the path.

    Args:
      metrics: ``{name: [iterations]}`` per-iteration figures (see :mod:`audit.gan`).
      evaluations: ``{name: [points]}`` with ``iteration`` giving each point's x.
      path: the output file.
      title: the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(13, 6.5), constrained_layout=True)
    for axis, (panel, curves) in zip(axes.flat, TRAINING_PANELS, strict=True):
        for key, source in curves:
            if source == "metrics":
                values = np.asarray(metrics[key], np.float64)
                x = np.arange(1, values.size + 1)
            else:
                values = np.asarray(evaluations[key], np.float64)
                x = np.asarray(evaluations["iteration"])
            if np.all(np.isnan(values)):
                continue
            axis.plot(x, values, marker="o" if source == "evaluations" else None,
                      markersize=3, label=key)
        axis.set_title(panel)
        axis.set_xlabel("iteration")
        if len(curves) > 1:
            axis.legend(fontsize=7)
    figure.suptitle(title)
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
