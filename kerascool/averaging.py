"""The in-graph weight averaging shared by `EMA`, `SWA` and `Lookahead`.

One hook shape. After each real optimizer update (a step that some hook
vetoed, or a micro-step of gradient accumulation, does not count), every
averaged variable's shadow may move:

    shadow <- keep * shadow + (1 - keep) * variable

A subclass says, from the number ``n`` of real updates this averager has seen
(this one included, counting from 1), whether the shadows move (``active``)
and with which ``keep``: EMA ``keep = decay``, SWA ``keep = m / (m + 1)``
after ``m`` averaged models, Lookahead ``keep = 1 - alpha`` every ``k``
updates, then writes the result back into the weights. ``keep = 0`` copies.

The shadows are optimizer variables created when the callback gets its model,
so checkpoints and `BackupAndRestore` hold them; the `WeightSwap` over them
(`kerascool.swap`) puts them in the model for evaluation.

Non-trainable variables (BatchNorm statistics, opt-in) are averaged at the end
of the train step, after the forward pass has updated them: inside JAX's
``stateless_apply`` they are not readable, so the step's move (``keep`` and
``active``) is recorded and applied to them after the train step (``after_step``).

>>> import keras
>>> round(float(blend(keras.ops.ones(()), keras.ops.zeros(()), 0.9)), 6)
0.9
"""

from __future__ import annotations

from typing import Optional

from keras import ops

from kerascool import _core, _keras
from kerascool.swap import SwapCallbackMixin, WeightSwap


def blend(shadow, value, keep, factors: Optional[dict] = None):
    """``keep * shadow + (1 - keep) * value`` in the shadow's dtype (Keras's EMA form).

    `factors` caches ``(keep, 1 - keep)`` per dtype across the variables of one step.
    """
    dtype = shadow.dtype
    if factors is None or dtype not in factors:
        cast = ops.cast(keep, dtype)
        pair = (cast, ops.subtract(ops.cast(1, dtype), cast))
        if factors is None:
            factors = {}
        factors[dtype] = pair
    keep, move = factors[dtype]
    if value.dtype != dtype:
        value = ops.cast(value, dtype)
    return ops.add(ops.multiply(keep, shadow), ops.multiply(move, value))


def _is_float(variable) -> bool:
    return "float" in str(variable.dtype)


class Averages:
    """One model's averaging state: the averaged variables, their shadows, the swap."""

    def __init__(self):
        self.variables: list = []
        self.shadows: list = []
        self.extra_variables: list = []
        self.extra_shadows: list = []
        self.swap: Optional[WeightSwap] = None


class AveragingHook(_core.StepHook):
    """Shadows of the trainable (and opt-in non-trainable) variables, moved in the step.

    Subclasses override ``schedule`` (and ``build_schedule``/``advance`` for
    state of their own, kept on the `Averages`).
    """

    stage = "average"
    name = "average"
    write_back = False  # Lookahead: the weights take the new shadow values

    def __init__(self, include_non_trainable: bool = False):
        self.include_non_trainable = include_non_trainable
        if include_non_trainable:
            self.after_step = self._average_non_trainables

    # -- to override -----------------------------------------------------
    def build_schedule(self, state: _core.StateFactory, averages: Averages) -> None:
        """Create the subclass's own state on `averages`."""

    def schedule(self, n, averages: Averages):
        """``(active, keep)`` for real update `n` (int32 tensor, from 1).

        ``active`` is a bool tensor, or a Python bool when it does not depend
        on `n`; ``keep`` a float tensor or number.
        """
        raise NotImplementedError

    def advance(self, active, averages: Averages) -> None:
        """Update the subclass's own state; `active` says the shadows moved."""

    # -- the mechanism ---------------------------------------------------
    def layout(self, model, variables):
        extra = [(tuple(v.shape), str(v.dtype)) for v in model.non_trainable_variables if _is_float(v)]
        return (self.include_non_trainable, tuple(extra) if self.include_non_trainable else ())

    def build(self, model, variables, state):
        averages = Averages()
        averages.variables = list(variables)
        # Deterministic creation order: checkpoints restore optimizer variables by index.
        averages.shadows = [state.like(v, f"{i}") for i, v in enumerate(averages.variables)]
        averages.updates = state.variable("updates", (), "int32")
        self.build_schedule(state, averages)
        pairs = list(zip(averages.variables, averages.shadows))
        if self.include_non_trainable:
            averages.extra_variables = [v for v in model.non_trainable_variables if _is_float(v)]
            averages.extra_shadows = [state.like(v, f"nt{i}") for i, v in enumerate(averages.extra_variables)]
            averages.last_keep = state.variable("last_keep", (), "float32")
            averages.last_active = state.variable("last_active", (), "float32")
            pairs += list(zip(averages.extra_variables, averages.extra_shadows))
        averages.swap = WeightSwap(model, pairs, name=self.name)
        return averages

    def after_update(self, variables, averages, ctx):
        applied = ctx.applied
        active, keep = self.schedule(averages.updates.value + 1, averages)
        if applied is not None:
            active = applied if active is True else ops.logical_and(applied, active)
            averages.updates.assign_add(ops.cast(applied, "int32"))
        else:
            averages.updates.assign_add(1)
        if active is not False:
            self.advance(active, averages)
            factors: dict = {}
            for var, shadow in zip(variables, averages.shadows):
                new = blend(shadow.value, var.value, keep, factors)
                if active is not True:
                    new = ops.where(active, new, shadow.value)
                shadow.assign(new)
                if self.write_back:
                    # A copy: on JAX two outputs sharing one buffer break the next donation.
                    fast = _keras.snapshot(new)
                    var.assign(fast if active is True else ops.where(active, fast, var.value))
        if self.include_non_trainable:
            averages.last_keep.assign(ops.cast(keep, "float32"))
            moved = 1.0 if active is True else 0.0 if active is False else ops.cast(active, "float32")
            averages.last_active.assign(moved)

    def _average_non_trainables(self, model, averages) -> None:
        """After the train step: move the non-trainable shadows as the step moved the others."""
        active, factors = ops.greater(averages.last_active.value, 0.0), {}
        for var, shadow in zip(averages.extra_variables, averages.extra_shadows):
            new = blend(shadow.value, var.value, averages.last_keep.value, factors)
            shadow.assign(ops.where(active, new, shadow.value))

    def average_now(self, averages: Averages, keep) -> None:
        """Move every shadow once, eagerly (between steps: SWA per epoch)."""
        _keras.sync_state(averages.swap.model)
        factors: dict = {}
        for var, shadow in averages.swap.pairs:
            shadow.assign(blend(shadow.value, var.value, keep, factors))


class AveragingCallback(SwapCallbackMixin, _core.HookCallback):
    """Base of `EMA` and `SWA`: an `AveragingHook` plus the swap for evaluation."""

    def __init__(self, hook: AveragingHook, validation: str, swap_at_end: bool):
        super().__init__()
        self._init_swap(validation, swap_at_end, average_name=hook.name)
        self._hook = hook

    def step_hooks(self):
        return [self._hook]

    def _averages(self) -> Optional[Averages]:
        return self._state(self._hook)

    def _current_swap(self) -> Optional[WeightSwap]:
        averages = self._averages()
        return None if averages is None else averages.swap

    def _swap_ready(self) -> bool:
        return True

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        self._finish_swaps()


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected an integer >= {minimum}. Received: {name}={value!r}"
        )
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"Invalid value for argument `{name}`. Expected a bool. Received: {name}={value!r}")
    return value
