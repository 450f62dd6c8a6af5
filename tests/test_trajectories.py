"""Saving, loading and validating Trajectories."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from audit.trajectories import (
    Trajectories,
    concatenate,
    load_npz,
    save_npz,
    summary_statistics,
    validate,
)


def make(batch=3, steps=5, activations=None) -> Trajectories:
    mask = np.ones((batch, steps), bool)
    mask[0, 3:] = False
    dones = np.zeros((batch, steps), bool)
    dones[0, 2] = True
    dones[1:, -1] = True
    events = np.zeros((batch, steps), np.int32)
    events[1, 1] = 2
    events[0, 4] = 1  # in padding: must not count
    return Trajectories(
        observations=jnp.zeros((batch, steps, 4, 4, 2)),
        actions=jnp.zeros((batch, steps), jnp.int32),
        rewards=jnp.ones((batch, steps)),
        dones=jnp.asarray(dones),
        mask=jnp.asarray(mask),
        events=jnp.asarray(events),
        noise=jnp.full((batch, steps), 0.5),
        action_probs=jnp.full((batch, steps, 6), 1 / 6),
        activations=activations or {},
    )


def test_round_trip_through_npz_keeps_every_field(tmp_path):
    original = make(activations={"layer/h": jnp.arange(30.0).reshape(3, 5, 2)})
    loaded = load_npz(save_npz(original, tmp_path / "t.npz"))
    for field in ("observations", "actions", "rewards", "dones", "mask", "events", "noise",
                  "action_probs"):
        np.testing.assert_array_equal(getattr(original, field), getattr(loaded, field))
    np.testing.assert_array_equal(loaded.activations["layer/h"],
                                  original.activations["layer/h"])
    assert loaded.reference_probs is None
    reference = jnp.full((3, 5, 6), 0.5).at[..., 2:].set(0.0)
    loaded = load_npz(save_npz(original.replace(reference_probs=reference), tmp_path / "r.npz"))
    np.testing.assert_array_equal(loaded.reference_probs, reference)


def test_summary_counts_only_valid_steps():
    summary = summary_statistics(make(), ("none", "disable_switch", "seize_control"))
    assert summary["episodes"] == 3
    assert summary["event_rate"] == pytest.approx(1 / 3)
    assert summary["event_counts"] == {"disable_switch": 0, "seize_control": 1}
    assert summary["length_mean"] == pytest.approx((3 + 5 + 5) / 3)
    assert summary["return_mean"] == pytest.approx((3 + 5 + 5) / 3)


def test_mismatched_time_axes_are_reported_with_names_and_shapes():
    bad = make().replace(noise=jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"noise has shape \(3, 4\).*\[3, 5\]"):
        validate(bad)
    bad = make().replace(reference_probs=jnp.zeros((3, 5, 4)))
    with pytest.raises(ValueError, match=r"reference_probs has shape \(3, 5, 4\)"):
        validate(bad)
    bad = make(activations={"h": jnp.zeros((3, 6, 2))})
    with pytest.raises(ValueError, match=r"activations/h has shape \(3, 6, 2\)"):
        validate(bad)


def test_loading_a_missing_or_foreign_file_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trajectories file"):
        load_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="missing observations"):
        load_npz(tmp_path / "other.npz")


def test_concatenate_stacks_episodes_and_keeps_what_both_carry():
    from test_detectors import make_trajectories

    first = make_trajectories(np.zeros((2, 3), int), seed=1).replace(
        activations={"a": jnp.zeros((2, 3, 1)), "b": jnp.zeros((2, 3, 2))})
    second = make_trajectories(np.ones((1, 3), int), seed=2).replace(
        activations={"a": jnp.ones((1, 3, 1))}, reference_probs=jnp.ones((1, 3, 3)) / 3)
    joined = concatenate(first, second)
    np.testing.assert_array_equal(joined.actions, [[0] * 3, [0] * 3, [1] * 3])
    np.testing.assert_array_equal(joined.observations[2], second.observations[0])
    assert set(joined.activations) == {"a"}
    np.testing.assert_array_equal(joined.activations["a"][:, 0, 0], [0, 0, 1])
    assert joined.reference_probs is None  # only the second set has it
    both = concatenate(second, second)
    assert both.reference_probs.shape == (2, 3, 3)
    validate(joined)
