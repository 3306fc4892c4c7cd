"""`LayerRateScheduler`: change the layer-rate multipliers during `fit`.

A schedule is a function ``schedule(t, depth) -> factor``: ``t`` is the epoch
(``per="epoch"``) or the number of optimizer updates made so far
(``per="step"``, counted from 0 across fits), ``depth`` the group's distance
from the top (0 = the top group, the one nearest the outputs). The multiplier
in force is the decorated multiplier (see `kerascool.layer_rates`) times the
factor, so a schedule composes with layer-wise decay or a spread.

Per-epoch schedules run in Python at the start of each epoch. Per-step
schedules run inside the compiled train step, so they must be written with
`keras.ops` (``t`` is then a float tensor), as a Keras
``LearningRateSchedule`` is. Either way the multipliers are a variable:
changing them never retraces. After `fit` they keep their last values, as
``LearningRateScheduler`` leaves the learning rate.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import numpy as np
from keras import ops

from kerascool import _core
from kerascool.layer_rates import layer_rates_of, multipliers_of

_PER = ("epoch", "step")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"Invalid value for argument `{name}`. Expected an integer >= 1. Received: {name}={value!r}")
    return int(value)


class _Warmup:
    def __init__(self, length):
        if isinstance(length, (list, tuple)):
            if not length:
                raise ValueError(f"Invalid value for argument `length`. Expected an integer >= 1 or a non-empty "
                                 f"list of them. Received: length={length!r}")
            self.length = [_positive_int("length", n) for n in length]
        else:
            self.length = _positive_int("length", length)

    def groups_needed(self):
        return len(self.length) if isinstance(self.length, list) else None

    def __call__(self, t, depth):
        n = self.length[depth] if isinstance(self.length, list) else self.length
        return ops.minimum(1.0, (t + 1.0) / float(n))

    def __repr__(self):
        return f"warmup(length={self.length!r})"


class _GradualUnfreezing:
    def __init__(self, every):
        self.every = _positive_int("every", every)

    def __call__(self, t, depth):
        return ops.where(t >= depth * self.every, 1.0, 0.0)

    def __repr__(self):
        return f"gradual_unfreezing(every={self.every})"


class _Constant:
    def __init__(self, factor):
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor < 0:
            raise ValueError(
                f"Invalid value for argument `factor`. Expected a finite number >= 0. Received: factor={factor!r}"
            )
        self.factor = float(factor)

    def __call__(self, t, depth):
        return self.factor

    def __repr__(self):
        return f"constant(factor={self.factor})"


class LayerRateScheduler(_core.HookCallback):
    """Schedule the multipliers of a model decorated with `kerascool.layer_rates`.

    Args:
        schedule: ``fn(t, depth) -> factor`` (see the module docstring).
        per: ``"epoch"`` or ``"step"``.
        log: add ``layer_rate/<group>`` (the multiplier in force) to the logs.

    Presets: `LayerRateScheduler.warmup` (per-group linear warmup),
    `LayerRateScheduler.gradual_unfreezing` (ULMFiT), `LayerRateScheduler.constant`.

    Example:

    >>> import numpy as np, keras, kerascool
    >>> model = keras.Sequential([keras.Input((4,))] + [keras.layers.Dense(2, name=f"d{i}") for i in range(3)])
    >>> model = kerascool.layer_rates(model, verbose=False)  # depth groups d0, d1, d2
    >>> model.compile(optimizer="adam", loss="mse")
    >>> unfreeze = kerascool.LayerRateScheduler.gradual_unfreezing(every=1)
    >>> _ = model.fit(np.ones((8, 4)), np.ones((8, 2)), epochs=2, verbose=0, callbacks=[unfreeze])
    >>> kerascool.current_layer_rates(model)
    {'d0': 0.0, 'd1': 1.0, 'd2': 1.0}
    """

    def __init__(self, schedule: Callable, per: str = "epoch", log: bool = False):
        super().__init__()
        if not callable(schedule):
            raise TypeError(
                f"Invalid value for argument `schedule`. Expected a callable fn(t, depth) -> factor. "
                f"Received: schedule={schedule!r}"
            )
        if per not in _PER:
            raise ValueError(f"Invalid value for argument `per`. Expected one of {_PER}. Received: per={per!r}")
        self.schedule = schedule
        self.per = per
        self.log = bool(log)
        self._hook = _ScheduleHook(self)

    # -- presets ----------------------------------------------------------------
    @classmethod
    def warmup(cls, length: Union[int, Sequence[int]], per: str = "step", log: bool = False) -> "LayerRateScheduler":
        """Linear warmup per group: factor ``min(1, (t + 1) / length)``.

        `length` is one integer for all groups or one per group, top group
        first (index = depth), e.g. longer warmups for the lower groups.
        """
        return cls(_Warmup(length), per=per, log=log)

    @classmethod
    def gradual_unfreezing(cls, every: int = 1, per: str = "epoch", log: bool = False) -> "LayerRateScheduler":
        """ULMFiT: only the top group trains at first; one more group every `every` epochs (or steps)."""
        return cls(_GradualUnfreezing(every), per=per, log=log)

    @classmethod
    def constant(cls, factor: float = 1.0, log: bool = False) -> "LayerRateScheduler":
        """The same factor for every group (1: the decorated multipliers)."""
        return cls(_Constant(factor), per="epoch", log=log)

    # -- callback -----------------------------------------------------------------
    def step_hooks(self):
        return [self._hook] if (self.per == "step" or self.log) else []

    def _check_model(self, model) -> None:
        super()._check_model(model)
        if model.trainable_variables:  # else checked once fit has built the model (the hook's check)
            self._validate(model)

    def _validate(self, model) -> None:
        rates = layer_rates_of(model)  # raises when the model is not decorated
        n = len(rates.group_names)
        needed = getattr(self.schedule, "groups_needed", lambda: None)()
        if needed is not None and needed != n:
            raise ValueError(
                f"The schedule {self.schedule!r} gives {needed} per-group values, but the model has {n} layer-rate "
                f"groups: {rates.group_names} (bottom first)."
            )
        self.factors(0, n)

    def factors(self, t, n: int) -> list:
        """The schedule's factors at `t` (a Python number), bottom group first."""
        out = []
        for i in range(n):
            value = float(ops.convert_to_numpy(ops.cast(self.schedule(t, n - 1 - i), "float32")))
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"The layer-rate schedule {self.schedule!r} returned {value} at t={t}, depth={n - 1 - i}. "
                    "Expected a finite number >= 0."
                )
            out.append(value)
        return out

    def on_epoch_begin(self, epoch, logs=None):
        if self.per != "epoch":
            return
        model = self.model

        def assign():
            rates = layer_rates_of(model)
            factors = self.factors(epoch, len(rates.base))
            values = np.asarray(rates.base, "float32") * np.asarray(factors, "float32")
            multipliers_of(model, rates).assign(values)

        _core.installation_of(model).when_built(assign)

    def get_config(self) -> dict:
        return {"schedule": repr(self.schedule), "per": self.per, "log": self.log}


