"""`CaptureCallback`: record layer outputs and attention maps on a fixed probe set during `fit`.

After validation, every `every` epochs, the callback runs one extra forward
pass (inference mode) on a fixed probe batch. That pass is compiled once per
`fit` (`tf.function` / `jax.jit`) with a `kerascool.Capture` installed only
while it traces; the captured tensors are its outputs. Misuse fails before
the first training step: with user-given probe data a first eager pass
shows the model's own message; otherwise a pass on placeholders (the
model's declared inputs, or for a subclassed model the spec of `fit`'s
first training batch) finds chosen layers that inference never calls.
The train and test functions are never retraced and never see the capture,
so training is bit-identical with and without it.

Files, when `directory` is given (epochs are numbered from 1, as in Keras's
progress bar and `ModelCheckpoint`):

- ``<directory>/probe.npz``: the probe inputs, key ``"x"`` (or ``"x/<name>"``
  for dict inputs, ``"x/<index>"`` for lists), written once;
- ``<directory>/epoch_003.npz``: one array per capture key (keys as in
  `kerascool.Capture`: layer path, ``<path>/attention_scores``, ...), batch
  axis first; ``np.load(path)[key]`` reads one back;
- ``<directory>/epoch_003/<key>.png``: heatmaps (`kerascool.heatmaps`), one
  per key that has a picture, e.g. ``epoch_003/encoder/mha/attention_scores.png``.
  Drawing costs matplotlib time (a fraction of a second per picture, more
  than the capture itself): thin it out with `every`, or pass plots=False.

With `log_dir`, the same pictures go to TensorBoard under
``<log_dir>/captures`` (tag = key, step = epoch), written with `tf.summary`
(TensorFlow must be installed, the tensorboard package need not be; it
works with the JAX backend too).
`cb.captures` holds everything in memory: ``{epoch: {key: array}}``.

Example:

>>> import numpy as np, keras, kerascool
>>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="hidden")], name="net")
>>> model.compile(optimizer="sgd", loss="mse")
>>> cb = kerascool.CaptureCallback(layers="hidden", probe=np.ones((4, 3)))
>>> _ = model.fit(np.ones((8, 3)), np.ones((8, 2)), epochs=2, verbose=0, callbacks=[cb])
>>> sorted(cb.captures), cb.latest["net/hidden"].shape
([1, 2], (4, 2))
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
import zipfile
from typing import Any, Optional, Union

import keras
import numpy as np

from kerascool import _keras, heatmaps
from kerascool.capture import Capture, layer_path, to_numpy
from kerascool.selection import Selection

ProbeArg = Union[int, Any]


class CaptureCallback(keras.callbacks.Callback):
    """Look inside the model while it trains, without editing it.

    Args:
        layers: layers whose outputs to record (pattern, list of patterns,
            predicate ``fn(layer) -> bool``, or None), as in `kerascool.Capture`.
        attention: `MultiHeadAttention` layers whose scores to record: True
            (all), False (none), or a selection.
        probe: an int k: the first k validation samples, taken once at the
            first validation and reused so captures compare across epochs
            (captures happen in epochs where validation ran); or the model's
            inputs themselves (an array, or a list/dict of arrays; one batch),
            captured every `every` epochs, validation or not.
        every: capture every `every` epochs (epochs 1-based, as Keras's
            `validation_freq`).
        directory: where ``.npz`` files and PNGs go; None writes no files.
        plots: draw PNG heatmaps into `directory` (needs matplotlib).
        log_dir: also write the heatmaps to TensorBoard under
            ``<log_dir>/captures`` (needs TensorFlow and matplotlib).
        keep: keep only the last `keep` epochs in `captures` (None: all).
        points: record `kerascool.capture` points.

    Attributes:
        captures: ``{epoch: {key: np.ndarray}}``, epochs 1-based.
        latest: the most recent capture (``{key: np.ndarray}``).
    """

    def __init__(
        self,
        layers: Selection = None,
        attention: Union[bool, Selection] = True,
        probe: ProbeArg = 8,
        every: int = 1,
        directory: Optional[str] = None,
        plots: bool = True,
        log_dir: Optional[str] = None,
        keep: Optional[int] = None,
        points: bool = True,
    ):
        super().__init__()
        _check_int("every", every)
        if keep is not None:
            _check_int("keep", keep)
        if _is_int(probe):
            _check_int("probe", probe)
            self._probe, self.probe_size = None, int(probe)
        else:
            self._probe, self.probe_size = _standardize_probe(probe), None
        if directory is not None and plots:
            heatmaps.require_matplotlib("PNG heatmaps (CaptureCallback(plots=True) with a `directory`)")
        if log_dir is not None:
            heatmaps.TensorBoardImages.require()
            heatmaps.require_matplotlib("TensorBoard images (CaptureCallback(log_dir=...))")
        self.layers, self.attention, self.points = layers, attention, points
        self.every, self.keep = int(every), keep
        self.directory, self.plots, self.log_dir = directory, bool(plots), log_dir
        self.captures: dict = {}
        self._capture: Optional[Capture] = None
        self._forward = None
        self._checked = False  # selected layers proven to be called
        self._probe_saved = False
        self._captured_this_fit = False
        self._writer = None
        self._undo_spy = None
        self.trace_count = 0

    # -- fit --------------------------------------------------------------------
    def on_train_begin(self, logs=None) -> None:
        self._captured_this_fit = False
        self._prepare(self.model)
        self._undo_spy = None

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        # A subclassed model declares no inputs: its selection is checked on the
        # spec of fit's first training batch, just before the first step runs
        # (installed here, after every callback's on_train_begin has retraced).
        if not self._checked and self._probe is None and self._undo_spy is None:
            self._undo_spy = _keras.before_first_train_step(
                self.model, lambda x, values: self._check_symbolically(self.model, x, values)
            )

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if (epoch + 1) % self.every:
            return
        if self.probe_size is not None and not any(k.startswith("val_") for k in (logs or {})):
            return  # the probe is validation data: capture where validation ran
        self._store(epoch + 1, self._run(self.model, self._probe_or_take(self.model)))
        self._captured_this_fit = True

    def on_train_end(self, logs=None) -> None:
        if self._undo_spy is not None:
            self._undo_spy()  # fit ran no step
        if self._writer is not None:
            self._writer.flush()
        if not self._captured_this_fit and self.probe_size is not None:
            warnings.warn(
                f"CaptureCallback captured nothing: probe={self.probe_size} takes the first validation samples, "
                "and this fit ran no validation. Pass validation_data=... (or validation_split=...) to fit, "
                "or probe=<inputs> to CaptureCallback.",
                stacklevel=2,
            )

    # -- on demand -------------------------------------------------------------
    def capture_now(self, x: Any = None, name: Optional[str] = None, model=None) -> dict:
        """Capture now on `x` (default: the probe); returns ``{key: array}``.

        With `name` and a `directory`, also writes ``<name>.npz`` and its PNGs.
        """
        model = model if model is not None else self.model
        if model is None:
            raise ValueError("capture_now needs a model: pass model=..., or use the callback in fit first.")
        if self._capture is None or self._capture.model is not model:
            self._prepare(model)
        if x is None:
            if self._probe is None:
                raise ValueError(
                    f"No probe yet: probe={self.probe_size} is taken at the first validation of fit. "
                    "Pass x=<inputs> to capture_now."
                )
            x = self._probe
        else:
            x = _standardize_probe(x, "x")
        values = self._run(model, x, "x")
        if name is not None:
            self._write(name, values, title=name, step=None)
        return values

    @property
    def latest(self) -> dict:
        return self.captures[max(self.captures)] if self.captures else {}

    def get_config(self) -> dict:
        return {
            "layers": self.layers if not callable(self.layers) else repr(self.layers),
            "attention": self.attention if not callable(self.attention) else repr(self.attention),
            "probe": self.probe_size,  # inputs given as data are not part of the config
            "every": self.every,
            "directory": self.directory,
            "plots": self.plots,
            "log_dir": self.log_dir,
            "keep": self.keep,
            "points": self.points,
        }

    # -- internals -------------------------------------------------------------
    def _prepare(self, model) -> None:
        """Resolve the layers and prove the capture works, before any training step."""
        self._capture = Capture(model, self.layers, self.attention, self.points)
        self._forward = None  # compiled at the first capture, reused after
        self._checked = False
        if self._probe is not None:
            _check_probe_shapes(model, self._probe, "probe")
            if not model.built:
                # Built here by a plain inference call: Keras builds a subclassed model with a
                # symbolic pass, whose placeholders the capture would otherwise record.
                try:
                    model(self._probe, training=False)
                except Exception:  # noqa: BLE001 - the dry run below reports it clearly
                    pass
            self._run(model, self._probe, "probe")  # a dry run: raises on misuse
            return
        inputs = _keras.symbolic_inputs(model)
        if inputs is not None:
            self._check_symbolically(model, inputs)
        # else a subclassed model: checked on the spec of fit's first training
        # batch (`on_epoch_begin`), or at the first capture outside fit.

    def _check_symbolically(self, model, inputs, values=None) -> None:
        """Which selected layers a forward pass on placeholders calls (no data, no compute)."""
        if inputs is None:
            return
        capture = self._capture
        capture.clear()
        capture.symbolic = True
        try:
            with capture:
                _keras.trace_shapes(model, inputs, values)
        except Exception:  # noqa: BLE001 - a model that cannot trace on placeholders is checked later
            return
        finally:
            capture.symbolic = False
        self._check_called(capture, capture.pop_tensors())

    def _run(self, model, x, what: str = "probe") -> dict:
        if not self._checked:
            # The first pass runs eagerly: misuse shows the model's own error
            # message (not a traced one), and which layers were called.
            try:
                tensors = self._trace(lambda inputs: model(inputs, training=False), x)
            except Exception as e:
                message = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
                raise ValueError(
                    f"Invalid value for argument `{what}`: the model cannot run on it ({type(e).__name__}: "
                    f"{message[:800]}). Received: {what} with shape(s) {_shapes(x)}"
                ) from e
            self._check_called(self._capture, list(tensors))
        else:
            if self._forward is None:
                self._forward = _keras.compiled_forward(model, self._trace)
            tensors = self._forward(x)
        return {key: to_numpy(value) for key, value in tensors.items()}

    def _trace(self, forward, x) -> dict:
        """The body of the compiled probe pass: the capture is installed only while it traces."""
        self.trace_count += 1  # eager first pass + one per compiled trace
        capture = self._capture
        capture.clear()
        with capture:
            forward(x)
        return capture.pop_tensors()

    def _check_called(self, capture: Capture, keys: list) -> None:
        missing = capture.not_called()
        if missing:
            names = ", ".join(repr(layer_path(layer)) for layer in missing)
            raise ValueError(
                f"CaptureCallback: layer(s) {names} of model {capture.model.name!r} are never called in a forward "
                "pass (a layer built but unused in `call`, or reached only in training). Choose layers on the "
                "forward path."
            )
        if not keys:
            raise ValueError(
                "CaptureCallback has nothing to capture: choose layers with `layers=...`, keep `attention=True` "
                "on a model with MultiHeadAttention layers, or add `kerascool.capture(name, tensor)` points."
            )
        self._checked = True

    def _probe_or_take(self, model):
        if self._probe is None:
            self._probe = _first_samples(model, self.probe_size)
        return self._probe

    def _store(self, epoch: int, values: dict) -> None:
        self.captures[epoch] = values
        if self.keep is not None:
            for old in sorted(self.captures)[: -self.keep]:
                del self.captures[old]
        self._write(f"epoch_{epoch:03d}", values, title=f"epoch {epoch}", step=epoch)

    def _write(self, stem: str, values: dict, title: str, step: Optional[int]) -> None:
        if self.directory is not None:
            os.makedirs(self.directory, exist_ok=True)
            if not self._probe_saved and self._probe is not None:
                _save_npz(os.path.join(self.directory, "probe.npz"), _flatten_inputs(self._probe))
                self._probe_saved = True
            _save_npz(os.path.join(self.directory, f"{stem}.npz"), values)
        if not (self.plots and self.directory is not None) and self.log_dir is None:
            return
        for key, array in values.items():
            png = heatmaps.render_png(key, array, title=f"{key}\n{title}, probe sample 0")
            if png is None:
                continue
            if self.plots and self.directory is not None:
                path = os.path.join(self.directory, stem, *_safe(key).split("/")) + ".png"
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(png)
            if self.log_dir is not None and step is not None:
                if self._writer is None:
                    self._writer = heatmaps.TensorBoardImages(os.path.join(self.log_dir, "captures"))
                self._writer.write(key, png, step)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_int(name: str, value) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"Invalid value for argument `{name}`. Expected an integer >= 1. Received: {name}={value!r}")


def _standardize_probe(probe, what: str = "probe"):
    if probe is None or isinstance(probe, (str, bytes)):
        raise TypeError(
            f"Invalid value for argument `{what}`. Expected an int (that many validation samples) or the model's "
            f"inputs (an array, or a list/dict of arrays). Received: {what}={probe!r}"
        )
    try:
        probe = keras.tree.map_structure(np.asarray, probe)
    except Exception as e:
        raise TypeError(f"Invalid value for argument `{what}`: cannot convert it to arrays ({e}).") from None
    sizes = {a.shape[0] if a.ndim else None for a in keras.tree.flatten(probe)}
    if None in sizes or 0 in sizes or len(sizes) != 1:
        raise ValueError(
            f"Invalid value for argument `{what}`. Expected arrays with the same non-empty batch axis. "
            f"Received: {what} with shape(s) {_shapes(probe)}"
        )
    return probe


def _check_probe_shapes(model, probe, what: str) -> None:
    """Compare with the model's declared inputs (functional, Sequential) for a clear message."""
    inputs = _keras.symbolic_inputs(model)
    if inputs is None:
        return
    # Leaves in order (dicts by sorted key), as Keras matches them: [x] and x are the same.
    specs, arrays = keras.tree.flatten(inputs), keras.tree.flatten(probe)
    if len(specs) != len(arrays) or any(not _compatible(s.shape, a.shape) for s, a in zip(specs, arrays)):
        expected = keras.tree.map_structure(lambda t: tuple(t.shape), inputs)
        raise ValueError(
            f"Invalid value for argument `{what}`. Expected inputs of model {model.name!r} with shape(s) "
            f"{expected} (None: any size). Received: {what} with shape(s) {_shapes(probe)}"
        )


