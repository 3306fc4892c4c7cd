"""`GradientTransform`: a callback that runs gradient transformations in `fit`."""

from __future__ import annotations

from typing import Optional

from keras import ops

from kerascool import _core
from kerascool.transforms import GradientTransformation, as_transformation, chain, global_norm, layer_of

_LOG_NORMS = (None, "global", "layer")


class GradientTransform(_core.HookCallback):
    """Transform the gradients between the loss and the user's stock optimizer.

    The transformations run in order inside the compiled train step, on the
    true (unscaled, and under MirroredStrategy globally reduced) gradients.

    Args:
        *transforms: `GradientTransformation`s such as `ClipByLayerNorm(1.0)`,
            combined with `masked(...)` to act on chosen layers only.
        log_norms: ``"global"`` adds ``grad_norm`` (the norm of the incoming
            gradient, epoch mean) to the logs; ``"layer"`` adds one
            ``grad_norm/<layer path>`` per layer as well; ``None`` logs nothing.

    Example:

    >>> import numpy as np, keras, kerascool
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> clip = kerascool.GradientTransform(kerascool.ClipByLayerNorm(1.0), log_norms="global")
    >>> history = model.fit(np.ones((8, 4)), np.ones((8, 1)), epochs=1, verbose=0, callbacks=[clip])
    >>> "grad_norm" in history.history
    True
    """

    def __init__(self, *transforms: GradientTransformation, log_norms: Optional[str] = None):
        super().__init__()
        if not transforms:
            raise ValueError("GradientTransform needs at least one transformation, e.g. kerascool.ClipByNorm(1.0).")
        if log_norms not in _LOG_NORMS:
            raise ValueError(
                f"Invalid value for argument `log_norms`. Expected one of {_LOG_NORMS}. Received: log_norms={log_norms!r}"
            )
        self.transform = chain(*[as_transformation(t) for t in transforms])
        self.log_norms = log_norms
        self._hook = _TransformHook(self.transform, log_norms)

    def step_hooks(self):
        return [self._hook]

    def on_epoch_begin(self, epoch, logs=None):
        state = self._state()
        for total, count in (state["means"].values() if state else ()):
            total.assign(0.0)
            count.assign(0.0)

    def get_config(self) -> dict:
        return {"transforms": [repr(t) for t in self.transform.transforms], "log_norms": self.log_norms}


class _TransformHook(_core.StepHook):
    stage = "transform"
    name = "grads"

    def __init__(self, transform: GradientTransformation, log_norms: Optional[str]):
        self.transform = transform
        self.log_norms = log_norms

    def layout(self, model, variables):
        return (repr(self.transform), self.log_norms)

    def check(self, model, variables):
        self.transform.check(variables)

    def build(self, model, variables, state):
        names = []
        if self.log_norms:
            names.append("grad_norm")
        if self.log_norms == "layer":
            names += sorted({f"grad_norm/{layer_of(v)}" for v in variables})
        means = {}
        for i, name in enumerate(names):
            means[name] = (state.variable(f"mean{i}_sum"), state.variable(f"mean{i}_count"))
            state.log_slot(name)
        return {"transform": self.transform.init(variables, state), "means": means}

    def _log_mean(self, ctx, means, name, value):
        # Mean over the steps actually applied: a step vetoed by SkipNonFinite
        # (NaN norm) would otherwise turn the epoch mean into NaN for good.
        total, count = means[name]
        applied = ops.ones((), "bool") if ctx.applied is None else ctx.applied
        total.assign_add(ops.where(applied, ops.cast(value, total.dtype), 0.0))
        count.assign_add(ops.cast(applied, count.dtype))
        ctx.log(name, total.value / ops.maximum(count.value, 1.0))

    def before_update(self, grads, variables, state, ctx):
        norms = {}
        if self.log_norms:
            norms["grad_norm"] = global_norm(grads)  # of the incoming gradients
        if self.log_norms == "layer":
            by_layer: dict = {}
            for g, v in zip(grads, variables):
                by_layer.setdefault(layer_of(v), []).append(g)
            for layer, gs in by_layer.items():
                norms[f"grad_norm/{layer}"] = global_norm(gs)
        grads = self.transform.update(grads, state["transform"], variables, ctx)
        for name, value in norms.items():  # after the transforms: they may veto the step
            self._log_mean(ctx, state["means"], name, value)
        return grads
