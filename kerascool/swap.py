"""Swapping shadow variables into a model and back: one mechanism for every average.

A `WeightSwap` pairs model variables with shadow variables (the EMA's or the
SWA's averages). ``swap_in()`` writes the shadows into the model,
``swap_out()`` puts the model's own values back, bit for bit. Both are
idempotent, and ``swapped()`` is the context manager built on them.

The raw values are kept on the host while swapped (not as a second device
copy), and the shadows themselves are never written: a checkpoint saved while
swapped holds the averages in both the model and the optimizer.

Exception safety: the first swap on a model guards that model's ``evaluate``
and ``predict`` (instance attributes; ``fit``'s validation calls
``self.evaluate``): whatever a call swapped in and did not swap out, an
exception or a KeyboardInterrupt included, is swapped out when the call ends.
A swap opened before the call (``with swap.swapped(): model.evaluate(...)``)
is left alone.

Several swaps may be active on one model: the last one swapped in shows, and
the model's own values come back once all are swapped out. Checkpoints: while
a callback made by ``with_averages`` runs, the model's ``save`` and
``save_weights`` (guarded as well) swap the averages in around the save.

>>> import keras
>>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
>>> shadow = keras.Variable(keras.ops.ones((2, 1)))
>>> swap = WeightSwap(model, [(model.weights[0], shadow)])
>>> raw = model.get_weights()[0]
>>> with swap.swapped():
...     float(model.get_weights()[0].sum())
2.0
>>> bool((model.get_weights()[0] == raw).all())
True
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator, Sequence

import keras

from kerascool import _keras
from kerascool._core.installation import installation_of

_GUARDED = ("evaluate", "predict", "save", "save_weights")


class WeightSwap:
    """Shadow variables that can stand in for a model's variables.

    Args:
        model: the Keras model that owns the variables.
        pairs: ``(model_variable, shadow_variable)`` pairs, same shapes.
        name: used in log names (``val_<name>_loss``) and messages.
    """

    def __init__(self, model, pairs: Sequence[tuple], name: str = "average"):
        self._model = weakref.ref(model)
        self.pairs = list(pairs)
        self.name = name
        swaps_of(model)  # guard evaluate/predict now: fit may be about to call them

    @property
    def model(self):
        return self._model()

    @property
    def is_swapped(self) -> bool:
        return self in swaps_of(self.model).active

    def swap_in(self) -> bool:
        """Write the shadows into the model. False if they were already in."""
        return swaps_of(self.model).enter(self)

    def swap_out(self) -> bool:
        """Put the model's own values back. False if nothing was swapped in."""
        return swaps_of(self.model).leave(self)

    @contextlib.contextmanager
    def swapped(self) -> Iterator["WeightSwap"]:
        """The shadows in the model for the block; its own values back afterwards.

        Nested use is fine: only the outermost block swaps back.
        """
        entered = self.swap_in()
        try:
            yield self
        finally:
            if entered:
                self.swap_out()


