"""`AnnealVariable`: set a `keras.Variable` from a schedule during `fit`.

A loss weight, a KL weight, a temperature, a dropout-like knob: any variable
that the model's layers or its loss read. Per step the value is set inside
the compiled train step, before the forward pass (no Python per batch, no
retrace when it changes); per epoch it is set from Python between epochs.

The variable must be part of the model's state, a non-trainable variable of
the model or of one of its layers (``self.beta = keras.Variable(0.0,
trainable=False)`` in a layer's ``__init__``, or ``model.beta = beta``). On
JAX the compiled step reads its variables from the state it is handed: a
variable outside the model's state is frozen at its value when the step was
traced, so later changes would be silently ignored. The same rule holds on
every backend, so code moves between them unchanged; an error says so
before training starts.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Union

import keras
import numpy as np
from keras import ops

from kerascool import _core
from kerascool.schedules import PiecewiseLinear

_PER = ("step", "epoch")


class AnnealVariable(_core.HookCallback):
    """Set `variable` from `schedule` per step (inside the compiled step) or per epoch.

    Per step, the forward pass and loss of update ``t`` (``t = 0, 1, ...``
    real updates made before it, the shared kerascool counter, which persists
    across ``fit`` calls and checkpoints) see ``schedule(t)``. Per epoch, epoch
    ``e`` (``fit``'s epoch index) sees ``schedule(e)``. After ``fit`` the
    variable holds the last value used.

    Args:
        variable: a non-trainable `keras.Variable` of the model's state (see
            the module docstring).
        schedule: ``fn(t)``, a `LearningRateSchedule` such as
            `kerascool.OneCycle`, or a dict ``{step: value}`` read as
            `kerascool.PiecewiseLinear` (so ``{1000: 1.0}`` warms up from 0 to
            1 over 1000 steps). Per step it runs at trace time on a float32
            scalar tensor and must use `keras.ops`; per epoch it gets a Python
            int and may be any Python. Its value is broadcast to the
            variable's shape.
        per: ``"step"`` or ``"epoch"``.
        log_as: also show the value in the logs (progress bar, History) under
            this name; a scalar variable only.

    >>> import numpy as np, keras, kerascool
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> model.beta = keras.Variable(0.0, trainable=False, name="beta")
    >>> model.compile(optimizer="sgd", loss=lambda y, p: model.beta * keras.ops.mean((y - p) ** 2))
    >>> anneal = kerascool.AnnealVariable(model.beta, {4: 1.0}, log_as="beta")
    >>> history = model.fit(np.ones((8, 2)), np.ones((8, 1)), batch_size=4, epochs=2, verbose=0, callbacks=[anneal])
    >>> history.history["beta"], float(model.beta.numpy())
    ([0.25, 0.75], 0.75)
    """

    def __init__(
        self,
        variable: keras.Variable,
        schedule: Union[Callable, Mapping[int, float]],
        per: str = "step",
        log_as: Optional[str] = None,
    ):
        super().__init__()
        if not isinstance(variable, keras.Variable):
            raise TypeError(
                f"Invalid value for argument `variable`. Expected a keras.Variable. Received: variable={variable!r}"
            )
        if variable.trainable:
            raise ValueError(
                f"Invalid value for argument `variable`: {variable.path!r} is trainable, so the optimizer would "
                "change it too. Create it with `keras.Variable(..., trainable=False)`."
            )
        if isinstance(schedule, Mapping):
            schedule = PiecewiseLinear(schedule)
        if not callable(schedule):
            raise TypeError(
                "Invalid value for argument `schedule`. Expected a callable fn(step) -> value, a "
                f"LearningRateSchedule or a dict {{step: value}}. Received: schedule={schedule!r}"
            )
        if per not in _PER:
            raise ValueError(f"Invalid value for argument `per`. Expected one of {_PER}. Received: per={per!r}")
        if log_as is not None and (not isinstance(log_as, str) or not log_as):
            raise ValueError(f"Invalid value for argument `log_as`. Expected a non-empty name. Received: log_as={log_as!r}")
        if log_as is not None and tuple(variable.shape) != ():
            raise ValueError(
                f"Invalid value for argument `log_as`: only a scalar variable can be logged; {variable.path!r} "
                f"has shape {tuple(variable.shape)}. Received: log_as={log_as!r}"
            )
        self.variable = variable
        self.schedule = schedule
        self.per = per
        self.log_as = log_as
        self._hook = _AnnealHook(self)

    # -- values ---------------------------------------------------------------
    def value_at(self, t):
        """The value for step (or epoch) `t`, cast and broadcast to the variable."""
        value = self.schedule(ops.cast(t, "float32") if self.per == "step" else t)
        value = ops.cast(value, self.variable.dtype)
        if tuple(value.shape) != tuple(self.variable.shape):
            try:
                value = ops.broadcast_to(value, self.variable.shape)
            except Exception:  # noqa: BLE001 (each backend raises its own type)
                raise ValueError(
                    f"The schedule of {self.variable.path!r} returned a value of shape {tuple(value.shape)}, "
                    f"which does not broadcast to the variable's shape {tuple(self.variable.shape)}."
                ) from None
        return value

    def _eager_value(self, t) -> np.ndarray:
        return np.asarray(ops.convert_to_numpy(self.value_at(t)), dtype=self.variable.dtype)

    # -- callback ---------------------------------------------------------------
    def _check_model(self, model) -> None:
        if not any(v is self.variable for v in model.non_trainable_variables):
            raise ValueError(
                f"AnnealVariable: the variable {self.variable.path!r} is not part of the model's state, so the "
                "compiled train step would not see its new values (on JAX it is read once, when the step is "
                "traced). Make it a non-trainable variable of the model or of one of its layers: "
                "`self.beta = keras.Variable(0.0, trainable=False)` in a layer's `__init__`, or `model.beta = beta`."
            )
        if self.per == "step":
            super()._check_model(model)

    def set_model(self, model) -> None:
        if self.per == "step":
            super().set_model(model)  # builds the shared step counter before any BackupAndRestore
        else:
            keras.callbacks.Callback.set_model(self, model)

    def step_hooks(self):
        return [self._hook] if self.per == "step" else []

    def on_train_begin(self, logs=None) -> None:
        if self.per == "epoch":
            self._check_model(self.model)  # per step: checked when fit installs the hook

    def on_epoch_begin(self, epoch, logs=None) -> None:
        if self.per == "epoch":
            self.variable.assign(self._eager_value(epoch))

    def on_epoch_end(self, epoch, logs=None) -> None:
        if self.per == "epoch" and self.log_as is not None and logs is not None:
            logs[self.log_as] = float(np.asarray(self.variable.numpy()))

    def get_config(self) -> dict:
        schedule = self.schedule
        if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            schedule = keras.optimizers.schedules.serialize(schedule)
        else:
            schedule = getattr(schedule, "__name__", repr(schedule))
        return {"variable": self.variable.path, "schedule": schedule, "per": self.per, "log_as": self.log_as}


class _AnnealHook(_core.StepHook):
    """Sets the variable at the start of each step from the shared step counter; logs it."""

    stage = "transform"
    name = "anneal"

    def __init__(self, owner: AnnealVariable):
        self.owner = owner

    def state_key(self) -> str:
        return f"anneal/{self.owner.variable.path}"

    def build(self, model, variables, state):
        if self.owner.log_as is not None:
            state.log_slot(self.owner.log_as)
        return {}

    def start(self, model, state) -> None:
        # The value for the first update, set now: the variable is right before the first
        # step, and on JAX its (possibly weakly typed) initial value gets the type the step
        # writes, so that the first step is not traced twice.
        steps = _core.installation_of(model).steps
        self.owner.variable.assign(self.owner._eager_value(steps.value))

    def before_step(self, model, state) -> None:
        self.owner.variable.assign(self.owner.value_at(_core.installation_of(model).steps.value))

    def before_update(self, grads, variables, state, ctx):
        if self.owner.log_as is not None:
            # Recomputed from the counter: on JAX the model's own variables are not
            # readable inside `apply` (only the optimizer's are).
            ctx.log(self.owner.log_as, self.owner.value_at(ctx.step))
        return grads
