"""`GradientAccumulation`: one optimizer update per `steps` micro-batches ("soft batch").

With micro-batches of size b and ``steps=k``, every k-th train step applies the
mean of the last k micro-batch gradients: the same update as one step on a
batch of k*b samples, at the activation memory of a batch of b.

Conventions (why they matter: schedules and averages must see the big batch):

- On the k-1 micro-steps between updates the weights, the optimizer's state
  and its ``iterations`` keep their exact old values, and kerascool's shared
  real-step counter (`kerascool.real_steps`) does not move. Learning-rate
  schedules, Adam's bias correction, EMA, Lookahead and layer-rate schedules
  therefore all count real updates, as in the big-batch run. (Keras's own
  ``gradient_accumulation_steps`` feeds learning-rate schedules the micro-step
  count instead; with a constant learning rate both agree.)
- ``fit``'s progress bar, ``steps_per_epoch``, metrics and per-batch callbacks
  count micro-batches: the loss shown is the micro-batch loss.
- The partial sum is kept across epoch ends and across ``fit`` calls, as
  optimizer variables; `BackupAndRestore` and ``save_weights`` save it, so a
  resumed run continues the interrupted accumulation exactly.
- A short last batch (dataset size not a multiple of b) counts as one
  micro-batch of full weight.
- BatchNorm normalizes with each micro-batch's statistics and updates its
  moving averages on every micro-step, so a model with BatchNorm does not
  equal the big-batch run (as with any accumulation); everything else does.
- Gradient transforms (`kerascool.GradientTransform`) and every later hook
  see the accumulated mean gradient on the update step. On micro-steps they
  run too (their result is discarded with the vetoed update), so a transform
  that keeps statistics of its own sees the partial means as well.
- Cost: a micro-step adds its gradient to the sums and skips the optimizer
  (a real branch, see `kerascool._core`); Keras's own accumulation computes
  the update on every micro-step on JAX and selects it afterwards.
"""

from __future__ import annotations

from keras import ops

from kerascool import _core, _keras


class GradientAccumulation(_core.HookCallback):
    """Update the model once every `steps` batches, with their mean gradient.

    Works with any stock optimizer and composes with the other kerascool
    hooks: it runs first, so gradient transforms see the accumulated gradient.

    Args:
        steps: number of micro-batches per optimizer update (an integer >= 1;
            1 updates on every batch).

    Example:

    >>> import numpy as np, keras, kerascool
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="adam", loss="mse")
    >>> accumulate = kerascool.GradientAccumulation(steps=4)
    >>> _ = model.fit(np.ones((16, 4)), np.ones((16, 1)), batch_size=2, verbose=0, callbacks=[accumulate])
    >>> kerascool.real_steps(model), int(model.optimizer.iterations)
    (2, 2)
    """

    def __init__(self, steps: int):
        super().__init__()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(
                f"Invalid value for argument `steps`. Expected an integer >= 1. Received: steps={steps!r}"
            )
        self.steps = steps
        self._hook = _AccumulateHook(steps)

    def step_hooks(self):
        return [self._hook]

    def get_config(self) -> dict:
        return {"steps": self.steps}


class _AccumulateHook(_core.StepHook):
    stage = "accumulate"
    name = "accumulate"

    def __init__(self, steps: int):
        self.steps = steps

    def layout(self, model, variables):
        return (self.steps > 1,)

    def check(self, model, variables):
        optimizer = _keras.inner_optimizer(model.optimizer)
        builtin = getattr(optimizer, "gradient_accumulation_steps", None)
        if builtin:
            raise ValueError(
                f"The optimizer already accumulates gradients (gradient_accumulation_steps={builtin}); "
                "accumulating twice multiplies the steps. Use either GradientAccumulation or the "
                "optimizer's `gradient_accumulation_steps`, not both."
            )

    def build(self, model, variables, state):
        if self.steps == 1:
            return {}  # nothing to sum
        # Sums in float32 at least: a float16 sum of k gradients loses bits.
        sums = [state.variable(f"sum{i}", v.shape, _sum_dtype(v.dtype)) for i, v in enumerate(variables)]
        return {"sums": sums, "micro": state.variable("micro", (), "int32")}  # micro: batches in the sum

    def before_update(self, grads, variables, state, ctx):
        if self.steps == 1:
            return grads  # every batch is an update: nothing to sum, nothing to veto
        micro = state["micro"]
        count = micro.value + 1
        update = count >= self.steps
        out = []
        for g, total in zip(grads, state["sums"]):
            if g is None:
                out.append(None)
                continue
            total.assign_add(ops.cast(g, total.dtype))
            out.append(ops.cast(total.value / self.steps, g.dtype))
        micro.assign(ops.where(update, 0, count))
        ctx.skip_unless(update)
        return out

    def after_update(self, variables, state, ctx):
        if self.steps == 1:
            return
        # The sums restart after an update (micro was just reset to 0). A real branch where
        # possible: a micro-step then only adds its gradient, as Keras's own accumulation does.
        sums = state["sums"]
        update = ops.equal(state["micro"].value, 0)

        def reset():
            for total in sums:
                total.assign(ops.zeros(total.shape, total.dtype))

        if not _keras.apply_if(update, reset, sums):
            for total in sums:
                total.assign(ops.where(update, ops.zeros_like(total.value), total.value))


def _sum_dtype(dtype) -> str:
    return "float32" if dtype in ("float16", "bfloat16") else dtype
