"""Figures written next to results (matplotlib, no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
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
                    title: str = "", views: Sequence[str] | None = None) -> Path:
    """Plots adversarial-training curves to the PNG ``path``; returns the path.

    Args:
      metrics: ``{name: [iterations]}`` per-iteration figures (see :mod:`audit.gan`); a
        per-discriminator figure of a multi-view run is ``[iterations, views]`` and is
        drawn as one line per view.
      evaluations: ``{name: [points]}`` with ``iteration`` giving each point's x.
      path: the output file.
      title: the figure's title.
      views: the views' names, labelling the lines of ``[iterations, views]`` figures
        (default: ``view 0``, ``view 1``, ...).

    Returns:
      ``path``, as a :class:`~pathlib.Path`.

    Raises:
      ValueError: if a figure is not ``[iterations]`` or ``[iterations, views]``, or
        ``views`` does not name every column.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(13, 6.5), constrained_layout=True)
    for axis, (panel, curves) in zip(axes.flat, TRAINING_PANELS, strict=True):
        lines = 0
        for key, source in curves:
            if source == "metrics":
                values = np.asarray(metrics[key], np.float64)
                x = np.arange(1, len(values) + 1)
            else:
                values = np.asarray(evaluations[key], np.float64)
                x = np.asarray(evaluations["iteration"])
            for label, column in _columns(key, values, views):
                if np.all(np.isnan(column)):
                    continue
                axis.plot(x, column, marker="o" if source == "evaluations" else None,
                          markersize=3, label=label)
                lines += 1
        axis.set_title(panel)
        axis.set_xlabel("iteration")
        if lines > 1:
            axis.legend(fontsize=7)
    figure.suptitle(title)
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _columns(key: str, values: np.ndarray, views: Sequence[str] | None
             ) -> list[tuple[str, np.ndarray]]:
    """``[(label, [points])]``: one curve of a ``[points]`` figure, one per view of a
    ``[points, views]`` figure."""
    if values.ndim == 1:
        return [(key, values)]
    if values.ndim != 2:
        raise ValueError(f"figure {key!r} must be [iterations] or [iterations, views]; got "
                         f"shape {values.shape}")
    names = list(views) if views is not None else [f"view {i}" for i in range(values.shape[1])]
    if len(names) != values.shape[1]:
        raise ValueError(f"figure {key!r} has {values.shape[1]} views but views names "
                         f"{len(names)}: {names}")
    return [(f"{key} ({name})", values[:, i]) for i, name in enumerate(names)]
