"""Gradient transformations: small objects of one shape, composed by `chain`.

Each transformation has two methods, as in optax:

- ``init(variables, state) -> transform_state``: runs eagerly when ``fit``
  starts and returns the transformation's state (variables made with
  ``state.variable(...)``, or None); nothing is kept on ``self``, so one
  instance can serve several models;
- ``update(grads, transform_state, variables, ctx)``: runs inside the
  compiled step (keras.ops only) with the state `init` returned, and returns
  the new gradients; ``None`` gradients pass through.

Selection is its own concern: ``masked(transform, include)`` applies a
transformation to the chosen variables only (see `kerascool.selection`).
Before anything is created, ``check(variables)`` validates the choice, so a
pattern that matches nothing fails with the model untouched.

>>> import numpy as np
>>> from keras import ops
>>> g = [ops.convert_to_tensor(np.array([3.0, 4.0]))]
>>> float(ops.norm(ClipByGlobalNorm(1.0).update(g, None, [None], None)[0]))  # doctest: +ELLIPSIS
1.0...
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

from keras import ops

from kerascool.selection import Selection, select_variables

_TINY = 1e-12


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a finite number > 0. "
            f"Received: {name}={value!r}"
        )
    return float(value)


def _sq_sum(x):
    x = ops.cast(x, "float32")
    return ops.sum(x * x)


def _scale_to(grads: list, norm, max_norm: float) -> list:
    factor = ops.minimum(1.0, max_norm / ops.maximum(norm, _TINY))
    return [None if g is None else g * ops.cast(factor, g.dtype) for g in grads]


class GradientTransformation:
    """Base class: override `update` (and `init` if the transform has state)."""

    def check(self, variables: Sequence) -> None:
        """Raise on a bad choice of variables; create nothing."""

    def init(self, variables: Sequence, state):
        """Create and return the state (None: stateless)."""
        return None

    def update(self, grads: list, state, variables: list, ctx) -> list:
        raise NotImplementedError

    def get_config(self) -> dict:
        return {}

    def __repr__(self) -> str:
        return config_repr(self)


def config_repr(obj) -> str:
    """``Name(arg=value, ...)`` from ``obj.get_config()``."""
    args = ", ".join(f"{k}={v!r}" for k, v in obj.get_config().items())
    return f"{type(obj).__name__}({args})"


class ClipByNorm(GradientTransformation):
    """Clip each variable's gradient to L2 norm at most `max_norm`."""

    def __init__(self, max_norm: float):
        self.max_norm = _check_positive("max_norm", max_norm)

    def update(self, grads, state, variables, ctx):
        return [None if g is None else _scale_to([g], ops.sqrt(_sq_sum(g)), self.max_norm)[0] for g in grads]

    def get_config(self):
        return {"max_norm": self.max_norm}


def layer_of(variable) -> str:
    """The path of the layer that owns `variable` ("model/dense" for "model/dense/kernel")."""
    return variable.path.rsplit("/", 1)[0] if "/" in variable.path else variable.path


class ClipByLayerNorm(GradientTransformation):
    """Clip per layer: all variables of one layer share one L2 norm <= `max_norm`."""

    def __init__(self, max_norm: float):
        self.max_norm = _check_positive("max_norm", max_norm)

    def update(self, grads, state, variables, ctx):
        groups: dict[str, list[int]] = {}
        for i, (g, v) in enumerate(zip(grads, variables)):
            if g is not None:
                groups.setdefault(layer_of(v), []).append(i)
        out = list(grads)
        for idx in groups.values():
            norm = ops.sqrt(sum(_sq_sum(grads[i]) for i in idx))
            for i, g in zip(idx, _scale_to([grads[i] for i in idx], norm, self.max_norm)):
                out[i] = g
        return out

    def get_config(self):
        return {"max_norm": self.max_norm}


class ClipByGlobalNorm(GradientTransformation):
    """Clip all gradients together to a global L2 norm <= `max_norm`."""

    def __init__(self, max_norm: float):
        self.max_norm = _check_positive("max_norm", max_norm)

    def update(self, grads, state, variables, ctx):
        return _scale_to(grads, global_norm(grads), self.max_norm)

    def get_config(self):
        return {"max_norm": self.max_norm}


def global_norm(grads: Sequence):
    present = [g for g in grads if g is not None]
    if not present:
        return ops.convert_to_tensor(0.0)
    return ops.sqrt(sum(_sq_sum(g) for g in present))


class ClipByValue(GradientTransformation):
    """Clip every gradient element into ``[-limit, limit]``."""

    def __init__(self, limit: float):
        self.limit = _check_positive("limit", limit)

    def update(self, grads, state, variables, ctx):
        return [None if g is None else ops.clip(g, -self.limit, self.limit) for g in grads]

    def get_config(self):
        return {"limit": self.limit}


def unitwise_norm(x):
    """L2 norm per output unit, broadcastable to `x`.

    Keras kernels keep the output axis last (Dense: (in, out); Conv2D:
    (h, w, in, out)), so the norm runs over every other axis. Vectors
    (biases, scales) and scalars take one norm over all their entries,
    as in NFNets.
    """
    x = ops.cast(x, "float32")
    if len(x.shape) <= 1:
        return ops.sqrt(ops.sum(x * x))
    axes = tuple(range(len(x.shape) - 1))
    return ops.sqrt(ops.sum(x * x, axis=axes, keepdims=True))


