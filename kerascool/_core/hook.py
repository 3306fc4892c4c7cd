"""What a feature is to the installation: a `StepHook` in a named stage, with its own state.

A hook never keeps per-model state on ``self``: ``build`` returns the state
(optimizer variables, and Python facts about the variables), the
installation keeps it for that model, and hands it back to every other
method, as optax's ``init``/``update`` do. One hook instance may so serve
several models, and a new instance in every ``fit`` finds the state of the
one before (same ``state_key`` and layout) instead of adding a copy.

Hooks run by stage, ``gradient`` (a second gradient: SAM, Heun),
``accumulate``, ``transform``, ``rescale`` (layer rates), ``lookahead``,
``average`` (EMA, SWA), and within a stage in the order they were installed.
Within one train step:

1. ``before_update`` of every hook (gradient work; a hook may veto the
   update with ``ctx.skip_unless(pred)``);
2. the user's stock optimizer (``apply``), skipped exactly where vetoed;
3. the shared counter of real updates moves by one (real updates only);
4. ``after_update`` of every hook (work on the updated variables).

Work that needs the batch, the start or the end of the whole train step goes
in ``before_step`` / ``around_step`` / ``after_step`` (see `Installation`).
"""

from __future__ import annotations

from typing import Optional

import keras
from keras import ops

from kerascool import _keras

STAGES = ("gradient", "accumulate", "transform", "rescale", "lookahead", "average")


class StepContext:
    """What the hooks see during one (traced) train step."""

    def __init__(self, installation, variables: list, optimizer):
        self.installation = installation
        self.model = installation.model  # never `Callback.model`: on JAX it syncs state
        self.optimizer = optimizer
        self.variables = variables
        self.step = _keras.snapshot(installation.steps.value)  # real updates so far
        self.applied = None  # None: always applied; else a bool tensor
        self.old_values: Optional[list] = None  # weights before the update

    def skip_unless(self, pred) -> None:
        """Apply the optimizer update only where `pred` (a bool tensor) holds."""
        pred = ops.cast(pred, "bool")
        self.applied = pred if self.applied is None else ops.logical_and(self.applied, pred)

    def where_applied(self, new, old):
        """`new` on a real update, `old` on a skipped one."""
        if self.applied is None:
            return new
        return ops.where(self.applied, new, old)

    def log(self, name: str, value) -> None:
        """Show `value` under `name` in this step's logs (declared with ``state.log_slot``)."""
        self.installation.write_log(name, value)


class StateFactory:
    """Creates one hook's state as variables of the model's optimizer."""

    def __init__(self, installation, prefix: str):
        self._installation = installation
        self._prefix = prefix

    def variable(self, name: str, shape=(), dtype=None, initializer="zeros") -> keras.Variable:
        return self._installation.add_variable(f"{self._prefix}_{name}", shape, dtype, initializer)

    def like(self, reference, name: str) -> keras.Variable:
        """A new variable shaped and typed like `reference`, holding a copy of it."""
        var = self.variable(name, reference.shape, reference.dtype)
        var.assign(_keras.snapshot(reference.value))
        return var

    def log_slot(self, name: str) -> None:
        """Declare a log key this hook writes with ``ctx.log(name, value)``."""
        self._installation.log_slot(name)


class StepHook:
    """Per-step work inside the compiled train step. Subclass and override.

    ``check`` and ``build`` run eagerly when a ``fit`` starts (``check``
    first, for every hook, before anything is created); the step methods run
    at trace time and use `keras.ops` only.
    """

    stage: str = "transform"
    name: str = "hook"  # shown by `kerascool.installed`
    needs_old_values: bool = False  # ask for ctx.old_values (costs a copy of the weights)

    def state_key(self) -> str:
        """Which state of the model this hook uses: equal keys share (reuse) it."""
        return self.name

    def layout(self, model, variables: list) -> tuple:
        """What the state's variables depend on besides the trainable variables' shapes."""
        return ()

    def check(self, model, variables: list) -> None:
        """Raise on bad input before anything is created (model left untouched)."""

    def build(self, model, variables: list, state: StateFactory):
        """Create and return the state. `variables`: trainable variables in gradient order."""
        return None

    def start(self, model, state) -> None:
        """Eager work at the start of every fit that uses this hook, after `build`."""

    def before_update(self, grads: list, variables: list, state, ctx: StepContext) -> list:
        return grads

    def after_update(self, variables: list, state, ctx: StepContext) -> None:
        pass

    # Train-step work (None: none). before_step(model, state) and
    # after_step(model, state) may assign variables; around_step(model, data,
    # step_state, state) returns a context manager entered around the stock step.
    before_step = None
    around_step = None
    after_step = None
