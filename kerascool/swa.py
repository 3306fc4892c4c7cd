"""`SWA` (stochastic weight averaging) and `update_bn` for averaged weights.

SWA keeps the plain running mean of weights taken at chosen points: with
``unit="epoch"`` at the end of epochs ``E = 1, 2, ...`` (counted since this
SWA was first used) with ``E > start`` and ``(E - start) % every == 0``,
taken before validation; with ``unit="step"`` inside the compiled step after
real updates ``n`` chosen the same way (micro-steps of gradient accumulation
and vetoed steps do not count). After ``m`` weights the next one moves the
average by ``average <- m / (m + 1) * average + 1 / (m + 1) * weights`` (the
first is a copy); ``torch.optim.swa_utils`` with ``swa_start=start`` and
every epoch is ``SWA(start=start)``.

BatchNorm statistics are not averages of statistics: after training, put the
averages in and recompute them with `update_bn`, as
``torch.optim.swa_utils.update_bn`` does.
"""

from __future__ import annotations

from typing import Optional

from keras import layers, ops

from kerascool import _core, _keras, averaging, swap

_UNITS = ("epoch", "step")


class SWA(averaging.AveragingCallback):
    """Stochastic weight averaging, with any stock optimizer.

    Until the first weights are averaged, validation sees the training
    weights; from then on it sees the average (see `validation`). The average
    and its counters are optimizer variables, kept by ``BackupAndRestore``.

    Args:
        start: epochs (or real updates, see `unit`) before averaging starts (>= 0).
        every: average the weights every `every` epochs (or updates) after
            `start` (>= 1).
        unit: ``"epoch"`` or ``"step"``.
        include_non_trainable: also average floating non-trainable variables
            (off: prefer `update_bn` for BatchNorm statistics).
        validation: ``"swa"``, ``"raw"`` or ``"both"`` (``val_swa_loss``...),
            as for `kerascool.EMA`.
        swap_at_end: leave the average in the model when ``fit`` ends.

    Example:

    >>> import numpy as np, keras, kerascool
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> swa = kerascool.SWA(start=1, swap_at_end=True)
    >>> _ = model.fit(np.ones((8, 4)), np.ones((8, 1)), epochs=3, verbose=0, callbacks=[swa])
    >>> swa.averaged_count()
    2
    """

    def __init__(
        self,
        start: int = 0,
        every: int = 1,
        unit: str = "epoch",
        *,
        include_non_trainable: bool = False,
        validation: str = "swa",
        swap_at_end: bool = False,
    ):
        averaging.check_int("start", start, 0)
        averaging.check_int("every", every, 1)
        if unit not in _UNITS:
            raise ValueError(f"Invalid value for argument `unit`. Expected one of {_UNITS}. Received: unit={unit!r}")
        averaging.check_bool("include_non_trainable", include_non_trainable)
        self.start = start
        self.every = every
        self.unit = unit
        self.include_non_trainable = include_non_trainable
        super().__init__(_SWAHook(self), validation, swap_at_end)

    def averaged_count(self) -> int:
        """How many weights the average holds so far."""
        averages = self._averages()
        if averages is None:
            return 0
        _keras.sync_state(averages.swap.model)
        return int(_keras.host_copy(averages.models))

    def _swap_ready(self) -> bool:
        return self.averaged_count() > 0

    # -- per-epoch averaging (between steps, eagerly) ---------------------
    # An epoch's final weights are taken at the first of: fit's validation, the
    # epoch's on_epoch_end, the next on_epoch_begin. `pending` is an optimizer
    # variable, so a BackupAndRestore that saved before our on_epoch_end (listed
    # first) saves "not taken yet", and the resumed run takes the restored
    # end-of-epoch weights at its first on_epoch_begin: the same average as an
    # uninterrupted run, whatever the callback order. No per-batch callback
    # (it would turn off Keras's asynchronous batch dispatch).
    def on_epoch_begin(self, epoch, logs=None):
        if self.unit == "epoch":
            self._take_pending_epoch()
            _core.installation_of(self.model).when_built(lambda: self._averages().pending.assign(1))

    def on_test_begin(self, logs=None):
        averages = self._averages()
        if self.unit == "epoch" and averages is not None and swap.swaps_of(averages.swap.model).fit_validation:
            self._take_pending_epoch()
        super().on_test_begin(logs)

    def on_epoch_end(self, epoch, logs=None):
        if self.unit == "epoch":
            self._take_pending_epoch()

    def _take_pending_epoch(self) -> None:
        averages = self._averages()
        if averages is None:
            return  # built right before the first step (a model Keras builds lazily)
        _keras.sync_state(averages.swap.model)
        if not int(_keras.host_copy(averages.pending)):
            return
        averages.pending.assign(0)
        epochs = int(_keras.host_copy(averages.epochs)) + 1
        averages.epochs.assign(epochs)
        since = epochs - self.start
        if since > 0 and since % self.every == 0:
            m = int(_keras.host_copy(averages.models))
            self._hook.average_now(averages, m / (m + 1.0))
            averages.models.assign(m + 1)

    def get_config(self) -> dict:
        return {
            "start": self.start,
            "every": self.every,
            "unit": self.unit,
            "include_non_trainable": self.include_non_trainable,
            "validation": "swa" if self.validation == "average" else self.validation,
            "swap_at_end": self.swap_at_end,
        }