class AdaptiveClip(GradientTransformation):
    """Adaptive gradient clipping (Brock et al. 2021, NFNets), unit-wise.

    For each unit: ``g <- g * min(1, clipping * max(|w|, eps) / |g|)`` with
    `unitwise_norm` norms of the weight `w` and its gradient `g`.
    """

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3):
        self.clipping = _check_positive("clipping", clipping)
        self.eps = _check_positive("eps", eps)

    def update(self, grads, state, variables, ctx):
        out = []
        for g, v in zip(grads, variables):
            if g is None:
                out.append(None)
                continue
            max_norm = ops.maximum(unitwise_norm(v.value), self.eps) * self.clipping
            g_norm = unitwise_norm(g)
            factor = ops.where(g_norm > max_norm, max_norm / ops.maximum(g_norm, 1e-6), 1.0)
            out.append(g * ops.cast(factor, g.dtype))
        return out

    def get_config(self):
        return {"clipping": self.clipping, "eps": self.eps}


class Scale(GradientTransformation):
    """Multiply every gradient by a constant `factor`."""

    def __init__(self, factor: float):
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not math.isfinite(factor):
            raise ValueError(f"Invalid value for argument `factor`. Expected a finite number. Received: factor={factor!r}")
        self.factor = float(factor)

    def update(self, grads, state, variables, ctx):
        return [None if g is None else g * ops.cast(self.factor, g.dtype) for g in grads]

    def get_config(self):
        return {"factor": self.factor}


class SkipNonFinite(GradientTransformation):
    """Skip the whole update when any gradient holds a NaN or an infinity.

    On a skipped step the weights and the optimizer's state stay exactly as
    they were. The number of skipped steps is shown as ``skipped_steps`` in
    the logs. Place it first in a chain so the others see finite values.
    """

    def init(self, variables, state):
        state.log_slot("skipped_steps")
        return {"skipped": state.variable("skipped", (), "int32")}

    def update(self, grads, state, variables, ctx):
        finite = ops.all(ops.stack([ops.all(ops.isfinite(g)) for g in grads if g is not None]))
        ctx.skip_unless(finite)
        skipped = state["skipped"]
        skipped.assign_add(1 - ops.cast(finite, "int32"))
        ctx.log("skipped_steps", skipped.value)
        # Zeros keep NaN out of whatever runs before the update is discarded; a real
        # branch rather than a per-element select, which costs a pass over every gradient.
        present = [g for g in grads if g is not None]
        chosen = iter(ops.cond(finite, lambda: list(present), lambda: [ops.zeros_like(g) for g in present]))
        return [None if g is None else next(chosen) for g in grads]


class Lambda(GradientTransformation):
    """Any user function ``fn(grads, variables) -> grads`` (keras.ops inside)."""

    def __init__(self, fn: Callable):
        if not callable(fn):
            raise TypeError(f"Invalid value for argument `fn`. Expected a callable fn(grads, variables) -> grads. Received: fn={fn!r}")
        self.fn = fn

    def update(self, grads, state, variables, ctx):
        out = list(self.fn(list(grads), list(variables)))
        if len(out) != len(grads):
            raise ValueError(
                f"{getattr(self.fn, '__name__', self.fn)} returned {len(out)} gradients for "
                f"{len(grads)} variables; it must return one per variable."
            )
        return out

    def get_config(self):
        return {"fn": getattr(self.fn, "__name__", repr(self.fn))}


def as_transformation(t) -> GradientTransformation:
    if isinstance(t, GradientTransformation):
        return t
    raise TypeError(
        f"Expected a gradient transformation such as kerascool.ClipByNorm(1.0), or a "
        f"function wrapped as kerascool.Lambda(fn). Received: {t!r}"
    )


class chain(GradientTransformation):  # noqa: N801 (reads as optax.chain)
    """Apply transformations one after the other."""

    def __init__(self, *transforms: GradientTransformation):
        self.transforms = [as_transformation(t) for t in transforms]

    def check(self, variables):
        for t in self.transforms:
            t.check(variables)

    def init(self, variables, state):
        return tuple(t.init(variables, state) for t in self.transforms)

    def update(self, grads, state, variables, ctx):
        for t, inner in zip(self.transforms, state):
            grads = t.update(grads, inner, variables, ctx)
        return grads

    def __repr__(self):
        return f"chain({', '.join(map(repr, self.transforms))})"


class masked(GradientTransformation):  # noqa: N801 (reads as optax.masked)
    """Apply `transform` only to the variables chosen by `include`.

    `include` is a pattern, a list of patterns or a predicate (see
    `kerascool.selection`); other gradients pass through untouched. A
    selection that matches nothing raises before training starts.
    """

    def __init__(self, transform: GradientTransformation, include: Selection):
        self.transform = as_transformation(transform)
        self.include = include

    def check(self, variables):
        mask = select_variables(variables, self.include, "include")
        self.transform.check([v for v, m in zip(variables, mask) if m])

    def init(self, variables, state):
        mask = select_variables(variables, self.include, "include")
        return {"mask": mask, "inner": self.transform.init([v for v, m in zip(variables, mask) if m], state)}

    def update(self, grads, state, variables, ctx):
        idx = [i for i, m in enumerate(state["mask"]) if m]
        inner = self.transform.update([grads[i] for i in idx], state["inner"], [variables[i] for i in idx], ctx)
        out = list(grads)
        for i, g in zip(idx, inner):
            out[i] = g
        return out

    def __repr__(self):
        return f"masked({self.transform!r}, include={self.include!r})"
