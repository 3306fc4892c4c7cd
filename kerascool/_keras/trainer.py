"""The trainers: `fit`'s train step and functions, their arguments and state.

Private Keras accesses checked against keras 3.15.1 (TF 2.21, JAX 0.10.2).
"""

from __future__ import annotations

import contextlib

import keras

from kerascool._keras.model import backend, snapshot


def validation_batches(model):
    """Batches of the validation data `fit` is using, from its start; or None.

    `fit` keeps its validation iterator in `_eval_epoch_iterator` (Keras 3.15,
    TF and JAX trainers) from the first validation to the end of `fit`; a
    fresh NumPy iterator over its data adapter leaves `fit`'s own untouched.
    """
    iterator = getattr(model, "_eval_epoch_iterator", None)
    if iterator is None:
        return None
    return iterator.data_adapter.get_numpy_iterator()


def is_fit_validation(evaluate_kwargs: dict) -> bool:
    """True for the `evaluate` call that `fit` makes for validation.

    Keras 3.15's TF and JAX `fit` pass the private `_use_cached_eval_dataset=True`
    to `self.evaluate`; a user's `evaluate` call cannot.
    """
    return bool(evaluate_kwargs.get("_use_cached_eval_dataset", False))


def before_first_train_step(model, check):
    """Call ``check(x, values)`` at fit's next train-function call, before that step runs.

    ``x``: the inputs of the first training batch as KerasTensors (batch axis
    None), or None where their spec cannot be read; ``values``: what
    `trace_shapes` needs to read the model's variables (JAX's `fit` holds
    them outside the variables while it runs). For subclassed models,
    which declare no inputs, this is the first moment their input spec is
    known (Keras 3.15's TF trainer builds them only when the step traces).
    The compiled train function is not touched: `model.train_function` (an
    instance attribute Keras sets in `make_train_function`) is shadowed by a
    one-shot wrapper that puts it back before calling it. TF passes an
    iterator whose `element_spec` is read; JAX a Python iterator, whose first
    batch is peeked and handed back in front. Returns ``undo()``.
    """
    import itertools

    original = model.train_function

    def undo():
        if model.__dict__.get("train_function") is train_function:
            model.train_function = original

    def train_function(*args):
        undo()
        if backend() == "jax":
            state, iterator = args
            batch = next(iterator)
            args = (state, itertools.chain([batch], iterator))
            # fit has moved the variables' values into `state` (the variables
            # are purged): trace with those, and put them back if the check
            # fails, or the model would be left without values.
            try:
                check(_input_spec(batch), (state[0], state[1]))
            except BaseException:
                groups = (model.trainable_variables, model.non_trainable_variables)
                groups += (model.optimizer.variables, model.metrics_variables)
                for variables, values in zip(groups, state):
                    for variable, value in zip(variables, values):
                        variable.assign(value)
                raise
        else:
            check(_input_spec(getattr(args[0], "element_spec", None)), None)
        return original(*args)

    model.train_function = train_function
    return undo


def _input_spec(batch):
    if batch is None:
        return None
    x, _, _ = keras.utils.unpack_x_y_sample_weight(batch)

    def spec(leaf):
        # MirroredStrategy's iterator: a `PerReplicaSpec` of equal per-replica specs.
        leaf = getattr(leaf, "_value_specs", (leaf,))[0]
        shape = getattr(leaf, "shape", None)
        if shape is None or getattr(shape, "rank", 0) is None:
            return None
        shape = tuple(shape)
        return keras.KerasTensor((None,) + shape[1:], dtype=keras.backend.standardize_dtype(leaf.dtype))

    try:
        x = keras.tree.map_structure(spec, x)
    except Exception:  # noqa: BLE001 - a distributed or ragged spec: unknown
        return None
    return None if any(leaf is None for leaf in keras.tree.flatten(x)) else x


def train_step_data(args: tuple):
    """``(data, state)`` from the arguments of a backend's `train_step`.

    Keras 3.15: JAX's is ``train_step(state, data)`` with the step's state as
    a tuple (trainable, non-trainable, optimizer, metrics values); TF's is
    ``train_step(data)`` and works on the variables in place (state None).
    """
    if backend() == "jax":
        return args[1], args[0]
    return args[0], None


def run_on_state(model, state, fns):
    """Run ``fn(model)`` for each of `fns` on the variables, or on JAX's step state."""
    if state is None:
        for fn in fns:
            fn(model)
        return None
    trainable, non_trainable, optimizer_values, metrics = state
    non_trainable_variables = model.non_trainable_variables
    optimizer_variables = model.optimizer.variables
    mapping = (
        list(zip(model.trainable_variables, trainable))
        + list(zip(non_trainable_variables, non_trainable))
        + list(zip(optimizer_variables, optimizer_values))
    )
    with keras.StatelessScope(state_mapping=mapping) as scope:
        for fn in fns:
            fn(model)
    non_trainable = [scope.get_current_value(v) for v in non_trainable_variables]
    optimizer_values = [scope.get_current_value(v) for v in optimizer_variables]
    return trainable, non_trainable, optimizer_values, metrics


def step_start_mapping(model, state) -> list:
    """``(variable, value)`` pairs for a `StatelessScope` that sees the model
    as it was when the train step began.

    JAX: every variable of the step's state (inside the compiled step the
    variables themselves hold stale values). TF: copies of the non-trainable
    variables (BatchNorm statistics, dropout seeds), which the forward pass is
    about to change; the other variables read their live values.
    """
    if state is not None:
        trainable, non_trainable, optimizer_values, metrics = state
        return (
            list(zip(model.trainable_variables, trainable))
            + list(zip(model.non_trainable_variables, non_trainable))
            + list(zip(model.optimizer.variables, optimizer_values))
            + list(zip(model.metrics_variables, metrics))
        )
    return [(v, snapshot(v.value)) for v in model.non_trainable_variables]


