"""Learning-rate schedules for any stock optimizer: warmup, one-cycle, piecewise linear.

Each is a `keras.optimizers.schedules.LearningRateSchedule`: pass it as the
optimizer's ``learning_rate`` and the optimizer evaluates it inside the
compiled train step, once per update, from its own ``iterations`` counter (no
Python per batch, nothing retraced). They also serve `kerascool.AnnealVariable`
as schedules of any variable. Layer-rate multipliers (`kerascool.layer_rates`)
scale the update the optimizer makes with the scheduled rate, so the two
combine multiplicatively.

Steps ``t = 0, 1, 2, ...`` count the updates made so far (``t`` is the
optimizer's ``iterations`` before the update; under Keras's own
``gradient_accumulation_steps`` it counts micro-batches, as for every Keras
schedule).

>>> import keras, kerascool
>>> optimizer = keras.optimizers.Adam(kerascool.LinearWarmup(1e-3, warmup_steps=100))
>>> round(float(kerascool.PiecewiseLinear({1000: 1.0, 2000: 0.1})(1500)), 4)
0.55
"""

from __future__ import annotations

import math
from typing import Mapping, Union

import keras
from keras import ops

Schedule = Union[float, keras.optimizers.schedules.LearningRateSchedule]


def _check_number(name: str, value, low=None, low_open=False, high=None, high_open=False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}, "
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        expected = f"a finite number in {lo}{hi}" if lo and hi else (
            f"a finite number {'>' if low_open else '>='} {low}" if lo else "a finite number"
        )
        raise ValueError(f"Invalid value for argument `{name}`. Expected {expected}. Received: {name}={value!r}")
    return float(value)


def _check_steps(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected an integer >= {minimum}. Received: {name}={value!r}"
        )
    return value


def _step(step):
    return ops.cast(step, "float32")


