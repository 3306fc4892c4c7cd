"""Two-gradient steps: SAM, ASAM and Heun's method on a stock `fit`.

These methods need the loss gradient at a second point (the weights pushed
uphill for SAM, a trial step for Heun), which an optimizer's `apply` cannot
compute: it never sees the batch. `sam(model)` and `heun(model)` therefore
decorate the model INSTANCE: its `train_step` still runs unchanged (forward
pass, loss, metrics, first gradient), and only remembers the batch; the first
step hook, at the optimizer's `apply`, evaluates the loss gradient at the
second point on that batch and hands the final gradient on. Everything after
it is the ordinary kerascool step: gradient accumulation, gradient
transforms, the user's stock optimizer, EMA and other averages all see the
final gradient. Both evaluations are inside the one compiled step.

What the second evaluation shares with the first, and what it does not:

- it sees the same batch and the model state of the start of the step: the
  same dropout masks (seeds); BatchNorm normalizes with the batch's own
  statistics, as in the first;
- nothing it writes is kept: BatchNorm moving statistics, metrics and the
  loss shown in the progress bar come from the first evaluation, at the
  unperturbed weights, exactly as without the decorator;
- distributed (TF MirroredStrategy, JAX DataParallel), both gradients are
  global (summed over replicas), so every replica takes the same perturbation;
- with a `LossScaleOptimizer` the second loss is scaled the same way, and a
  step whose second gradient is not finite is skipped (weights and optimizer
  state kept).

A model with its own `train_step` works if that step calls the optimizer's
`apply` (or `apply_gradients`) once on the gradient of
``compute_loss(x, y, model(x))``, the loss the second evaluation uses. `rho` and `eta` are fixed when
decorating (calling `sam` again replaces the step and retraces). ASAM scales
every trainable variable, biases included.
"""

from __future__ import annotations

import contextlib
import math
import threading

import keras
from keras import ops

from kerascool import _core, _keras
from kerascool.transforms import config_repr, global_norm

_TINY = 1e-12


class TwoGradientRule:
    """How a two-gradient method turns the first gradient into the final one.

    ``final_gradient(grads, variables, gradient_at, ctx)`` runs inside the
    compiled step; ``gradient_at(values)`` returns the loss gradient on the
    current batch with the trainable variables set to `values`.
    """

    def final_gradient(self, grads: list, variables: list, gradient_at, ctx) -> list:
        raise NotImplementedError

    def get_config(self) -> dict:
        return {}

    def __repr__(self) -> str:
        return config_repr(self)


class SharpnessAware(TwoGradientRule):
    """SAM (Foret et al. 2021) and, with ``adaptive=True``, ASAM (Kwon et al. 2021).

    SAM: ``e = rho * g / |g|``; ASAM: ``e = rho * T^2 g / |T g|`` with
    ``T = |w| + eta`` element-wise. The final gradient is ``g(w + e)``.
    """

    def __init__(self, rho: float = 0.05, adaptive: bool = False, eta: float = 0.01):
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
            raise ValueError(f"Invalid value for argument `rho`. Expected a finite number > 0. Received: rho={rho!r}")
        if not isinstance(adaptive, bool):
            raise TypeError(f"Invalid value for argument `adaptive`. Expected True or False. Received: adaptive={adaptive!r}")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"Invalid value for argument `eta`. Expected a finite number >= 0. Received: eta={eta!r}")
        self.rho, self.adaptive, self.eta = float(rho), adaptive, float(eta)

    def perturbation(self, grads: list, weights: list) -> list:
        """The step ``e`` added to the weights (None where the gradient is None)."""
        if self.adaptive:
            scales = [None if g is None else ops.abs(w) + ops.cast(self.eta, w.dtype) for g, w in zip(grads, weights)]
            grads = [None if g is None else t * g for g, t in zip(grads, scales)]
        else:
            scales = [None] * len(grads)
        factor = self.rho / (global_norm(grads) + _TINY)
        return [
            None if g is None else (g if t is None else t * g) * ops.cast(factor, g.dtype)
            for g, t in zip(grads, scales)
        ]

    def final_gradient(self, grads, variables, gradient_at, ctx):
        weights = [v.value for v in variables]
        steps = self.perturbation(grads, weights)
        second = gradient_at([w if e is None else w + ops.cast(e, w.dtype) for w, e in zip(weights, steps)])
        return [None if g is None else g2 for g, g2 in zip(grads, second)]

    def get_config(self):
        return {"rho": self.rho, "adaptive": self.adaptive, "eta": self.eta}


class Heun(TwoGradientRule):
    """Heun's method: the mean of the gradients at `w` and after a trial step.

    ``w <- w - lr/2 * (g(w) + g(w - lr * g(w)))`` with plain gradient descent
    (`keras.optimizers.SGD` without momentum). The trial step uses the
    optimizer's current learning rate (schedules included); the final
    gradient ``(g(w) + g(w - lr g(w))) / 2`` goes to the user's optimizer, so
    with momentum or another optimizer it is that optimizer's step on Heun's
    averaged gradient.
    """

    def final_gradient(self, grads, variables, gradient_at, ctx):
        lr = ctx.optimizer.learning_rate
        weights = [v.value for v in variables]
        trial = [w if g is None else w - ops.cast(lr, w.dtype) * ops.cast(g, w.dtype) for w, g in zip(weights, grads)]
        second = gradient_at(trial)
        return [None if g is None else (g + ops.cast(g2, g.dtype)) * 0.5 for g, g2 in zip(grads, second)]


