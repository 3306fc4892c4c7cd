"""TF distribution strategies: scopes, replica counts, the all-reduce of gradients.

Checked against keras 3.15.1 with tensorflow 2.21.
"""

from __future__ import annotations

import contextlib

from kerascool._keras.model import backend


def strategy_scope(model):
    """Scope in which new state must be created (TF distribution strategy)."""
    if backend() == "tensorflow":
        strategy = getattr(model, "distribute_strategy", None)
        if strategy is not None:
            return strategy.scope()
    return contextlib.nullcontext()


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


def tf_strategy_kind(model) -> tuple:
    """``(kind, replicas)`` of the TF distribution strategy `model` trains under.

    kind: ``"multi_worker"`` (MultiWorkerMirroredStrategy), ``"mirrored"``
    (MirroredStrategy), ``"other"`` (any other strategy with several replicas,
    e.g. TPUStrategy), or None (default strategy, other backends). The TF
    trainer's public `model.distribute_strategy` is the strategy the model was
    created under, else the current one (Keras 3.15.1, TF 2.21).
    """
    if backend() != "tensorflow":
        return None, 1
    import tensorflow as tf

    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None:
        return None, 1
    replicas = int(strategy.num_replicas_in_sync)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "multi_worker", replicas
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return "mirrored", replicas
    return ("other" if replicas > 1 else None), replicas
