"""`HookCallback`: a callback whose work is a set of `StepHook`s during one `fit`."""

from __future__ import annotations

from typing import Sequence

import keras

from kerascool._core.hook import StepHook
from kerascool._core.installation import installation_of


class HookCallback(keras.callbacks.Callback):
    """Base for callbacks whose work runs inside `fit`'s compiled step.

    ``set_model`` announces the callback to the model's installation; when
    ``fit`` starts (its ``make_train_function``, before any
    ``on_train_begin``, so that a `BackupAndRestore` listed anywhere finds
    the state) the hooks are checked and their state is built or reused;
    they leave at ``on_train_end``. Given to ``evaluate`` or ``predict`` the
    callback creates nothing.
    """

    def step_hooks(self) -> Sequence[StepHook]:
        raise NotImplementedError

    def _check_model(self, model) -> None:
        """Raise before training starts when the model cannot take the hooks."""
        if not getattr(model, "compiled", False) or getattr(model, "optimizer", None) is None:
            raise ValueError(
                f"{type(self).__name__} needs a compiled model with an optimizer. "
                "Call `model.compile(optimizer=..., loss=...)` before `fit`."
            )

    def set_model(self, model) -> None:
        super().set_model(model)
        installation_of(model).expect(self)

    def _state(self, hook=None):
        """This callback's state on its current model (None before it was built)."""
        installation = installation_of(self._model_ref(), create=False) if self._model_ref() is not None else None
        if installation is None:
            return None
        return installation.state_of(hook if hook is not None else self.step_hooks()[0])

    def _model_ref(self):
        # `Callback.model` syncs JAX state on every read; the raw attribute does not.
        return self.__dict__.get("_model")

    def on_train_end(self, logs=None) -> None:
        installation = installation_of(self._model_ref(), create=False)
        if installation is not None:
            installation.release(self)