def first_batch_spec(args: tuple):
    """The inputs spec of the batch a train function is about to take: TF only.

    TF's train function takes an iterator whose `element_spec` is the batch's
    structure of `tf.TensorSpec` (MirroredStrategy: `PerReplicaSpec`); None
    where it cannot be read.
    """
    spec = getattr(args[0], "element_spec", None) if args else None
    if spec is None:
        return None

    def leaf(s):
        s = getattr(s, "_value_specs", (s,))[0]  # MirroredStrategy: equal per-replica specs
        return keras.KerasTensor(tuple(s.shape), dtype=keras.backend.standardize_dtype(s.dtype))

    try:
        return keras.tree.map_structure(leaf, spec)
    except Exception:  # noqa: BLE001 - ragged or sparse specs: unknown
        return None


def symbolic_build(model, batch_spec) -> None:
    """Build the model, its compiled loss and metrics and its optimizer from a batch spec.

    What Keras 3.15's TF `fit` does under a distribution strategy
    (`_maybe_symbolic_build` -> private `_symbolic_build(data_batch=...)`);
    without one it builds them inside the first trace of the train step,
    too late to create kerascool's state eagerly beside the optimizer's.
    """
    model._symbolic_build(data_batch=batch_spec)


def restore_jax_state(model, state) -> None:
    """Write a JAX train function's input state back into the model's variables.

    JAX's `fit` moves the variables' values into the state it passes to the
    train function and purges the variables (Keras 3.15
    `_get_jax_state(purge_model_variables=True)`); an exception raised
    while the step is traced would leave them without values. Values whose
    buffers were donated to a step that ran are skipped.
    """
    if not isinstance(state, (tuple, list)) or len(state) != 4:
        return
    groups = (model.trainable_variables, model.non_trainable_variables)
    groups += (model.optimizer.variables, model.metrics_variables)
    for variables, values in zip(groups, state):
        for variable, value in zip(variables, values or ()):
            deleted = getattr(value, "is_deleted", None)
            if deleted is not None and deleted():
                continue
            variable.assign(value)
    model._jax_state_synced = True  # private (3.15): nothing in flight to sync any more


# -- metrics updated inside the forward pass (kerascool/scalars.py) --------------------


def defer_metric_update(metric, value) -> bool:
    """On JAX inside a compiled step: queue ``metric.update_state(value)``; True if queued.

    A Keras `Metric` tracked by a layer and updated inside the layer's `call`
    works on TF, but on JAX the forward pass runs under `stateless_call`,
    which maps only the trainable and non-trainable variables: the metric's
    variables read as purged values there (Keras 3.15 fails with "'NoneType'
    object is not callable") and the update would be dropped. The queued
    update is applied to the step's metric values right after the loss,
    still inside `jax.value_and_grad`'s trace, by the model's
    `compute_loss_and_updates` (Keras 3.15, private; shadowed on the model
    INSTANCE that is training, found on the call stack), and Keras then
    reports it with the other metrics (progress bar, History, ``val_``).
    """
    if backend() != "jax":
        return False
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    if not in_stateless_scope():
        return False  # eager call of the layer: update directly
    model = _training_model_on_stack()
    if model is None:
        return False
    queue = _deferred_metric_queue(model)
    queue.append((metric, value))
    return True


def _training_model_on_stack():
    """The outermost `keras.Model` whose method is running (the one `fit` trains)."""
    import sys

    frame, found = sys._getframe(2), None
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, keras.Model):
            found = owner
        frame = frame.f_back
    return found


def _deferred_metric_queue(model) -> list:
    queue = model.__dict__.get("_kerascool_metric_updates")
    if queue is not None:
        return queue
    from kerascool._core.installation import installation_of

    queue = []
    original = model.compute_loss_and_updates

    def compute_loss_and_updates(trainable_variables, non_trainable_variables, metrics_variables, *args, **kwargs):
        queue.clear()  # left over from a predict trace, which has no metrics to update
        loss, aux = original(trainable_variables, non_trainable_variables, metrics_variables, *args, **kwargs)
        if not queue:
            return loss, aux
        updates = list(queue)
        queue.clear()
        unscaled_loss, y_pred, non_trainable_values, metrics_values = aux
        metric_variables = model.metrics_variables
        known = {id(v) for v in metric_variables}
        with keras.StatelessScope(state_mapping=list(zip(metric_variables, metrics_values))) as scope:
            for metric, value in updates:
                if not all(id(v) in known for v in metric.variables):
                    raise ValueError(
                        f"The metric {metric.name!r} is updated inside the model's forward pass or loss "
                        f"but is not tracked by the model {model.name!r}: assign it as an attribute of one "
                        "of the model's layers, or of the model itself, e.g. "
                        f"`self.{metric.name} = kerascool.ScalarMetric({metric.name!r})` in `__init__`."
                    )
                metric.update_state(value)
        metrics_values = [
            new if new is not None else old
            for new, old in ((scope.get_current_value(v), old) for v, old in zip(metric_variables, metrics_values))
        ]
        return loss, (unscaled_loss, y_pred, non_trainable_values, metrics_values)

    installation_of(model).shadow(model, "compute_loss_and_updates", compute_loss_and_updates)
    object.__setattr__(model, "_kerascool_metric_updates", queue)
    installation_of(model).on_uninstall(lambda: model.__dict__.pop("_kerascool_metric_updates", None))
    return queue