class _SWAHook(averaging.AveragingHook):
    name = "swa"

    def __init__(self, swa: SWA):
        super().__init__(swa.include_non_trainable)
        self.swa = swa

    def build_schedule(self, state, averages):
        averages.models = state.variable("models", (), "int32")  # weights averaged so far
        averages.epochs = state.variable("epochs", (), "int32")  # epochs ended (unit="epoch")
        averages.pending = state.variable("pending", (), "int32")  # 1: an epoch whose weights are not taken yet

    def schedule(self, n, averages):
        swa = self.swa
        if swa.unit == "epoch":
            return False, 0.0  # averaged between steps, by the callback
        since = n - swa.start
        active = ops.logical_and(ops.greater(since, 0), ops.equal(since % swa.every, 0))
        m = ops.cast(averages.models.value, "float32")
        return active, m / (m + 1.0)

    def advance(self, active, averages):
        averages.models.assign_add(ops.cast(active, "int32"))


def update_bn(model, x, batch_size: int = 32, steps: Optional[int] = None) -> None:
    """Recompute the BatchNorm moving statistics of `model` for its current weights.

    One pass over `x` in training mode: each BatchNormalization layer's moving
    mean and variance become the plain average, over the batches, of the batch
    means and variances (what ``torch.optim.swa_utils.update_bn`` computes with
    ``momentum=None``). Dropout and other training-mode layers run in training
    mode too. Other variables do not change. Inside ``swa.swapped()`` the
    statistics of the training weights come back when the block ends.

    Args:
        model: a built Keras model.
        x: input data: a NumPy array or tensor, or a tuple ``(inputs,
            targets[, weights])`` of them (split into batches of
            `batch_size`); or an iterable of batches (`tf.data.Dataset`, a
            generator, needed for models with several inputs) yielding inputs
            or ``(inputs, targets[, weights])`` tuples.
        batch_size: batch size for array input.
        steps: at most this many batches.

    >>> import numpy as np, keras
    >>> bn = keras.layers.BatchNormalization()
    >>> model = keras.Sequential([keras.Input((2,)), bn])
    >>> update_bn(model, np.array([[0.0, 2.0], [2.0, 2.0]]), batch_size=1)
    >>> [round(float(v), 3) for v in keras.ops.convert_to_numpy(bn.moving_mean)]
    [1.0, 2.0]
    """
    norms = [layer for layer in _keras.flatten_layers(model) if isinstance(layer, layers.BatchNormalization)]
    if not norms:
        return
    for layer in norms:
        if getattr(layer, "renorm", False):
            raise ValueError(f"update_bn does not support BatchNormalization with renorm=True (layer {layer.name!r}).")
    if steps is not None:
        averaging.check_int("steps", steps, 1)
    _keras.sync_state(model)
    swap.protect(model, [v for layer in norms for v in (layer.moving_mean, layer.moving_variance)])
    momenta = [layer.momentum for layer in norms]
    try:
        for i, batch in enumerate(_batches(x, batch_size), start=1):
            if steps is not None and i > steps:
                break
            # Cumulative average: moving <- moving * (i - 1) / i + batch / i; the first batch sets it.
            for layer in norms:
                layer.momentum = (i - 1) / i
            model(batch, training=True)
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum


def _batches(x, batch_size: int):
    if isinstance(x, tuple):
        x = x[0]  # (inputs, targets[, weights]) given as arrays
    if hasattr(x, "shape") and hasattr(x, "__getitem__"):
        averaging.check_int("batch_size", batch_size, 1)
        for i in range(0, int(x.shape[0]), batch_size):
            yield x[i : i + batch_size]
        return
    for batch in x:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        yield batch