class _ModelSwaps:
    """The swap state of one model: active swaps, raw values, method guards."""

    def __init__(self, model):
        self._model = weakref.ref(model)
        self.active: list[WeightSwap] = []
        self._backup: dict[int, tuple] = {}  # id(variable) -> (variable, host copy of its own value)
        self.saving_with: list = []  # callbacks whose averages show while the model is saved
        self.fit_validation = False  # inside fit's validation (an `evaluate` call made by fit)
        self.extra_validations: list[WeightSwap] = []  # one more validation pass per swap
        for name in _GUARDED:
            self._guard(model, name)

    @property
    def model(self):
        return self._model()

    # -- swapping ----------------------------------------------------------
    def enter(self, swap: WeightSwap) -> bool:
        if swap in self.active:
            return False
        # JAX: the trainer may hold newer values than the variables; write them back first.
        _keras.sync_state(self.model)
        self._keep([var for var, _ in swap.pairs])
        self.active.append(swap)
        try:
            self._show(swap)
        except BaseException:  # interrupted half-way: nothing half-swapped stays
            self.leave(swap)
            raise
        return True

    def leave(self, swap: WeightSwap) -> bool:
        if swap not in self.active:
            return False
        _keras.sync_state(self.model)
        remaining = [other for other in self.active if other is not swap]
        for var, value in self._backup.values():
            var.assign(value)
        for other in remaining:  # the swaps still open show again, in order
            self._show(other)
        # Only now: interrupted above, the swap is still active and its raw values kept (retry).
        self.active = remaining
        if not remaining:
            self._backup.clear()
        return True

    def protect(self, variables: Sequence) -> None:
        """Keep the current values of `variables` to restore when the swaps end.

        For code that changes model state while a swap is active (such as
        recomputing BatchNorm statistics for the averages): a no-op when no
        swap is active.
        """
        if self.active:
            _keras.sync_state(self.model)
            self._keep(variables)

    def _keep(self, variables: Sequence) -> None:
        for var in variables:
            if id(var) not in self._backup:
                self._backup[id(var)] = (var, _keras.host_copy(var))

    def _show(self, swap: WeightSwap) -> None:
        for var, shadow in swap.pairs:
            # A real copy: on JAX two variables sharing one buffer break the next donation.
            var.assign(_keras.snapshot(shadow.value))

    def _restore_new(self, before: list) -> None:
        for swap in reversed(list(self.active)):
            if swap not in before:
                self.leave(swap)

    # -- guards --------------------------------------------------------------
    def _guard(self, model, name: str) -> None:
        original = getattr(model, name)
        swaps = self

        if name == "evaluate":

            def guarded(*args, **kwargs):
                before, outer = list(swaps.active), (swaps.fit_validation, swaps.extra_validations)
                swaps.fit_validation, swaps.extra_validations = _keras.is_fit_validation(kwargs), []
                try:
                    logs = original(*args, **kwargs)
                    extra, swaps.extra_validations = swaps.extra_validations, []
                    for swap in extra:
                        logs = swaps._validate_again(original, swap, logs, args, kwargs)
                    return logs
                finally:
                    swaps.fit_validation, swaps.extra_validations = outer
                    swaps._restore_new(before)

        elif name == "predict":

            def guarded(*args, **kwargs):
                before = list(swaps.active)
                try:
                    return original(*args, **kwargs)
                finally:
                    swaps._restore_new(before)

        else:  # save, save_weights: checkpoints asked to hold the averages

            def guarded(*args, **kwargs):
                with contextlib.ExitStack() as stack:
                    for owner in list(swaps.saving_with):
                        swap = owner._current_swap()
                        if swap is not None and owner._swap_ready():
                            stack.enter_context(swap.swapped())
                    return original(*args, **kwargs)

        guarded.__wrapped__ = original
        guarded.__doc__ = original.__doc__
        # Instance attribute: shadows the class method for this model only, undone by uninstall.
        installation_of(model).shadow(model, name, guarded)

    def _validate_again(self, evaluate, swap: WeightSwap, logs, args, kwargs):
        """Run fit's validation once more with `swap` in; add its logs as ``<name>_<key>``."""
        if not isinstance(logs, dict):  # fit asks for a dict; anything else is not fit's call
            return logs
        with swap.swapped():
            more = evaluate(*args, **{**kwargs, "callbacks": None, "verbose": 0})
        return {**logs, **{f"{swap.name}_{key}": value for key, value in more.items()}}


_SWAPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def swaps_of(model) -> _ModelSwaps:
    """The swap state of `model` (guards its evaluate/predict/save on first use)."""
    swaps = _SWAPS.get(model)
    if swaps is None:
        swaps = _SWAPS[model] = _ModelSwaps(model)
        installation_of(model).on_uninstall(lambda: _forget(model))
    return swaps


def swaps_if_any(model):
    """The swap state of `model`, or None if no swap was ever made on it."""
    return _SWAPS.get(model)


def _forget(model) -> None:
    swaps = _SWAPS.pop(model, None)
    if swaps is not None:
        for swap in reversed(list(swaps.active)):
            swaps.leave(swap)


def protect(model, variables: Sequence) -> None:
    """Have the swaps active on `model` restore `variables` too when they end."""
    swaps = _SWAPS.get(model)
    if swaps is not None:
        swaps.protect(variables)


