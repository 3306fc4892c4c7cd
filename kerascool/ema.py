"""`EMA`: an exponential moving average of the weights, updated inside `fit`'s step.

Convention (real updates ``n = 1, 2, ...`` counted since this EMA was first
used, micro-steps of gradient accumulation and vetoed steps excluded; the
average starts as a copy of the weights when the callback gets its model):

- ``n <= start``: the average copies the weights (it has not started);
- then it moves every `every` updates, at events ``j = (n - start) / every =
  1, 2, ...``: ``average <- d_j * average + (1 - d_j) * weights`` with
  ``s = j - 1`` and

  - ``warmup=None``: ``d_j = decay``;
  - ``warmup="timm"``: ``d_j = min(decay, 1 - (1 + s / warmup_gamma) ** -warmup_power)``
    (timm's ModelEmaV3; 0 at the first event, a copy);
  - ``warmup="tf"``: ``d_j = min(decay, (1 + s) / (10 + s))``
    (`tf.train.ExponentialMovingAverage` with ``num_updates``).

``EMA(decay, start=1)`` is Keras's ``use_ema=True, ema_momentum=decay``: a copy
at the first update, then the average (timm's convention too).
"""

from __future__ import annotations

import math
from typing import Optional

from keras import ops

from kerascool import averaging

_WARMUPS = (None, "timm", "tf")


class EMA(averaging.AveragingCallback):
    """Exponential moving average of the weights, with any stock optimizer.

    The average moves inside the compiled train step after each real update;
    ``fit``'s validation, ``evaluate(..., callbacks=[ema])`` and
    ``predict(..., callbacks=[ema])`` see it; the training weights are back in
    the model afterwards, also after an exception. The averages are optimizer
    variables: ``BackupAndRestore`` and checkpoints keep them.

    Args:
        decay: the fraction of the average kept at each event, in (0, 1).
        warmup: ``None``, ``"timm"`` or ``"tf"``: a decay that grows with the
            number of events (formulas in the module docstring).
        warmup_gamma: timm's ``gamma`` (> 0).
        warmup_power: timm's ``power`` (> 0); 2/3 suits a million steps, 3/4
            fewer.
        every: move the average every `every` real updates (>= 1).
        start: real updates during which the average copies the weights (>= 0).
        include_non_trainable: also average the floating non-trainable
            variables (BatchNorm statistics); off: the averages run with the
            model's current statistics.
        validation: what ``fit``'s validation sees: ``"ema"`` the averages,
            ``"raw"`` the training weights, ``"both"`` the training weights as
            ``val_loss``... and the averages as ``val_ema_loss``... (a second
            validation pass).
        swap_at_end: leave the averages in the model when ``fit`` ends (the
            training weights are then gone, as with Keras's ``use_ema``).

    Use ``with ema.swapped(): ...`` to save or inspect the averages, and
    ``ema.with_averages(keras.callbacks.ModelCheckpoint(...))`` for
    checkpoints that hold them.

    Example:

    >>> import numpy as np, keras, kerascool
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> ema = kerascool.EMA(decay=0.99, warmup="timm")
    >>> _ = model.fit(np.ones((8, 4)), np.ones((8, 1)), batch_size=4, verbose=0, callbacks=[ema])
    >>> with ema.swapped():  # the averages, e.g. to save them
    ...     averaged = model.get_weights()
    >>> [round(ema.decay_at(n), 3) for n in (1, 2, 3)]  # a copy first, then a growing decay
    [0.0, 0.37, 0.519]
    """

    def __init__(
        self,
        decay: float = 0.999,
        *,
        warmup: Optional[str] = None,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        every: int = 1,
        start: int = 0,
        include_non_trainable: bool = False,
        validation: str = "ema",
        swap_at_end: bool = False,
    ):
        _check_open_unit("decay", decay)
        if warmup not in _WARMUPS:
            raise ValueError(
                f"Invalid value for argument `warmup`. Expected one of {_WARMUPS}. Received: warmup={warmup!r}"
            )
        _check_positive("warmup_gamma", warmup_gamma)
        _check_positive("warmup_power", warmup_power)
        averaging.check_int("every", every, 1)
        averaging.check_int("start", start, 0)
        averaging.check_bool("include_non_trainable", include_non_trainable)
        self.decay = float(decay)
        self.warmup = warmup
        self.warmup_gamma = float(warmup_gamma)
        self.warmup_power = float(warmup_power)
        self.every = every
        self.start = start
        self.include_non_trainable = include_non_trainable
        super().__init__(_EMAHook(self), validation, swap_at_end)

    def decay_at(self, update: int) -> Optional[float]:
        """The decay used at real update `update` (from 1): 0.0 is a copy, None no move."""
        active, keep = self._hook.schedule(ops.convert_to_tensor(update, "int32"))
        if not bool(ops.convert_to_numpy(active)):
            return None
        return float(ops.convert_to_numpy(keep))

    def get_config(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "warmup_gamma": self.warmup_gamma,
            "warmup_power": self.warmup_power,
            "every": self.every,
            "start": self.start,
            "include_non_trainable": self.include_non_trainable,
            "validation": "ema" if self.validation == "average" else self.validation,
            "swap_at_end": self.swap_at_end,
        }


class _EMAHook(averaging.AveragingHook):
    name = "ema"

    def __init__(self, ema: EMA):
        super().__init__(ema.include_non_trainable)
        self.ema = ema

    def _decay(self, s):
        """The decay at the event with `s` earlier events (float tensor >= 0)."""
        ema = self.ema
        if ema.warmup is None:
            return ops.convert_to_tensor(ema.decay, "float32")
        if ema.warmup == "timm":
            warm = 1.0 - ops.power(1.0 + s / ema.warmup_gamma, -ema.warmup_power)
        else:
            warm = (1.0 + s) / (10.0 + s)
        return ops.minimum(ema.decay, warm)

    def schedule(self, n, averages=None):
        ema = self.ema
        since = n - ema.start
        s = ops.cast(ops.maximum(since // ema.every - 1, 0), "float32")
        keep = self._decay(s)
        before = ops.less_equal(n, ema.start) if ema.start else None
        if ema.every == 1:  # moves (or copies) on every update: no per-variable select in the step
            return True, keep if before is None else ops.where(before, 0.0, keep)
        event = ops.logical_and(ops.greater(since, 0), ops.equal(since % ema.every, 0))
        if before is None:
            return event, keep
        return ops.logical_or(before, event), ops.where(before, 0.0, keep)


def _check_open_unit(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a value in (0, 1). Received: {name}={value!r}"
        )


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a finite number > 0. Received: {name}={value!r}"
        )
