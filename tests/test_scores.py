"""scores.npz: every score that made a figure, kept without pickle and read back exactly."""

from __future__ import annotations

import numpy as np
import pytest

from audit.scores import ScoreFileError, ScoreStore


def _store() -> ScoreStore:
    store = ScoreStore(settings={"alpha": 0.01, "aggregate": "max", "note": "kept"})
    model = store.add_model(env="e", group="default", organism="o", kind="trained-in", seed=3,
                            test_mask=np.array([[True, False]]), test_events=np.array([[0, 0]]),
                            calibration_mask=np.ones((2, 2), bool), demo_mask=np.ones((1, 2), bool),
                            validity={"kl_train": 0.01})
    store.add_scores(model, "d", "actions", "demonstrations-only",
                     test=[[1.0, np.nan]], calibration=[[0.0, 1.0], [2.0, 3.0]], demo=[[4.0, 5.0]])
    return store


def test_a_store_round_trips_exactly_and_in_order(tmp_path):
    store = _store()
    path = store.save(tmp_path / "scores.npz")
    loaded = ScoreStore.load(path)
    assert loaded.models == store.models and loaded.cells == store.cells
    assert loaded.settings == store.settings
    assert list(loaded.arrays) == list(store.arrays)
    for name, array in store.arrays.items():
        np.testing.assert_array_equal(loaded.arrays[name], array)
        assert loaded.arrays[name].dtype == array.dtype
    assert not list(tmp_path.glob(".scores-*"))  # the temporary file was renamed


def test_scores_are_checked_when_added():
    store = _store()
    model = "e/default/o/seed3"
    with pytest.raises(ValueError, match="already in the store"):
        store.add_scores(model, "d", "actions", "demonstrations-only", test=[[0, 0]],
                         calibration=np.zeros((2, 2)), demo=np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"test scores have shape \(2,\), the episodes \(1, 2\)"):
        store.add_scores(model, "d2", "actions", "demonstrations-only", test=[0, 0],
                         calibration=np.zeros((2, 2)), demo=np.zeros((1, 2)))
    with pytest.raises(ValueError, match="NaN at valid steps"):
        store.add_scores(model, "d3", "actions", "demonstrations-only", test=[[np.nan, 0]],
                         calibration=np.zeros((2, 2)), demo=np.zeros((1, 2)))
    with pytest.raises(KeyError, match="unknown model"):
        store.add_scores("nobody", "d", "actions", "demonstrations-only", test=[[0, 0]],
                         calibration=np.zeros((2, 2)), demo=np.zeros((1, 2)))


def test_unreadable_files_are_refused_naming_the_file(tmp_path):
    with pytest.raises(ScoreFileError, match="no such file"):
        ScoreStore.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ScoreFileError, match="junk.npz: not a readable .npz"):
        ScoreStore.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "plain.npz", a=np.zeros(2))
    with pytest.raises(ScoreFileError, match="no __meta__ entry"):
        ScoreStore.load(tmp_path / "plain.npz")
    store = _store()
    del store.arrays["e/default/o/seed3/d/actions/demo_scores"]
    store.save(tmp_path / "partial.npz")
    with pytest.raises(ScoreFileError, match="missing array .*demo_scores"):
        ScoreStore.load(tmp_path / "partial.npz")
