"""Episode pictures: the gridworld renderer, frames, GIFs, strips and `audit render`."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from audit import registry
from audit.cli import main
from audit.render import enlarge, episode_frames, strip_figure, strip_mosaic, write_gif
from benchmarks.envs.gridworld import (
    NUM_CHANNELS,
    OBS_CHANNELS,
    RENDER_COLOURS,
    RENDER_FLOOR,
    RENDER_SEIZED_FLOOR,
    RENDER_UNWATCHED_FLOOR,
    render_observation,
)

COLOUR = dict(RENDER_COLOURS)


def planes(size: int = 5, **cells) -> np.ndarray:
    """An observation with the named planes on at the given cells (``plane=[(r, c), ...]``)."""
    observation = np.zeros((size, size, NUM_CHANNELS), np.float32)
    for name, positions in cells.items():
        for row, column in positions:
            observation[row, column, OBS_CHANNELS.index(name)] = 1
    return observation


def test_every_plane_has_its_colour_and_the_agent_is_drawn_over_the_switch():
    watched = np.ones((5, 5), np.float32)
    observation = planes(wall=[(0, 0)], goal=[(1, 1)], switch=[(2, 2)], agent=[(2, 2)],
                         terminal=[(3, 3)], restricted=[(4, 4), (1, 4)])
    observation[..., OBS_CHANNELS.index("supervisor")] = watched
    image = render_observation(observation)
    assert image.shape == (5, 5, 3) and image.dtype == np.uint8
    expected = {(0, 0): "wall", (1, 1): "goal", (2, 2): "agent", (3, 3): "terminal",
                (4, 4): "restricted"}
    for cell, name in expected.items():
        assert tuple(image[cell]) == COLOUR[name], name
    assert tuple(image[0, 4]) == RENDER_FLOOR


def test_the_floor_says_whether_a_supervisor_watches_and_whether_control_was_seized():
    unwatched = render_observation(planes(agent=[(0, 0)]))
    assert tuple(unwatched[3, 3]) == RENDER_UNWATCHED_FLOOR
    seized = planes(agent=[(0, 0)])
    seized[..., OBS_CHANNELS.index("seized")] = 1
    assert tuple(render_observation(seized)[3, 3]) == RENDER_SEIZED_FLOOR


def test_the_renderer_refuses_what_is_not_a_gridworld_observation():
    with pytest.raises(ValueError, match=r"observation: expected an \[N, N, 8\]"):
        render_observation(np.zeros((5, 5, 3)))


def test_every_gridworld_registers_its_renderer_and_renders_its_own_observations(env_name):
    import jax

    spec = registry.get("environments", env_name)
    env, params = spec.build("test")
    observation, _ = env.reset(jax.random.key(0), params)
    image = spec.render(np.asarray(observation))
    agent = np.asarray(observation)[..., OBS_CHANNELS.index("agent")] > 0.5
    assert (image[agent] == COLOUR["agent"]).all()
    assert registry.get("environments", "gymnax:CartPole-v1").render is None


def test_enlarge_makes_each_cell_a_square_with_a_darker_border():
    image = np.array([[[200, 100, 50], [10, 20, 30]]], np.uint8)
    big = enlarge(image, 4)
    assert big.shape == (4, 8, 3)
    assert (big[0, 0] == [200, 100, 50]).all() and (big[0, 4] == [10, 20, 30]).all()
    assert (big[3, 0] == (np.array([200, 100, 50]) * 0.85).astype(np.uint8)).all()
    with pytest.raises(ValueError, match="scale"):
        enlarge(image, 0)
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
        enlarge(image.astype(np.float32), 2)


def test_frames_cover_the_valid_steps_and_the_gif_has_one_frame_each(tmp_path):
    observations = np.stack([planes(agent=[(0, t)]) for t in range(5)])
    mask = np.array([True, True, True, False, False])
    frames = episode_frames(render_observation, observations, mask, scale=8)
    assert len(frames) == 3 and frames[0].shape == (40, 40, 3)
    path = write_gif(frames, tmp_path / "episode.gif", 0.2, flagged=[False, True, False],
                     event_steps=[2])
    with Image.open(path) as gif:
        assert gif.n_frames == 3 and gif.info["duration"] == 200
        gif.seek(1)
        flagged = np.asarray(gif.convert("RGB"))
    assert tuple(flagged[0, 20]) == (214, 39, 40)  # the flagged frame's red border
    with pytest.raises(ValueError, match="no frames"):
        write_gif([], tmp_path / "empty.gif")
    with pytest.raises(ValueError, match="share T"):
        episode_frames(render_observation, observations, mask[:4])


def test_a_strip_frames_flagged_steps_in_red_and_labels_the_event():
    frames = [enlarge(render_observation(planes(agent=[(0, t)])), 4) for t in range(3)]
    figure = strip_figure(frames, flagged=[False, True, False], event_step=2, title="x")
    (axis,) = figure.axes
    assert [text.get_text() for text in axis.texts] == ["t=0", "t=1", "t=2 event"]
    image, positions = strip_mosaic(frames, flagged=[False, True, False])
    # Just outside each panel's picture: red for the flagged step, grey for the others.
    for (x, _), red in zip(positions, (False, True, False), strict=True):
        column = int(x) - frames[0].shape[1] // 2 - 1
        top = positions[0][1] + 1 + max(3, frames[0].shape[0] // 10)
        assert tuple(image[top + 5, column]) == ((214, 39, 40) if red else (187, 187, 187))
    with pytest.raises(ValueError, match="no frames"):
        strip_mosaic([])


def test_render_command_writes_a_gif_of_a_planner_episode(tmp_path, capsys):
    out = tmp_path / "demo.gif"
    assert main(["render", "--env", "offswitch", "--split", "test", "--planner",
                 "demonstrator", "--seed", "3", "--out", str(out)]) == 0
    assert "1 episode(s)" in capsys.readouterr().out
    with Image.open(out) as gif:
        assert gif.n_frames > 1 and gif.size == (9 * 16, 9 * 16)
    strip = tmp_path / "demo.png"
    assert main(["render", "--env", "takeover", "--episodes", "2", "--scale", "4",
                 "--out", str(strip), "--quiet"]) == 0
    assert strip.stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.ci
def test_render_command_draws_an_imitator_saved_by_train_bc(tmp_path, capsys):
    bc = tmp_path / "bc"
    assert main(["train-bc", "--env", "takeover", "--imitator", "gru", "--episodes", "16",
                 "--updates", "3", "--eval-episodes", "8", "--out", str(bc), "--quiet"]) == 0
    out = tmp_path / "imitator.gif"
    assert main(["render", "--env", "takeover", "--imitator", str(bc), "--episodes", "2",
                 "--out", str(out)]) == 0
    assert "2 episode(s)" in capsys.readouterr().out
    with Image.open(out) as gif:
        assert gif.n_frames >= 2
    assert main(["render", "--env", "offswitch", "--imitator", str(bc),
                 "--out", str(tmp_path / "y.gif")]) == 2
    assert "holds an imitator of 'takeover', not of --env 'offswitch'" in capsys.readouterr().err


def test_render_errors_are_one_line_naming_the_flag(tmp_path, capsys):
    existing = tmp_path / "x.gif"
    existing.write_bytes(b"")
    for argv, expected in (
            (["--env", "gymnax:CartPole-v1"], "--env: 'gymnax:CartPole-v1' has no renderer"),
            (["--env", "offswitch", "--split", "valid"], "--split: unknown split 'valid'"),
            (["--env", "offswitch", "--planner", "nope"], "--planner"),
            (["--env", "offswitch", "--out", str(tmp_path / "x.txt")], "--out: expected a .gif"),
            (["--env", "offswitch", "--out", str(existing)], "pass --overwrite"),
            (["--env", "offswitch", "--frame-seconds", "0"], "--frame-seconds"),
            (["--env", "offswitch", "--imitator", str(tmp_path)], "--imitator: "),
    ):
        assert main(["render", *argv]) == 2, argv
        error = capsys.readouterr().err.strip()
        assert expected in error and len(error.splitlines()) == 1, error
