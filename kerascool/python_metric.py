"""`PythonMetric`: any Python metric on validation predictions, in the logs, with the best weights kept.

BLEU, exact match, an F1 from scikit-learn: a function of NumPy arrays that
cannot run inside the compiled step. At the end of each epoch the callback
predicts the validation inputs, calls ``fn(y_true, y_pred)`` and puts the
result in the epoch's logs, where the progress bar, History,
`keras.callbacks.EarlyStopping` and `keras.callbacks.ModelCheckpoint` see it:
list this callback BEFORE them (Keras hands one logs dict to the callbacks in
list order).

With an `EMA` (or another kerascool average) in the same ``fit``, the metric
is computed on the averaged weights and those are the ones kept and saved,
as fit's own validation does with them.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Optional, Union

import keras
import numpy as np
from keras import tree

from kerascool import _keras
from kerascool import _core

_MODES = ("max", "min")


class PythonMetric(keras.callbacks.Callback):
    """Compute ``fn(y_true, y_pred)`` on validation data each epoch; keep the best weights.

    Args:
        fn: ``fn(y_true, y_pred) -> float`` on NumPy arrays (the predictions
            as ``model.predict`` returns them).
        validation_data: a tuple ``(x, y)`` of arrays, or any other iterable
            of ``(x, y)`` batches (a list, a `tf.data.Dataset`), iterated once
            per epoch.
        name: the key in the logs; ``"val_" + fn.__name__`` by default.
        mode: ``"max"`` (higher is better, BLEU) or ``"min"``.
        filepath: where to save the best weights (``model.save_weights``),
            ending in ``.weights.h5``; may hold ``{epoch}`` and ``{<name>}``
            placeholders as `ModelCheckpoint`'s does. None: keep them in
            memory only (``best_weights``).
        restore_best: put the best weights in the model when ``fit`` ends.
        averages: whose weights are evaluated and kept: ``"auto"`` (the one
            kerascool average, such as `EMA`, in this ``fit``, if any; the
            model's own weights otherwise), ``None`` (always the model's own
            weights), or an `EMA`/`SWA` callback.
        batch_size: for ``model.predict`` on arrays.

    Attributes:
        best: the best value so far (None before the first epoch).
        best_epoch: its epoch (0-based, as in ``on_epoch_end``).
        best_weights: the weights of that epoch (NumPy arrays, as
            ``model.get_weights()``).

    >>> import numpy as np, keras, kerascool
    >>> x, y = np.ones((8, 2)), np.ones((8, 1))
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> def exact_match(y_true, y_pred):
    ...     return float(np.mean(np.round(y_pred) == y_true))
    >>> metric = kerascool.PythonMetric(exact_match, (x, y))
    >>> history = model.fit(x, y, epochs=2, verbose=0, callbacks=[metric])
    >>> len(history.history["val_exact_match"])
    2
    """

    def __init__(
        self,
        fn: Callable,
        validation_data,
        name: Optional[str] = None,
        mode: str = "max",
        filepath: Optional[str] = None,
        restore_best: bool = False,
        averages: Union[str, None, keras.callbacks.Callback] = "auto",
        batch_size: Optional[int] = None,
    ):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"Invalid value for argument `fn`. Expected a callable fn(y_true, y_pred) -> float. Received: fn={fn!r}")
        if isinstance(validation_data, tuple):
            if len(validation_data) not in (2, 3):
                raise ValueError(
                    "Invalid value for argument `validation_data`. Expected (x, y) arrays or an iterable of "
                    f"(x, y) batches. Received: a {type(validation_data).__name__} of length {len(validation_data)}"
                )
        elif not hasattr(validation_data, "__iter__"):
            raise ValueError(
                "Invalid value for argument `validation_data`. Expected (x, y) arrays or an iterable of "
                f"(x, y) batches. Received: validation_data={validation_data!r}"
            )
        if name is None:
            name = "val_" + getattr(fn, "__name__", "metric").strip("<>")
        if not isinstance(name, str) or not name:
            raise ValueError(f"Invalid value for argument `name`. Expected a non-empty string. Received: name={name!r}")
        if mode not in _MODES:
            raise ValueError(f"Invalid value for argument `mode`. Expected one of {_MODES}. Received: mode={mode!r}")
        if filepath is not None and (not isinstance(filepath, str) or not filepath.endswith(".weights.h5")):
            raise ValueError(
                "Invalid value for argument `filepath`. Expected a path ending in `.weights.h5` (the best "
                f"weights are saved with `model.save_weights`). Received: filepath={filepath!r}"
            )
        if not isinstance(restore_best, bool):
            raise TypeError(f"Invalid value for argument `restore_best`. Expected a bool. Received: restore_best={restore_best!r}")
        if not (averages in ("auto", None) or hasattr(averages, "swapped")):
            raise ValueError(
                'Invalid value for argument `averages`. Expected "auto", None, or a kerascool averaging '
                f"callback such as kerascool.EMA(...). Received: averages={averages!r}"
            )
        self.fn = fn
        self.validation_data = validation_data
        self.name = name
        self.mode = mode
        self.filepath = filepath
        self.restore_best = restore_best
        self.averages = averages
        self.batch_size = batch_size
        self.best: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.best_weights: Optional[list] = None
        self._warned = False

    # -- which weights ---------------------------------------------------------
    def _swap(self):
        """The `WeightSwap` of the averages to evaluate, or None for the model's own weights."""
        if self.averages is None:
            return None
        if self.averages != "auto":
            swap = self.averages._current_swap()
            ready = getattr(self.averages, "_swap_ready", lambda: True)()
            return swap if ready else None
        from kerascool.averaging import AveragingHook

        installation = _core.installation_of(self.model)
        averages = [installation.state_of(h) for h in installation.hooks if isinstance(h, AveragingHook)]
        swaps = [a.swap for a in averages if a is not None]
        if len(swaps) > 1:
            if not self._warned:
                warnings.warn(
                    f"PythonMetric {self.name!r}: several weight averages are active in this fit; the metric "
                    "uses the model's own weights. Pass `averages=` to choose one.",
                    stacklevel=2,
                )
                self._warned = True
            return None
        return swaps[0] if swaps else None

    # -- evaluation --------------------------------------------------------------
    def _predict(self):
        data = self.validation_data
        if isinstance(data, tuple):
            x, y = data[0], data[1]
            return y, self.model.predict(x, batch_size=self.batch_size, verbose=0)
        ys, preds = [], []
        for batch in data:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError(
                    f"PythonMetric {self.name!r}: each batch of `validation_data` must be (x, y). Received: {type(batch).__name__}"
                )
            preds.append(self.model.predict_on_batch(batch[0]))
            ys.append(batch[1])
        concat = lambda *parts: np.concatenate([np.asarray(p) for p in parts])  # noqa: E731
        return tree.map_structure(concat, *ys), tree.map_structure(concat, *preds)

    def _score(self) -> float:
        y_true, y_pred = self._predict()
        value = self.fn(y_true, y_pred)
        try:
            value = float(np.asarray(value))
        except (TypeError, ValueError):
            raise TypeError(
                f"PythonMetric {self.name!r}: `fn` must return one number. Received: {value!r}"
            ) from None
        return value

    def _improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_epoch_end(self, epoch, logs=None) -> None:
        swap = self._swap()
        with (swap.swapped() if swap is not None else contextlib.nullcontext()):
            value = self._score()
            if logs is not None:
                logs[self.name] = value
            if self._improved(value):
                self.best, self.best_epoch = value, epoch
                _keras.sync_state(self.model)
                self.best_weights = [np.array(w, copy=True) for w in self.model.get_weights()]
                if self.filepath is not None:
                    values = {**(logs or {}), self.name: value}
                    self.model.save_weights(self.filepath.format(epoch=epoch + 1, **values))

    def on_train_end(self, logs=None) -> None:
        if self.restore_best and self.best_weights is not None:
            self.model.set_weights(self.best_weights)

    def get_config(self) -> dict:
        return {
            "fn": getattr(self.fn, "__name__", repr(self.fn)),
            "name": self.name,
            "mode": self.mode,
            "filepath": self.filepath,
            "restore_best": self.restore_best,
            "averages": self.averages if isinstance(self.averages, (str, type(None))) else type(self.averages).__name__,
            "batch_size": self.batch_size,
        }
