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

FLAG_RGB = (214, 39, 40)  # a flagged step's frame (matplotlib's tab:red)
FLAG_COLOUR = "#" + "".join(f"{channel:02x}" for channel in FLAG_RGB)
PANEL_RGB = (187, 187, 187)  # an unflagged panel's frame
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
            frame = _bordered(frame, FLAG_RGB, width)
        images.append(Image.fromarray(frame))
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], loop=0,
                   duration=int(round(seconds_per_frame * 1000)), disposal=2)
    return path


def strip_mosaic(frames: Sequence[np.ndarray], *, flagged: Sequence[bool] | None = None,
                 columns: int = 12) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """The frames composited into one image: a grid of ``columns`` panels, each framed
    (red and thick when flagged, thin grey otherwise), with white space above each
    panel for its label.

    Args:
      frames: ``[H, W, 3]`` uint8 frames, all of one size.
      flagged: per frame, whether it is framed in red.
      columns: panels per row.

    Returns:
      ``(image, label_positions)``: the uint8 mosaic and, per frame, the pixel
      ``(x, y)`` where its label's baseline centre goes.
    """
    if not len(frames):
        raise ValueError("strip: no frames to draw")
    height, width = frames[0].shape[:2]
    if any(frame.shape != frames[0].shape for frame in frames):
        raise ValueError("strip: the frames differ in shape")
    thin, thick = max(1, height // 40), max(3, height // 10)
    label = max(6, height // 3)  # room above each panel for "t=12 event"
    gap = max(2, width // 12)
    cell_h, cell_w = label + height + 2 * thick, width + 2 * thick + gap
    columns = min(columns, len(frames))
    rows = -(-len(frames) // columns)
    image = np.full((rows * cell_h, columns * cell_w - gap, 3), 255, np.uint8)
    positions = []
    for index, frame in enumerate(frames):
        row, column = divmod(index, columns)
        top, left = row * cell_h + label, column * cell_w
        is_flagged = flagged is not None and bool(flagged[index])
        border = thick if is_flagged else thin
        offset = thick - border  # every panel's frame inside the same cell
        image[top + offset:top + 2 * thick + height - offset,
              left + offset:left + 2 * thick + width - offset] = (FLAG_RGB if is_flagged
                                                                 else PANEL_RGB)
        image[top + thick:top + thick + height, left + thick:left + thick + width] = frame
        positions.append((left + thick + width / 2, top - 1))
    return image, positions


def strip_figure(frames: Sequence[np.ndarray], *, flagged: Sequence[bool] | None = None,
                 event_step: int | None = None, title: str = "", columns: int = 12,
                 panel_inches: float = 0.62):
    """Frames side by side (wrapped after ``columns``), flagged steps in red, the event labelled.

    One image on one axes (:func:`strip_mosaic`), so a long episode draws as fast as a
    short one: a report draws many.

    Args:
      frames: the episode's frames (:func:`episode_frames`).
      flagged: per frame, whether the detector flagged that step.
      event_step: the step of the first hidden event (None: none).
      title: the figure's title.
      columns: panels per row.
      panel_inches: a panel's width.

    Returns:
      the matplotlib figure (the caller saves and closes it); its axes' texts are the
      panels' labels (``t=<step>``, ``" event"`` added at the event).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    image, positions = strip_mosaic(frames, flagged=flagged, columns=columns)
    columns = min(columns, len(frames))
    inches_per_pixel = panel_inches * columns / image.shape[1]
    # At least 5 inches wide: the title (episode, flags) must fit over a short strip.
    width = max(image.shape[1] * inches_per_pixel + 0.2, 5.0)
    height = image.shape[0] * inches_per_pixel + 0.45
    figure = plt.figure(figsize=(width, height))
    used = image.shape[1] * inches_per_pixel / width  # short strips: left-aligned
    axis = figure.add_axes((0.1 / width, 0.05 / height, used,
                            image.shape[0] * inches_per_pixel / height))
    axis.imshow(image, interpolation="nearest")
    axis.set_axis_off()
    for index, (x, y) in enumerate(positions):
        is_event = event_step is not None and index == event_step
        axis.text(x, y, f"t={index}" + (" event" if is_event else ""), fontsize=6.5,
                  ha="center", va="bottom", color=EVENT_COLOUR if is_event else "black",
                  fontweight="bold" if is_event else "normal")
    if title:
        figure.suptitle(title, fontsize=8, y=1 - 0.03 / height, va="top")
    return figure