@keras.saving.register_keras_serializable(package="kerascool")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to a rate (or to the start of another schedule), per update.

    Update number ``k = t + 1`` (``t = 0, 1, ...`` updates made before it) uses

    - ``start + (peak - start) * k / warmup_steps`` for ``k <= warmup_steps``
      (the first update already moves; the ``warmup_steps``-th uses the peak);
    - then ``after(t - warmup_steps)``: the wrapped schedule starts at its own
      step 0 once the warmup is over,

    where ``peak`` is `after` itself (a number) or ``after(0)`` (a schedule).

    Args:
        after: the rate after the warmup: a number, or a
            `LearningRateSchedule` (e.g. `keras.optimizers.schedules.CosineDecay`).
        warmup_steps: number of warmup updates (>= 1).
        start: the rate the warmup starts from (>= 0).

    >>> schedule = LinearWarmup(1.0, warmup_steps=4)
    >>> [float(schedule(t)) for t in range(6)]
    [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    """

    def __init__(self, after: Schedule, warmup_steps: int, start: float = 0.0):
        if not isinstance(after, keras.optimizers.schedules.LearningRateSchedule):
            after = _check_number("after", after, low=0.0)
        self.after = after
        self.warmup_steps = _check_steps("warmup_steps", warmup_steps)
        self.start = _check_number("start", start, low=0.0)

    def _after(self, t):
        if isinstance(self.after, float):
            return ops.convert_to_tensor(self.after, "float32")
        return ops.cast(self.after(t), "float32")

    def __call__(self, step):
        t = _step(step)
        ramp = ops.minimum((t + 1.0) / self.warmup_steps, 1.0)
        warm = self.start + (self._after(ops.zeros_like(t)) - self.start) * ramp
        return ops.where(t < self.warmup_steps, warm, self._after(ops.maximum(t - self.warmup_steps, 0.0)))

    def get_config(self) -> dict:
        after = self.after
        if not isinstance(after, float):
            after = keras.optimizers.schedules.serialize(after)
        return {"after": after, "warmup_steps": self.warmup_steps, "start": self.start}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config["after"], dict):
            config["after"] = keras.optimizers.schedules.deserialize(config["after"])
        return cls(**config)


_ANNEAL = ("cos", "linear")


@keras.saving.register_keras_serializable(package="kerascool")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """The one-cycle policy (Smith & Topin 2018) exactly as PyTorch's ``OneCycleLR``.

    With ``initial = max_lr / div_factor`` and ``final = initial /
    final_div_factor``, the rate at step ``t`` goes from ``initial`` at
    ``t = 0`` up to ``max_lr`` at ``t = pct_start * total_steps - 1``, then
    down to ``final`` at ``t = total_steps - 1`` (and stays there). Within a
    phase from ``a`` to ``b`` at fraction ``p`` of it, ``"cos"`` gives
    ``b + (a - b) * (1 + cos(pi * p)) / 2`` and ``"linear"`` ``a + (b - a) * p``.
    ``three_phase=True`` goes back down to ``initial`` at ``t = 2 *
    pct_start * total_steps - 2`` before the final descent, as PyTorch does.

    Only the rate cycles: Keras optimizers take momentum and ``beta_1`` as
    constants, so fastai's inverse momentum cycle is not applied.

    Args:
        max_lr: the peak rate (> 0).
        total_steps: updates in the whole cycle (usually epochs x steps per epoch).
        pct_start: fraction of the cycle spent going up, in (0, 1).
        div_factor: ``initial = max_lr / div_factor`` (>= 1).
        final_div_factor: ``final = initial / final_div_factor`` (>= 1).
        anneal: ``"cos"`` or ``"linear"``.
        three_phase: PyTorch's ``three_phase``.

    >>> schedule = OneCycle(1.0, total_steps=10, pct_start=0.3, div_factor=10.0, final_div_factor=10.0, anneal="linear")
    >>> [round(float(schedule(t)), 3) for t in (0, 2, 9)]
    [0.1, 1.0, 0.01]
    """

    def __init__(
        self,
        max_lr: float,
        total_steps: int,
        pct_start: float = 0.3,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        anneal: str = "cos",
        three_phase: bool = False,
    ):
        self.max_lr = _check_number("max_lr", max_lr, low=0.0, low_open=True)
        self.total_steps = _check_steps("total_steps", total_steps, minimum=2)
        self.pct_start = _check_number("pct_start", pct_start, low=0.0, low_open=True, high=1.0, high_open=True)
        self.div_factor = _check_number("div_factor", div_factor, low=1.0)
        self.final_div_factor = _check_number("final_div_factor", final_div_factor, low=1.0)
        if anneal not in _ANNEAL:
            raise ValueError(f"Invalid value for argument `anneal`. Expected one of {_ANNEAL}. Received: anneal={anneal!r}")
        if not isinstance(three_phase, bool):
            raise TypeError(f"Invalid value for argument `three_phase`. Expected a bool. Received: three_phase={three_phase!r}")
        self.anneal = anneal
        self.three_phase = three_phase
        self._phases = self._make_phases()

    def _make_phases(self) -> list:
        initial = self.max_lr / self.div_factor
        final = initial / self.final_div_factor
        up_end = self.pct_start * self.total_steps - 1
        last = self.total_steps - 1
        if self.three_phase:
            ends = [up_end, 2 * up_end, last]
            values = [(initial, self.max_lr), (self.max_lr, initial), (initial, final)]
        else:
            ends = [up_end, last]
            values = [(initial, self.max_lr), (self.max_lr, final)]
        starts = [0.0] + ends[:-1]
        if any(end <= begin for begin, end in zip(starts, ends)):
            raise ValueError(
                "Invalid value for argument `pct_start`: every phase of the cycle needs at least one step, "
                f"which needs {'2 * ' if self.three_phase else ''}pct_start * total_steps - 1 to lie in "
                f"(0, total_steps - 1). Received: pct_start={self.pct_start}, total_steps={self.total_steps}"
            )
        return [(begin, end, a, b) for (begin, end), (a, b) in zip(zip(starts, ends), values)]

    def _anneal(self, a, b, p):
        if self.anneal == "cos":
            return b + (a - b) * (1.0 + ops.cos(math.pi * p)) / 2.0
        return a * (1.0 - p) + b * p  # exact at both ends in float32

    def __call__(self, step):
        t = ops.minimum(_step(step), float(self.total_steps - 1))
        value = None
        # Last phase first, so that earlier phases overwrite it where t falls in them.
        for begin, end, a, b in reversed(self._phases):
            here = self._anneal(a, b, (t - begin) / (end - begin))
            value = here if value is None else ops.where(t <= end, here, value)
        return value

    def get_config(self) -> dict:
        return {
            "max_lr": self.max_lr,
            "total_steps": self.total_steps,
            "pct_start": self.pct_start,
            "div_factor": self.div_factor,
            "final_div_factor": self.final_div_factor,
            "anneal": self.anneal,
            "three_phase": self.three_phase,
        }


@keras.saving.register_keras_serializable(package="kerascool")
class PiecewiseLinear(keras.optimizers.schedules.LearningRateSchedule):
    """A piecewise-linear schedule from ``{step: value}``, as bert4keras's ``piecewise_linear``.

    ``{1000: 1.0, 2000: 0.1}`` goes linearly from 0 at step 0 to 1.0 at step
    1000 (with ``from_zero=True``, a point ``0: 0.0`` is added when no point is
    at step 0), down to 0.1 at step 2000, and stays at 0.1 afterwards. The
    result is multiplied by `scale`, so bert4keras's ``lr_schedule`` on top of
    a base rate reads ``PiecewiseLinear({1000: 1, 2000: 0.1}, scale=1e-3)``.

    Args:
        schedule: ``{step: value}`` with integer steps >= 0 and finite values.
        scale: multiplies every value.
        from_zero: start from ``(0, 0.0)`` when no point is given at step 0.

    >>> schedule = PiecewiseLinear({0: 1.0, 10: 0.0}, scale=2.0)
    >>> [float(schedule(t)) for t in (0, 5, 10, 20)]
    [2.0, 1.0, 0.0, 0.0]
    """

    def __init__(self, schedule: Mapping[int, float], scale: float = 1.0, from_zero: bool = True):
        if not isinstance(schedule, Mapping) or not schedule:
            raise ValueError(
                "Invalid value for argument `schedule`. Expected a non-empty dict {step: value}, "
                f"e.g. {{1000: 1.0, 2000: 0.1}}. Received: schedule={schedule!r}"
            )
        points = {}
        for step, value in schedule.items():
            if isinstance(step, str) and step.isdigit():  # keys of a config read back from JSON
                step = int(step)
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(
                    f"Invalid value for argument `schedule`. Expected integer steps >= 0. Received: step {step!r}"
                )
            points[step] = _check_number(f"schedule[{step}]", value)
        if not isinstance(from_zero, bool):
            raise TypeError(f"Invalid value for argument `from_zero`. Expected a bool. Received: from_zero={from_zero!r}")
        self.scale = _check_number("scale", scale)
        self.from_zero = from_zero
        self.schedule = dict(sorted(points.items()))
        self._points = list(self.schedule.items())
        if from_zero and self._points[0][0] != 0:
            self._points.insert(0, (0, 0.0))

    def __call__(self, step):
        t = _step(step)
        (t0, v0) = self._points[0]
        value = ops.zeros_like(t) + v0
        for (ta, va), (tb, vb) in zip(self._points, self._points[1:]):
            segment = va + (vb - va) * (t - ta) / (tb - ta)
            value = ops.where(t >= ta, segment, value)
        value = ops.where(t >= self._points[-1][0], self._points[-1][1], value)
        return value * self.scale

    def get_config(self) -> dict:
        return {"schedule": {int(k): v for k, v in self.schedule.items()}, "scale": self.scale, "from_zero": self.from_zero}