def _compatible(expected, received) -> bool:
    return len(expected) == len(received) and all(e is None or e == r for e, r in zip(expected, received))


def _shapes(x):
    return keras.tree.map_structure(lambda a: tuple(np.shape(a)), x)


def _first_samples(model, k: int):
    batches = _keras.validation_batches(model)
    if batches is None:
        raise ValueError(
            f"CaptureCallback(probe={k}) takes the first {k} validation samples, but fit has no validation data. "
            "Pass validation_data=... to fit, or probe=<inputs> to CaptureCallback."
        )
    parts, n = [], 0
    for batch in batches:
        x, _, _ = keras.utils.unpack_x_y_sample_weight(batch)
        parts.append(x)
        n += len(keras.tree.flatten(x)[0])
        if n >= k:
            break
    return keras.tree.map_structure(lambda *a: np.concatenate(a)[:k], *parts)


def _flatten_inputs(x) -> dict:
    if not keras.tree.is_nested(x):
        return {"x": np.asarray(x)}
    return {"/".join(["x"] + [str(p) for p in path]): np.asarray(a) for path, a in keras.tree.flatten_with_path(x)}


def _save_npz(path: str, arrays: dict) -> None:
    # Write then rename: an interrupted run never leaves a truncated file.
    handle, tmp = tempfile.mkstemp(suffix=".npz", dir=os.path.dirname(path) or ".")
    try:
        # What np.savez does, without its keyword arguments colliding with keys ("file").
        with os.fdopen(handle, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for key, array in arrays.items():
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.#/-]", "_", key).replace("..", "_")
