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
``active``) is recorded and applied to them after the train step (`_keras.add_step_work`).

>>> import keras
>>> round(float(blend(keras.ops.ones(()), keras.ops.zeros(()), 0.9)), 6)
0.9
"""

from __future__ import annotations

from typing import Optional

from keras import ops

from kerascool import _keras
from kerascool import hook as hook_lib
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


class AveragingHook(hook_lib.StepHook):
    """Shadows of the trainable (and opt-in non-trainable) variables, moved in the step.

    Subclasses override ``schedule`` (and ``build_schedule``/``advance`` for
    state of their own).
    """

    order = hook_lib.AVERAGE
    name = "average"
    write_back = False  # Lookahead: the weights take the new shadow values

    def __init__(self, include_non_trainable: bool = False):
        self.include_non_trainable = include_non_trainable
        self.variables: list = []
        self.shadows: list = []
        self.extra_variables: list = []
        self.extra_shadows: list = []
        self.swap: Optional[WeightSwap] = None

    # -- to override -----------------------------------------------------
    def build_schedule(self, state: hook_lib.HookState) -> None:
        """Create the subclass's own state."""

    def schedule(self, n):
        """``(active, keep)`` for real update `n` (int32 tensor, from 1).

        ``active`` is a bool tensor, or a Python bool when it does not depend
        on `n`; ``keep`` a float tensor or number.
        """
        raise NotImplementedError

    def advance(self, active) -> None:
        """Update the subclass's own state; `active` says the shadows moved."""

    # -- the mechanism ---------------------------------------------------
    def build(self, model, variables, state):
        self.variables = list(variables)
        # Deterministic creation order: checkpoints restore optimizer variables by index.
        self.shadows = [state.like(v, f"{i}") for i, v in enumerate(self.variables)]
        self.updates = state.variable("updates", (), "int32")
        self.build_schedule(state)
        pairs = list(zip(self.variables, self.shadows))
        if self.include_non_trainable:
            self.extra_variables = [v for v in model.non_trainable_variables if _is_float(v)]
            self.extra_shadows = [state.like(v, f"nt{i}") for i, v in enumerate(self.extra_variables)]
            self.last_keep = state.variable("last_keep", (), "float32")
            self.last_active = state.variable("last_active", (), "float32")
            _keras.add_step_work(model, "kerascool_averages", _keras.StepWork(after=_average_non_trainables))
            pairs += list(zip(self.extra_variables, self.extra_shadows))
        self.swap = WeightSwap(model, pairs, name=self.name)

    def after_update(self, variables, ctx):
        applied = ctx.applied
        active, keep = self.schedule(self.updates.value + 1)
        if applied is not None:
            active = applied if active is True else ops.logical_and(applied, active)
            self.updates.assign_add(ops.cast(applied, "int32"))
        else:
            self.updates.assign_add(1)
        if active is not False:
            self.advance(active)
            factors: dict = {}
            for var, shadow in zip(variables, self.shadows):
                new = blend(shadow.value, var.value, keep, factors)
                if active is not True:
                    new = ops.where(active, new, shadow.value)
                shadow.assign(new)
                if self.write_back:
                    # A copy: on JAX two outputs sharing one buffer break the next donation.
                    fast = _keras.snapshot(new)
                    var.assign(fast if active is True else ops.where(active, fast, var.value))
        if self.include_non_trainable:
            self.last_keep.assign(ops.cast(keep, "float32"))
            moved = 1.0 if active is True else 0.0 if active is False else ops.cast(active, "float32")
            self.last_active.assign(moved)

    def average_non_trainable(self) -> None:
        """Move the non-trainable shadows as the step moved the others (after the step)."""
        active, factors = ops.greater(self.last_active.value, 0.0), {}
        for var, shadow in zip(self.extra_variables, self.extra_shadows):
            new = blend(shadow.value, var.value, self.last_keep.value, factors)
            shadow.assign(ops.where(active, new, shadow.value))

    def average_now(self, keep) -> None:
        """Move every shadow once, eagerly (between steps: SWA per epoch)."""
        _keras.sync_state(self.swap.model)
        factors: dict = {}
        for var, shadow in self.swap.pairs:
            shadow.assign(blend(shadow.value, var.value, keep, factors))


def _average_non_trainables(model) -> None:
    # Runs at trace time of the train step: only hooks attached to this fit count.
    for hook in hook_lib.registry_for(model).hooks:
        if isinstance(hook, AveragingHook) and hook.include_non_trainable:
            hook.average_non_trainable()


class AveragingCallback(SwapCallbackMixin, hook_lib.HookCallback):
    """Base of `EMA` and `SWA`: an `AveragingHook` plus the swap for evaluation."""

    def __init__(self, hook: AveragingHook, validation: str, swap_at_end: bool):
        super().__init__()
        self._init_swap(validation, swap_at_end, average_name=hook.name)
        self._hook = hook

    def step_hooks(self):
        return [self._hook]

    def _current_swap(self) -> Optional[WeightSwap]:
        return self._hook.swap

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
