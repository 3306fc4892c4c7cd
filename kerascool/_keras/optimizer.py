"""Optimizers: the optimizer that updates, its variables, and a branch around its update.

Private Keras accesses checked against keras 3.15.1 (TF 2.21, JAX 0.10.2).
"""

from __future__ import annotations

import keras
from keras import ops

from kerascool._keras.model import backend, host_copy, snapshot


def inner_optimizer(optimizer):
    """The optimizer that really updates variables (unwraps mixed precision).

    `LossScaleOptimizer.apply` unscales, skips non-finite steps and then calls
    `inner_optimizer.apply` (TF) or `inner_optimizer.stateless_apply` (JAX),
    which in turn calls `apply`: a hook on the inner one sees unscaled
    gradients on every backend.
    """
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    return optimizer


def trainable_variables_of(optimizer) -> list:
    """The variables the optimizer was built with, in gradient order."""
    return list(optimizer._trainable_variables)


def densify(grad):
    """A plain tensor for a gradient (TF gives `IndexedSlices` for embeddings).

    Transforms need whole tensors; the cost is a dense gradient for each
    embedding table while hooks are active.
    """
    if grad is None or backend() != "tensorflow":
        return grad
    import tensorflow as tf

    if isinstance(grad, tf.IndexedSlices):
        return tf.convert_to_tensor(grad)
    return grad


def accumulation_update_flag(optimizer):
    """For Keras's own `gradient_accumulation_steps`: will this `apply` update?

    A bool tensor read BEFORE `apply` (which then advances `iterations`), or
    None without accumulation. Keras 3.15 updates when
    `(optimizer._iterations + 1) % steps == 0` (private `_iterations`: the
    public `iterations` is already divided by `steps`).
    """
    steps = getattr(optimizer, "gradient_accumulation_steps", None)
    if not steps:
        return None
    return ops.equal(ops.mod(snapshot(optimizer._iterations.value) + 1, steps), 0)


def swap_learning_rate(optimizer, learning_rate):
    """Put `learning_rate` (a schedule) in `optimizer`; return what was there.

    The public setter untracks the optimizer's learning-rate variable when a
    schedule replaces it, which changes ``optimizer.variables`` (and so every
    checkpoint index); the private `_learning_rate` (Keras 3.15) is swapped
    instead and the variable stays where it was. Retrace afterwards.
    """
    previous = optimizer._learning_rate
    optimizer._learning_rate = learning_rate
    return previous


def raw_iterations(optimizer) -> int:
    """The count a `LearningRateSchedule` is called with (micro-steps under
    `gradient_accumulation_steps`; the public `iterations` is divided by them)."""
    return int(host_copy(optimizer._iterations))


def apply_if(pred, fn, variables: list) -> bool:
    """Run ``fn()``, which assigns some of `variables`, only where the bool tensor `pred` holds.

    A real branch (`jax.lax.cond`, `tf.cond`), so a skipped step costs nothing
    and every variable keeps its exact value. `fn` must read and write no
    variable outside `variables` (JAX: the branch sees `variables` only).
    Returns False, having done nothing, where a branch cannot be used: under
    a TF distribution strategy, the optimizer's update is a `merge_call`,
    which cannot run inside `tf.cond`; the caller then applies and restores.
    """
    if backend() == "jax":
        import jax

        values = [ops.cast(v.value, v.dtype) for v in variables]

        def taken(current):
            with keras.StatelessScope(state_mapping=list(zip(variables, current))) as scope:
                fn()
            updated = [scope.get_current_value(v) for v in variables]
            return [c if u is None else ops.cast(u, v.dtype) for v, c, u in zip(variables, current, updated)]

        new = jax.lax.cond(pred, taken, lambda current: list(current), values)
        for v, value in zip(variables, new):
            v.assign(value)
        return True
    import tensorflow as tf

    if tf.distribute.has_strategy():
        return False

    def taken():
        fn()
        return tf.constant(True)

    tf.cond(pred, taken, lambda: tf.constant(False))
    return True


def remove_optimizer_variables(optimizer, variables) -> None:
    """Untrack `variables` from `optimizer` (kerascool's own state, on uninstall or rollback).

    Private in Keras 3.15: `_variables` (what `optimizer.variables` copies,
    and what checkpoints save by index) and the tracker's `stored_ids`.
    """
    gone = {id(v) for v in variables}
    keep = [v for v in optimizer._variables if id(v) not in gone]
    # In place, element by element: on TF `_variables` is a tracking ListWrapper whose slice
    # assignment compares elements (and `==` on variables is element-wise).
    while len(optimizer._variables):
        optimizer._variables.pop()
    for v in keep:
        optimizer._variables.append(v)
    stored = getattr(getattr(optimizer, "_tracker", None), "stored_ids", {}).get("variables")
    if stored is not None:
        stored.difference_update(gone)
