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


def _run_on_state(model, state, fns):
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


def fresh_train_step(model) -> None:
    """Give a wrapped `train_step` (an instance attribute) a new identity before a retrace.

    `jax.jit` caches traces by the identity of the function it compiles
    (weakly: the bound methods Keras passes are new objects each time, so
    plain models always retrace). The wrapper that `add_step_work` keeps as
    an instance attribute is the same object in every `fit`, and jit would
    reuse the trace of an earlier `fit` made with other hooks. A copy of the function (same code and closure) is a new
    cache key. Checked with jax 0.10.2.
    """
    import types

    step = model.__dict__.get("train_step")
    if backend() != "jax" or not isinstance(step, types.FunctionType):
        return
    fresh = types.FunctionType(step.__code__, step.__globals__, step.__name__, step.__defaults__, step.__closure__)
    fresh.__kwdefaults__ = step.__kwdefaults__
    fresh.__dict__.update(step.__dict__)
    object.__setattr__(model, "train_step", fresh)


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


class StepWork:
    """Per-step work that needs more than `apply` sees (see `add_step_work`).

    before: ``fn(model)`` at the start of the step, before the forward pass;
        it may assign non-trainable and optimizer variables, and the step sees
        the new values.
    around: ``fn(model, data, state)`` returning a context manager, entered
        around the stock step at trace time: the batch, and the step's input
        state (JAX; None on TF, where the variables hold it).
    after: ``fn(model)`` at the end of the step: every variable reads its
        value after the step; it may assign optimizer variables.
    """

    def __init__(self, before=None, around=None, after=None):
        self.before, self.around, self.after = before, around, after


def add_step_work(model, name: str, work: StepWork) -> None:
    """Install `work` in the model's train step, inside the compiled step.

    The `StepHook`s run inside `optimizer.apply`, which sees the gradients and
    the trainable variables only. Work that needs the batch, the start of the
    step or the non-trainable variables after the step (BatchNorm statistics,
    which JAX's `stateless_apply` does not map) goes here: ONE wrapper of
    `train_step` per model (an instance attribute, kept as a pass-through when
    empty), running all work in the order before, around, stock step, after.
    On JAX, `before` and `after` run in a `StatelessScope` over the step's
    state and what they assign replaces the values in that state (a plain
    assign would be lost: the compiled step reads its state, not the
    variables); on TF, automatic control dependencies order them around the
    step's own ops. Idempotent per `name`; retrace the train function after.
    """
    registry = model.__dict__.get("_kerascool_step_work")
    if registry is None:
        registry = {}
        object.__setattr__(model, "_kerascool_step_work", registry)
        object.__setattr__(model, "train_step", _step_work_wrapper(model, model.train_step, registry))
    registry[name] = work


def remove_step_work(model, name: str) -> None:
    """Undo `add_step_work` for `name` (idempotent); retrace afterwards."""
    registry = model.__dict__.get("_kerascool_step_work")
    if registry is not None:
        registry.pop(name, None)


def _step_work_wrapper(model, original, registry: dict):
    def train_step(*args):
        work = list(registry.values())
        if not work:
            return original(*args)
        data, state = train_step_data(args)
        before = [w.before for w in work if w.before is not None]
        after = [w.after for w in work if w.after is not None]
        if before:
            state = _run_on_state(model, state, before)
        with contextlib.ExitStack() as stack:
            for w in work:
                if w.around is not None:
                    stack.enter_context(w.around(model, data, state))
            if state is None:
                logs = original(data)
            else:
                logs, state = original(state, data)
        if after:
            state = _run_on_state(model, state, after)
        return logs if state is None else (logs, state)

    return train_step


def _run_on_state(model, state, fns):
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


_DEFERRED_METRIC_UPDATES: list = []


def defer_metric_update(metric, value) -> bool:
    """On JAX inside a compiled step: queue ``metric.update_state(value)``; True if queued.

    A Keras `Metric` tracked by a layer and updated inside the layer's `call`
    works on TF, but on JAX the forward pass runs under `stateless_call`,
    which maps only the trainable and non-trainable variables: the metric's
    variables read as purged values there (Keras 3.15 fails with "'NoneType'
    object is not callable") and the update would be dropped. The queued
    update is applied by `_apply_deferred_metric_updates` to the step's
    metric values right after the loss, still inside `jax.value_and_grad`'s
    trace (so the value may depend on the forward pass), and Keras then
    reports it with the other metrics (progress bar, History, ``val_``).
    """
    if backend() != "jax":
        return False
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    if not in_stateless_scope():
        return False  # eager call of the layer: update directly
    _install_deferred_metric_updates()
    _DEFERRED_METRIC_UPDATES.append((metric, value))
    return True


def _install_deferred_metric_updates() -> None:
    # Private in Keras 3.15: JAXTrainer.compute_loss_and_updates is the function
    # that train_step and test_step differentiate/call; its aux output carries
    # the step's metric values. Patched once, on the class, so that every model
    # (whose layers may hold such metrics) takes part; a no-op when nothing is queued.
    from keras.src.backend.jax.trainer import JAXTrainer

    if getattr(JAXTrainer.compute_loss_and_updates, "_kerascool", False):
        return
    original = JAXTrainer.compute_loss_and_updates

    def compute_loss_and_updates(self, trainable_variables, non_trainable_variables, metrics_variables, *args, **kwargs):
        _DEFERRED_METRIC_UPDATES.clear()  # left over from a predict trace, which has no metrics to update
        loss, aux = original(self, trainable_variables, non_trainable_variables, metrics_variables, *args, **kwargs)
        if not _DEFERRED_METRIC_UPDATES:
            return loss, aux
        updates = list(_DEFERRED_METRIC_UPDATES)
        _DEFERRED_METRIC_UPDATES.clear()
        unscaled_loss, y_pred, non_trainable_values, metrics_values = aux
        metric_variables = self.metrics_variables
        known = {id(v) for v in metric_variables}
        with keras.StatelessScope(state_mapping=list(zip(metric_variables, metrics_values))) as scope:
            for metric, value in updates:
                if not all(id(v) in known for v in metric.variables):
                    raise ValueError(
                        f"The metric {metric.name!r} is updated inside the model's forward pass or loss "
                        f"but is not tracked by the model {self.name!r}: assign it as an attribute of one "
                        "of the model's layers, or of the model itself, e.g. "
                        f"`self.{metric.name} = kerascool.ScalarMetric({metric.name!r})` in `__init__`."
                    )
                metric.update_state(value)
        metrics_values = [
            new if new is not None else old
            for new, old in ((scope.get_current_value(v), old) for v, old in zip(metric_variables, metrics_values))
        ]
        return loss, (unscaled_loss, y_pred, non_trainable_values, metrics_values)

    compute_loss_and_updates._kerascool = True
    JAXTrainer.compute_loss_and_updates = compute_loss_and_updates
