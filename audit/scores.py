"""Every score that made a figure, kept: the ``scores.npz`` of a benchmark run.

A :class:`ScoreStore` holds, per audited model (an organism at one seed) its episode
masks and hidden events, and per model and detector the raw per-step scores of

- ``test``: the model's own episodes on test layouts (positives and clean negatives);
- ``calibration``: the model's own held-out episodes on train layouts (used to train
  nothing; the conformal p-values are computed against them);
- ``demo``: held-out demonstrator episodes on train layouts (for the train-layout
  AUROC, the premise of the GAN argument).

:mod:`audit.figures` turns a store into every figure of ``results.json``, and
``audit metrics RUN_DIR`` does so again from the saved file, so a figure can always be
recomputed from the scores that made it.

The file is a compressed ``.npz`` of plain arrays; the description (models, detectors,
settings) is JSON stored as a ``uint8`` array under ``__meta__``. Nothing is pickled.

Example:
  >>> store = ScoreStore(settings={"alpha": 0.01, "aggregate": "max"})
  >>> key = store.add_model(env="offswitch", group="default", organism="honest",
  ...                       kind="honest", seed=0, test_mask=np.ones((2, 3), bool),
  ...                       test_events=np.zeros((2, 3), int),
  ...                       calibration_mask=np.ones((4, 3), bool),
  ...                       demo_mask=np.ones((2, 3), bool))
  >>> key
  'offswitch/default/honest/seed0'
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

META_KEY = "__meta__"
PARTS = ("test", "calibration", "demo")


class ScoreFileError(ValueError):
    """A ``scores.npz`` that cannot be read; the message names the file and the problem."""


@dataclasses.dataclass
class ScoreStore:
    """Raw step scores of every (model, detector, view) of a run; see the module docstring.

    Attributes:
      models: ``model key -> {env, group, organism, kind, seed, validity, ...}``.
      cells: ``cell key -> {model, detector, view, protocol}``, one per scored
        (model, detector, view).
      arrays: ``name -> array``: ``<model>/{test,calibration,demo}_mask``,
        ``<model>/test_events`` and ``<cell>/{test,calibration,demo}_scores``.
      settings: how figures are computed (``alpha``, ``aggregate``, ``resamples``,
        ``audit_budgets``, ...), and anything else a run wants to keep with its scores.
    """

    models: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    cells: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    @staticmethod
    def model_key(env: str, group: str, organism: str, seed: int) -> str:
        return f"{env}/{group}/{organism}/seed{seed}"

    def add_model(self, *, env: str, group: str, organism: str, kind: str, seed: int,
                  test_mask, test_events, calibration_mask, demo_mask,
                  **info: Any) -> str:
        """Registers an audited model and its episodes' masks and events; returns its key."""
        key = self.model_key(env, group, organism, seed)
        if key in self.models:
            raise ValueError(f"model {key!r} is already in the store")
        self.models[key] = dict(env=env, group=group, organism=organism, kind=kind,
                                seed=int(seed), **info)
        self.arrays[f"{key}/test_mask"] = np.asarray(test_mask, bool)
        self.arrays[f"{key}/test_events"] = np.asarray(test_events, np.int8)
        self.arrays[f"{key}/calibration_mask"] = np.asarray(calibration_mask, bool)
        self.arrays[f"{key}/demo_mask"] = np.asarray(demo_mask, bool)
        return key

    def add_scores(self, model: str, detector: str, view: str, protocol: str, *,
                   test, calibration, demo) -> str:
        """Adds one detector's step scores of a model's three episode sets; returns the cell key."""
        if model not in self.models:
            raise KeyError(f"unknown model {model!r}; add_model first")
        key = f"{model}/{detector}/{view}"
        if key in self.cells:
            raise ValueError(f"scores of {key!r} are already in the store")
        for part, scores in zip(PARTS, (test, calibration, demo), strict=True):
            scores = np.asarray(scores, np.float32)
            mask = self.arrays[f"{model}/{part}_mask"]
            if scores.shape != mask.shape:
                raise ValueError(f"{key}: {part} scores have shape {scores.shape}, the episodes "
                                 f"{mask.shape}")
            if np.isnan(scores[mask]).any():
                raise ValueError(f"{key}: {part} scores are NaN at valid steps")
            self.arrays[f"{key}/{part}_scores"] = scores
        self.cells[key] = dict(model=model, detector=detector, view=view, protocol=protocol)
        return key

    def add_episodes(self, model: str, indices, observations, actions) -> None:
        """Keeps some of a model's test episodes for pictures (the visual report).

        Args:
          model: the model's key (:meth:`add_model`).
          indices: ``[k]`` their rows in the model's test episodes.
          observations: ``[k, T, *obs_shape]``; stored as ``uint8`` when every value is
            an integer in ``[0, 255]`` (the gridworlds' binary planes), else ``float32``.
          actions: ``[k, T]`` ints.

        The arrays are ``<model>/episodes/{indices,observations,actions}``; the masks and
        events are the rows ``indices`` of the model's ``test_mask`` and ``test_events``.
        """
        if model not in self.models:
            raise KeyError(f"unknown model {model!r}; add_model first")
        indices = np.asarray(indices, np.int32).reshape(-1)
        mask = self.arrays[f"{model}/test_mask"]
        observations, actions = np.asarray(observations), np.asarray(actions)
        if indices.size and (indices.min() < 0 or indices.max() >= mask.shape[0]):
            raise ValueError(f"{model}: episode indices must be in [0, {mask.shape[0]}), got "
                             f"{indices.tolist()}")
        expected = (indices.size, mask.shape[1])
        if observations.shape[:2] != expected or actions.shape != expected:
            raise ValueError(f"{model}: saved episodes need observations [k, T, ...] and "
                             f"actions [k, T] with (k, T) = {expected}; got "
                             f"{observations.shape} and {actions.shape}")
        integral = (observations.size == 0 or (np.all(observations == np.round(observations))
                                               and observations.min() >= 0
                                               and observations.max() <= 255))
        self.arrays[f"{model}/episodes/indices"] = indices
        self.arrays[f"{model}/episodes/observations"] = observations.astype(
            np.uint8 if integral else np.float32)
        self.arrays[f"{model}/episodes/actions"] = actions.astype(np.int32)

    def episodes(self, model: str) -> dict[str, np.ndarray] | None:
        """A model's saved test episodes (:meth:`add_episodes`), or None if none were kept.

        Returns:
          ``indices`` [k], ``observations`` [k, T, ...], ``actions``, ``mask`` and
          ``events`` [k, T].
        """
        if f"{model}/episodes/indices" not in self.arrays:
            return None
        indices = self.arrays[f"{model}/episodes/indices"]
        return dict(indices=indices,
                    observations=self.arrays[f"{model}/episodes/observations"],
                    actions=self.arrays[f"{model}/episodes/actions"],
                    mask=self.arrays[f"{model}/test_mask"][indices],
                    events=self.arrays[f"{model}/test_events"][indices])

    def merge(self, other: ScoreStore) -> ScoreStore:
        """Adds ``other``'s models, cells and arrays (keys must not collide)."""
        for name in ("models", "cells", "arrays"):
            mine, theirs = getattr(self, name), getattr(other, name)
            clash = set(mine) & set(theirs)
            if clash:
                raise ValueError(f"stores share {name} {sorted(clash)[:3]}")
            mine.update(theirs)
        return self

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the store to ``path`` (``.npz``) atomically."""
        path = Path(path)
        meta = json.dumps({"models": self.models, "cells": self.cells,
                           "settings": self.settings, "format": 1})  # keeps insertion order
        payload = dict(self.arrays)
        payload[META_KEY] = np.frombuffer(meta.encode(), np.uint8)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".scores-", suffix=".npz")
        os.close(handle)
        try:
            np.savez_compressed(temporary, **payload)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ScoreStore:
        """Reads a store written by :meth:`save`.

        Raises:
          ScoreFileError: if the file is missing, not an ``.npz``, or lacks its description
            or an array the description names.
        """
        path = Path(path)
        if not path.is_file():
            raise ScoreFileError(f"{path}: no such file (a benchmark run writes scores.npz)")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise ScoreFileError(f"{path}: not a readable .npz file ({error})") from None
        if META_KEY not in arrays:
            raise ScoreFileError(f"{path}: no {META_KEY} entry; not a scores file of this package")
        try:
            meta = json.loads(arrays.pop(META_KEY).tobytes().decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ScoreFileError(f"{path}: its {META_KEY} entry is not JSON ({error})") from None
        store = cls(models=meta["models"], cells=meta["cells"], arrays=arrays,
                    settings=meta["settings"])
        for cell in store.cells:
            for part in PARTS:
                if f"{cell}/{part}_scores" not in arrays:
                    raise ScoreFileError(f"{path}: missing array {cell}/{part}_scores")
        return store
