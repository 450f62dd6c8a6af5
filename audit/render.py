"""Episodes as pictures: frames, animated GIFs and annotated strips.

An environment that can be drawn has an ``EnvironmentSpec.render`` (one observation ->
an ``[H, W, 3]`` ``uint8`` image, a pixel per cell). This module turns an episode's
observations into enlarged frames, writes them as an animated GIF (``audit render``),
and lays them out as a strip of panels in which the steps a detector flagged have a red
frame and the step of the hidden event is labelled (the visual report,
:mod:`audit.html_report`). Step ``t``'s panel shows the observation the policy acted on
at step ``t``; an event at step ``t`` is what that step's action did.

Example:
  >>> import numpy as np
  >>> frames = episode_frames(lambda o: np.zeros((3, 3, 3), np.uint8),
  ...                         np.zeros((4, 1)), np.array([True, True, False, False]))
  >>> len(frames), frames[0].shape
  (2, (48, 48, 3))
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

FLAG_COLOUR = "#d62728"  # a flagged step's frame
EVENT_COLOUR = "#ff7f0e"  # the hidden event's label
GRID_SHADE = 0.85  # cell borders: the cell's colour times this


def enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    """``[H, W, 3]`` -> ``[H * scale, W * scale, 3]``, each cell a square with a thin border.

    Raises:
      ValueError: if ``image`` is not ``[H, W, 3]`` ``uint8`` or ``scale`` < 1.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"render: expected an [H, W, 3] uint8 image, got shape {image.shape} "
                         f"and dtype {image.dtype}")
    if not isinstance(scale, int | np.integer) or scale < 1:
        raise ValueError(f"scale: expected an integer >= 1, got {scale!r}")
    big = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    if scale >= 4:  # a darker last row and column per cell: the grid stays readable
        shaded = (big.astype(np.float32) * GRID_SHADE).astype(np.uint8)
        edge = np.zeros(big.shape[:2], bool)
        edge[scale - 1::scale, :] = True
        edge[:, scale - 1::scale] = True
        big = np.where(edge[..., None], shaded, big)
    return big


def episode_frames(render: Callable[[np.ndarray], np.ndarray], observations, mask,
                   scale: int = 16) -> list[np.ndarray]:
    """The enlarged frames of one episode's valid steps.

    Args:
      render: the environment's ``EnvironmentSpec.render``.
      observations: ``[T, *obs_shape]`` the episode's observations.
      mask: ``[T]`` bool, True for the episode's steps (a prefix).
      scale: pixels per cell.

    Returns:
      one ``[H * scale, W * scale, 3]`` ``uint8`` frame per valid step.
    """
    observations, mask = np.asarray(observations), np.asarray(mask, bool)
    if mask.ndim != 1 or observations.shape[:1] != mask.shape:
        raise ValueError(f"observations [T, ...] and mask [T] must share T; got shapes "
                         f"{observations.shape} and {mask.shape}")
    return [enlarge(np.asarray(render(observations[t])), scale)
            for t in np.flatnonzero(mask)]


def _bordered(frame: np.ndarray, colour: tuple[int, int, int], width: int) -> np.ndarray:
    framed = frame.copy()
    framed[:width], framed[-width:], framed[:, :width], framed[:, -width:] = (colour,) * 4
    return framed


def write_gif(frames: Sequence[np.ndarray], path: str | os.PathLike,
              seconds_per_frame: float = 0.3, flagged: Sequence[bool] | None = None,
              event_steps: Sequence[int] = ()) -> Path:
    """Writes frames as a looping animated GIF.

    Args:
      frames: ``[H, W, 3]`` ``uint8`` frames, all of one size.
      path: the output file.
      seconds_per_frame: how long each frame shows.
      flagged: per frame, whether a detector flagged it (drawn with a red border).
      event_steps: frames at which a hidden event happened (an orange border).

    Returns:
      ``path`` as a :class:`~pathlib.Path`.
    """
    from PIL import Image

    if not frames:
        raise ValueError("write_gif: no frames (an episode without a valid step)")
    if seconds_per_frame <= 0:
        raise ValueError(f"seconds_per_frame: expected > 0, got {seconds_per_frame}")
    images = []
    for index, frame in enumerate(frames):
        width = max(2, frame.shape[0] // 40)
        if index in set(event_steps):
            frame = _bordered(frame, (255, 127, 14), 2 * width)
        if flagged is not None and flagged[index]:
            frame = _bordered(frame, (214, 39, 40), width)
        images.append(Image.fromarray(frame))
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], loop=0,
                   duration=int(round(seconds_per_frame * 1000)), disposal=2)
    return path


def strip_figure(frames: Sequence[np.ndarray], *, flagged: Sequence[bool] | None = None,
                 event_step: int | None = None, title: str = "", columns: int = 12,
                 panel_inches: float = 0.62):
    """Frames side by side (wrapped after ``columns``), flagged steps in red, the event labelled.

    Args:
      frames: the episode's frames (:func:`episode_frames`).
      flagged: per frame, whether the detector flagged that step.
      event_step: the step of the first hidden event (None: none).
      title: the figure's title.
      columns: panels per row.
      panel_inches: a panel's width.

    Returns:
      the matplotlib figure (the caller saves and closes it).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    count = max(len(frames), 1)
    columns = min(columns, count)
    rows = -(-count // columns)
    # At least 5 inches wide: the title (episode, flags) must fit over a short strip.
    width = max(panel_inches * columns + 0.2, 5.0)
    figure, axes = plt.subplots(rows, columns, squeeze=False,
                                figsize=(width, panel_inches * rows * 1.25 + 0.45))
    for index, axis in enumerate(axes.flat):
        axis.set_xticks([])
        axis.set_yticks([])
        if index >= len(frames):
            axis.set_visible(False)
            continue
        axis.imshow(frames[index], interpolation="nearest")
        is_flagged = flagged is not None and bool(flagged[index])
        is_event = event_step is not None and index == event_step
        label = f"t={index}" + (" event" if is_event else "")
        axis.set_title(label, fontsize=6.5, pad=2,
                       color=EVENT_COLOUR if is_event else "black",
                       fontweight="bold" if is_event else "normal")
        for spine in axis.spines.values():
            spine.set_color(FLAG_COLOUR if is_flagged else "#bbbbbb")
            spine.set_linewidth(2.4 if is_flagged else 0.6)
    if title:
        figure.suptitle(title, fontsize=8)
    used = min(1.0, (panel_inches * columns + 0.2) / width)  # short strips: left-aligned
    figure.subplots_adjust(left=0.01, right=0.01 + 0.98 * used,
                           bottom=0.01, top=1 - 0.42 / figure.get_figheight(),
                           wspace=0.08, hspace=0.35)
    return figure
