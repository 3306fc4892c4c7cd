"""The one place where kerascool touches Keras internals or a specific backend.

Checked against keras 3.15.1 with tensorflow 2.21 and jax 0.10.2. Everything
else in kerascool goes through these helpers, `keras.ops` and `keras.Variable`.
"""

from __future__ import annotations

import contextlib

import keras
from keras import ops


def backend() -> str:
    return keras.backend.backend()


def flatten_layers(model) -> list:
    """All layers below `model`, depth first, nested ones included."""
    # Private in Keras 3.15; the public `model.layers` is not recursive.
    return list(model._flatten_layers(include_self=False, recursive=True))


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


def strategy_scope(model):
    """Scope in which new state must be created (TF distribution strategy)."""
    if backend() == "tensorflow":
        strategy = getattr(model, "distribute_strategy", None)
        if strategy is not None:
            return strategy.scope()
    return contextlib.nullcontext()


def sync_state(model) -> None:
    """On JAX, write the trainer's in-flight state back into the variables."""
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None:
        sync()


def snapshot(value):
    """A real copy of a variable's current value.

    On TF `convert_to_tensor(variable)` is the variable itself, so an "old
    value" taken that way would be read after the update.
    """
    return ops.copy(value)


def replica_count() -> int:
    """Number of replicas whose gradients are summed after `apply` (TF)."""
    if backend() != "tensorflow":
        return 1
    import tensorflow as tf

    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return 1
    return tf.distribute.get_replica_context().num_replicas_in_sync


def all_reduce_sum(grads: list) -> list:
    """Replica-local gradients -> the global gradient (TF MirroredStrategy).

    Under MirroredStrategy `apply` runs in replica context on each replica's
    own gradient (of loss / replicas); the optimizer sums them later. A
    nonlinear transform (clipping) must see that sum instead; the caller
    divides the result by `replica_count()` so the optimizer's own sum gives
    back the transformed global gradient.
    """
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    present = [g for g in grads if g is not None]
    reduced = iter(ctx.all_reduce(tf.distribute.ReduceOp.SUM, present))
    return [None if g is None else next(reduced) for g in grads]