def sam(model: keras.Model, rho: float = 0.05, adaptive: bool = False, eta: float = 0.01) -> keras.Model:
    """Train `model` with sharpness-aware minimization, with its own optimizer.

    Each train step takes the gradient ``g`` at the weights ``w``, then the
    gradient at ``w + rho * g / |g|`` (ASAM: ``w + rho * T^2 g / |T g|``,
    ``T = |w| + eta``), and gives the latter to the optimizer. One step costs
    about two forward and backward passes.

    Args:
        model: a Keras model (compiled or not yet); decorated in place.
        rho: radius of the neighbourhood, > 0 (SAM paper: 0.05; ASAM: 0.5 or more).
        adaptive: use ASAM's scale-invariant neighbourhood.
        eta: ASAM's offset in ``T = |w| + eta``, >= 0.

    Returns:
        `model` itself, with the two-gradient train step (`stock_step` undoes it).

    Example:

    >>> import numpy as np, keras, kerascool
    >>> model = kerascool.sam(keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]), rho=0.05)
    >>> model.compile(optimizer="adam", loss="mse")
    >>> _ = model.fit(np.ones((8, 4)), np.ones((8, 1)), epochs=1, verbose=0)
    >>> _ = kerascool.stock_step(model)  # back to the one-gradient step
    """
    return _install(model, SharpnessAware(rho, adaptive, eta))


def heun(model: keras.Model) -> keras.Model:
    """Train `model` with Heun's method (with `keras.optimizers.SGD()`).

    ``w <- w - lr/2 * (g(w) + g(w - lr * g(w)))``: a trial gradient-descent
    step, then the mean of both gradients goes to the optimizer (see `Heun`).

    Example:

    >>> import numpy as np, keras, kerascool
    >>> model = kerascool.heun(keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]))
    >>> model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    >>> _ = model.fit(np.ones((8, 4)), np.ones((8, 1)), epochs=1, verbose=0)
    """
    return _install(model, Heun())


def stock_step(model: keras.Model) -> keras.Model:
    """Undo `sam` / `heun`: the model trains with one gradient per step again.

    Idempotent; the next `fit` retraces its train step.
    """
    installation = _core.installation_of(model, create=False)
    for hook in [h for h in (installation.decorations if installation else []) if isinstance(h, _SecondGradientHook)]:
        installation.undecorate(hook)
    return model


def _install(model, rule: TwoGradientRule):
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a keras.Model to decorate. Received: model={model!r}")
    if _keras.backend() not in ("tensorflow", "jax"):
        raise ValueError(
            f"Two-gradient steps support the TensorFlow and JAX backends. Received backend: {_keras.backend()!r}"
        )
    stock_step(model)
    _core.installation_of(model).decorate(_SecondGradientHook(rule))
    return model


class _SecondGradientHook(_core.StepHook):
    stage = "gradient"  # first of all: accumulation and transforms must see the final gradient
    name = "two_step"

    def __init__(self, rule: TwoGradientRule):
        self.rule = rule
        # Per thread: MirroredStrategy traces each replica's step in its own thread.
        self.pending = threading.local()

    def around_step(self, model, data, step_state, state):
        """Around the model's train step: the batch, and how the model looked when the step began."""
        return self._stepping(data, _keras.step_start_mapping(model, step_state))

    @contextlib.contextmanager
    def _stepping(self, data, start: list):
        self.pending.step = (data, start)
        try:
            yield
        finally:
            self.pending.step = None

    def before_update(self, grads, variables, state, ctx):
        step = getattr(self.pending, "step", None)
        if step is None:
            raise RuntimeError(
                f"{self.rule!r} needs the batch, which only the model's `train_step` (fit) provides; "
                "`optimizer.apply` was called outside it. Call `kerascool.stock_step(model)` to train "
                "with a custom loop."
            )
        data, start = step
        model = ctx.model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        optimizer = model.optimizer

        with keras.StatelessScope(state_mapping=start):
            # 1.0 without loss scaling; the current dynamic scale of a LossScaleOptimizer.
            scale = ops.convert_to_tensor(optimizer.scale_loss(1.0), "float32")

        def scaled_loss(values):
            mapping = start + list(zip(variables, values))
            # Whatever the forward pass writes (BatchNorm statistics, seeds, metrics) stays in the scope.
            with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
                loss = _keras.training_loss(model, x, y, sample_weight)
                return ops.cast(optimizer.scale_loss(loss), "float32")

        def gradient_at(values):
            _, second = _keras.value_and_grad(scaled_loss, values)
            second = [None if g is None else g / ops.cast(scale, g.dtype) for g in second]
            if _keras.replica_count() > 1:
                # The hooks see replica-summed gradients (see hook.py); so must this one.
                second = _keras.all_reduce_sum(second)
            if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                # The scale was checked on the first gradient only; the uphill point may overflow.
                present = [g for g in second if g is not None]
                finite = ops.all(ops.stack([ops.all(ops.isfinite(g)) for g in present]))
                ctx.skip_unless(finite)
                # Zeros keep NaN out of the hooks that run before the vetoed update is dropped.
                second = [None if g is None else ops.where(finite, g, ops.zeros_like(g)) for g in second]
            return second

        return self.rule.final_gradient(list(grads), list(variables), gradient_at, ctx)