class SwapCallbackMixin:
    """Callback side of a `WeightSwap`: evaluation, prediction, checkpoints.

    For a `keras.callbacks.Callback` subclass that provides ``_current_swap()``
    (the `WeightSwap` of its averages, or None before they exist) and
    ``_swap_ready()`` (whether the averages are worth showing yet).

    ``validation`` decides what ``fit``'s validation sees: ``"average"`` the
    averages; ``"raw"`` the model's own weights; ``"both"`` the model's own
    weights under the usual names and the averages as ``val_<name>_*`` (a
    second validation pass). ``evaluate(..., callbacks=[cb])`` and
    ``predict(..., callbacks=[cb])`` always use the averages.
    """

    def _init_swap(self, validation: str, swap_at_end: bool, average_name: str) -> None:
        choices = (average_name, "raw", "both")
        if validation not in choices:
            raise ValueError(
                f"Invalid value for argument `validation`. Expected one of {choices}. "
                f"Received: validation={validation!r}"
            )
        if not isinstance(swap_at_end, bool):
            raise TypeError(
                f"Invalid value for argument `swap_at_end`. Expected a bool. Received: swap_at_end={swap_at_end!r}"
            )
        self.validation = "average" if validation == average_name else validation
        self.swap_at_end = swap_at_end
        self._swapped_by: dict[str, bool] = {}

    # -- public --------------------------------------------------------------
    def swapped(self):
        """Context manager: the averages in the model for the block.

        >>> # with ema.swapped(): model.save("ema.keras")
        """
        swap = self._require_swap()
        if not self._swap_ready():
            raise ValueError(f"{type(self).__name__} has averaged no weights yet: there is nothing to swap in.")
        return swap.swapped()

    def with_averages(self, callback: keras.callbacks.Callback) -> keras.callbacks.Callback:
        """Make `callback` save the averages: returns `callback` itself.

        Whenever `callback` saves the model (``model.save`` or
        ``save_weights``, as `keras.callbacks.ModelCheckpoint` does) the
        averages are swapped in for the save and out again, whatever the
        order of the callback list. Other callbacks, `BackupAndRestore`
        included, keep saving the raw training state. To monitor
        ``val_ema_loss`` (``validation="both"``) pass ``mode="min"``: Keras
        cannot tell the direction of a metric name it does not know.
        """
        owner = self

        for name in ("on_epoch_end", "on_train_batch_end", "on_train_end"):
            original = getattr(callback, name, None)
            if original is None:
                continue

            def wrapped(*args, _original=original, **kwargs):
                # Cheap per batch: the swap itself happens only if the model is saved.
                swap = owner._current_swap()
                if swap is None:
                    return _original(*args, **kwargs)
                saving = swaps_of(swap.model).saving_with
                saving.append(owner)
                try:
                    return _original(*args, **kwargs)
                finally:
                    saving.remove(owner)

            setattr(callback, name, wrapped)
        return callback

    # -- callback methods -------------------------------------------------
    def _swap_in_for(self, event: str) -> None:
        swap = self._current_swap()
        if swap is None or not self._swap_ready():
            return
        self._swapped_by[event] = swap.swap_in()

    def _swap_out_for(self, event: str) -> None:
        if self._swapped_by.pop(event, False):
            self._current_swap().swap_out()

    def on_test_begin(self, logs=None):
        swap = self._current_swap()
        if swap is None:
            return
        swaps = swaps_of(swap.model)
        if swaps.fit_validation and self.validation != "average":
            if self.validation == "both" and self._swap_ready():
                swaps.extra_validations.append(swap)
            return
        self._swap_in_for("test")

    def on_test_end(self, logs=None):
        self._swap_out_for("test")

    def on_predict_begin(self, logs=None):
        self._require_swap()
        self._swap_in_for("predict")

    def on_predict_end(self, logs=None):
        self._swap_out_for("predict")

    def _finish_swaps(self) -> None:
        """At the end of training: put the averages in for good if asked."""
        swap = self._current_swap()
        if swap is None or not self.swap_at_end or not self._swap_ready():
            return
        swaps = swaps_of(swap.model)
        swap.swap_out()
        _keras.sync_state(swap.model)
        swaps._show(swap)

    def _require_swap(self) -> WeightSwap:
        swap = self._current_swap()
        if swap is None:
            raise ValueError(
                f"{type(self).__name__} has no averages yet: train with "
                f"`model.fit(..., callbacks=[{type(self).__name__.lower()}])` first "
                "(its model must be compiled)."
            )
        return swap