class _ScheduleHook(_core.StepHook):
    """Per-step schedule and logging, inside the compiled step."""

    stage = "transform"
    name = "layer_rate_schedule"

    def __init__(self, scheduler: LayerRateScheduler):
        self.scheduler = scheduler

    def layout(self, model, variables):
        return (tuple(layer_rates_of(model).group_names),)

    def check(self, model, variables):
        self.scheduler._validate(model)

    def build(self, model, variables, state):
        if self.scheduler.log:
            for name in layer_rates_of(model).group_names:
                state.log_slot(f"layer_rate/{name}")
        return {}

    def before_update(self, grads, variables, state, ctx):
        # ctx.model, not the callback's: `Callback.model` syncs JAX state (not inside a trace).
        rates = layer_rates_of(ctx.model)
        multipliers = ctx.installation.state_of(rates)["multipliers"]
        n = len(rates.base)
        if self.scheduler.per == "step":
            t = ops.cast(ctx.step, "float32")
            factors = ops.stack(
                [ops.cast(self.scheduler.schedule(t, n - 1 - i), "float32") for i in range(n)]
            )
            multipliers.assign(ops.convert_to_tensor(np.asarray(rates.base, "float32")) * factors)
        if self.scheduler.log:
            values = multipliers.value
            for i, name in enumerate(rates.group_names):
                ctx.log(f"layer_rate/{name}", values[i])
        return grads
