"""PNG heatmaps of captured tensors (matplotlib, imported only when a picture is drawn).

What gets a picture (``sample`` picks one probe sample):

- attention scores ``(batch, heads, queries, keys)``: a grid of heads, at most
  4 columns; axes "key position" and "query position";
- a 3-D tensor ``(batch, a, b)``: one map of ``[sample]``, axes "axis 2" /
  "axis 1" (for a sequence layer: features across, positions down);
- a 2-D tensor ``(batch, units)``: the whole probe, axes "unit" / "probe sample".

Other ranks get no picture (they are still in the ``.npz``).
`TensorBoardImages` writes the same PNGs as TensorBoard images. Every panel is
``panel`` pixels square and a picture is exactly ``columns * panel`` by
``rows * panel`` pixels: attention ``min(heads, 4)`` columns and
``ceil(heads / 4)`` rows; other maps 2 columns, 1 row (`image_size`).

>>> import numpy as np
>>> image_size(np.zeros((2, 6, 5, 5)), "mha/attention_scores", panel=100)
(400, 200)
"""

from __future__ import annotations

import importlib.util
import io
import math
from typing import Optional

import numpy as np

MAX_COLUMNS = 4
_DPI = 100
INSTALL_HINT = "pip install kerascool[plot]"


def require_matplotlib(what: str = "PNG heatmaps") -> None:
    """Raise a clear ImportError now (before training) when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError(f"{what} need matplotlib, which is not installed: `{INSTALL_HINT}` (or pass plots=False).")


def is_attention(key: str, array: np.ndarray) -> bool:
    return array.ndim == 4 and key.rsplit("#", 1)[0].endswith("attention_scores")


def grid(key: str, array: np.ndarray) -> Optional[tuple]:
    """(rows, columns) of panels for this tensor, or None when it gets no picture."""
    if is_attention(key, array):
        heads = array.shape[1]
        columns = min(heads, MAX_COLUMNS)
        return math.ceil(heads / columns), columns
    if array.ndim in (2, 3) and array.size:
        return 1, 2  # one map, twice as wide as tall: room for the title and a colorbar
    return None


def image_size(array: np.ndarray, key: str, panel: int = 240) -> Optional[tuple]:
    """(width, height) in pixels of the picture of `array`, or None."""
    shape = grid(key, np.asarray(array))
    if shape is None:
        return None
    rows, columns = shape
    return columns * panel, rows * panel


def render_png(key: str, array: np.ndarray, title: str = "", sample: int = 0, panel: int = 240) -> Optional[bytes]:
    """The PNG bytes of the heatmap of `array`, or None when it gets no picture."""
    array = np.asarray(array)
    shape = grid(key, array)
    if shape is None:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f"PNG heatmaps need matplotlib, which is not installed: `{INSTALL_HINT}`.") from None

    rows, columns = shape
    sample = min(sample, array.shape[0] - 1)
    width, height = columns * panel, rows * panel
    # A fixed figure size (no bbox_inches="tight") keeps the pixel size exact;
    # margins are set by hand (constrained layout doubles the drawing time).
    figure = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    FigureCanvasAgg(figure)
    small = max(5, min(9, panel // 30))
    title_px = 14 * (1 + title.count("\n")) + 10 if title else 8
    attention = is_attention(key, array)
    title_px += 16 if attention else 0  # the heads' own titles
    margins = dict(left=44 / width, right=1 - 58 / width, bottom=36 / height, top=1 - title_px / height)
    if attention:
        maps = array[sample].astype("float32")
        top = max(float(np.nanmax(maps)), 1e-6)
        axes = figure.subplots(rows, columns, squeeze=False, gridspec_kw=dict(
            **margins, wspace=40 / (panel - 40), hspace=44 / (panel - 44)))
        heads = maps.shape[0]
        for head, ax in enumerate(axes.flat):
            if head >= heads:
                ax.set_axis_off()
                continue
            # One color scale for all heads of the picture, from 0 (masked) to the largest weight.
            image = ax.imshow(maps[head], cmap="viridis", vmin=0.0, vmax=top, aspect="auto", interpolation="nearest")
            ax.set_title(f"head {head}", fontsize=small + 1, pad=3)
            ax.tick_params(labelsize=small - 1)
            if head + columns >= heads:  # lowest panel of its column
                ax.set_xlabel("key position", fontsize=small, labelpad=1)
            if head % columns == 0:
                ax.set_ylabel("query position", fontsize=small, labelpad=1)
    else:
        ax = figure.subplots(gridspec_kw=margins)
        if array.ndim == 2:
            data, ylabel, xlabel = array, "probe sample", "unit"
        else:
            data, ylabel, xlabel = array[sample], "axis 1", "axis 2"
        image = ax.imshow(data.astype("float32"), cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_xlabel(xlabel, fontsize=small, labelpad=1)
        ax.set_ylabel(ylabel, fontsize=small, labelpad=1)
        ax.tick_params(labelsize=small - 1)
    bar = figure.add_axes([1 - 46 / width, margins["bottom"], 10 / width, margins["top"] - margins["bottom"]])
    figure.colorbar(image, cax=bar).ax.tick_params(labelsize=small - 1)
    if title:
        # Shrink long titles (deep layer paths) to the picture's width.
        fit = int(width / (0.62 * max(len(line) for line in title.splitlines())))
        figure.suptitle(title, fontsize=max(5, min(small + 2, fit)), y=1 - 4 / height, va="top")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


class TensorBoardImages:
    """Writes PNGs as TensorBoard images with TensorFlow core, under any Keras backend.

    `tf.summary.image` needs the separate tensorboard package, so this writes
    what it writes: the strings [width, height, png] tagged for the "images"
    plugin (whose ImagePluginData at version 0 serializes to b"").
    """

    def __init__(self, log_dir: str):
        import tensorflow as tf

        self._tf = tf
        self._writer = tf.summary.create_file_writer(log_dir)

    @staticmethod
    def require() -> None:
        if importlib.util.find_spec("tensorflow") is None:
            raise ImportError(
                "CaptureCallback(log_dir=...) writes TensorBoard images with TensorFlow's tf.summary, and "
                "TensorFlow is not installed: `pip install tensorflow-cpu` (any Keras backend), "
                "or pass log_dir=None and read the PNGs in `directory`."
            )

    def write(self, tag: str, png: bytes, step: int) -> None:
        from tensorflow.core.framework import summary_pb2

        # IHDR holds width and height as big-endian uint32 at bytes 16-24.
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="images", content=b"")
        )
        tf = self._tf
        with self._writer.as_default():
            tf.summary.write(tag, tf.constant([str(width).encode(), str(height).encode(), png]), step=step,
                             metadata=metadata)

    def flush(self) -> None:
        self._writer.flush()
