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


# -- capture (kerascool/capture.py, capture_callback.py) ------------------------


def current_path() -> str:
    """The name-scope path of the layer being called, e.g. ``"model/block_0"``."""
    # Private in Keras 3.15: Layer.__call__ opens this scope around `call`.
    from keras.src.backend.common import name_scope

    return name_scope.current_path() or ""


# MultiHeadAttention's private step that forms the attention scores and hands
# them to `call` (Keras 3.15; keras-hub's CachedMultiHeadAttention calls it too,
# without asking for the scores, so wrapping `call` alone would not reach them).
ATTENTION_METHOD = "_compute_attention"


def can_return_attention_scores(layer) -> bool:
    import inspect

    method = getattr(layer, ATTENTION_METHOD, None)
    return method is not None and "return_attention_scores" in inspect.signature(method).parameters


def uses_flash_attention(layer) -> bool:
    """True when a MultiHeadAttention layer runs flash attention (no scores)."""
    return bool(getattr(layer, "_flash_attention", False))


def symbolic_inputs(model):
    """The model's symbolic inputs (functional, Sequential), or None if unknown."""
    try:
        inputs = model.inputs  # subclassed models have none (AttributeError)
    except (AttributeError, ValueError):
        return None
    if not inputs:
        return None
    # `_inputs_struct` keeps the user's structure (dict, list) in Keras 3.15;
    # Sequential has none, and a one-element list would make it warn.
    struct = getattr(model, "_inputs_struct", None)
    if struct is None:
        struct = inputs[0] if isinstance(inputs, (list, tuple)) and len(inputs) == 1 else inputs
    return struct


def trace_shapes(model, inputs, values=None) -> None:
    """Run `model` on symbolic `inputs` with backend placeholders (no data).

    ``values``: (trainable, non_trainable) values to read the variables from
    (from `before_first_train_step`), else the variables themselves.
    """
    from keras.src import backend as backend_module

    if values is None:
        backend_module.compute_output_spec(model, inputs, training=False)
        return
    trainable, non_trainable = values
    backend_module.compute_output_spec(
        lambda x: _stateless_inference(model, trainable, non_trainable, x), inputs
    )


def _stateless_inference(model, trainable, non_trainable, x):
    # `stateless_call` hands its keywords to `call` as they are: `training`
    # only where `call` takes it (as Keras's JAX trainer does).
    kwargs = {"training": False} if getattr(model, "_call_has_training_arg", True) else {}
    return model.stateless_call(trainable, non_trainable, x, **kwargs)[0]


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


def compiled_forward(model, body):
    """`x -> body(forward, x)` compiled like `fit` compiles its steps.

    `body` runs at trace time only: it calls ``forward(x)`` (the model in
    inference mode) and returns a dict of tensors, which become the compiled
    function's outputs. TF: `tf.function` (variables read by reference); JAX:
    `jax.jit` over `stateless_call`, fed the variables' current values;
    other backends and `run_eagerly` models: eager.
    """
    if getattr(model, "run_eagerly", False) or backend() not in ("tensorflow", "jax"):
        return lambda x: body(lambda inputs: model(inputs, training=False), x)
    if backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(lambda x: body(lambda inputs: model(inputs, training=False), x))
    import jax

    def pure(trainable, non_trainable, x):
        def forward(inputs):
            return _stateless_inference(model, trainable, non_trainable, inputs)

        return body(forward, x)

    jitted = jax.jit(pure)

    def run(x):
        return jitted(
            [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables], x
        )

    return run


def layer_depths(model):
    """id(layer) -> Keras's depth of each top-level layer of a functional model.

    The depth is the longest path from the layer to the model's outputs (0 at
    an output layer), as Keras orders `model.layers`. None for Sequential and
    subclassed models, which have no graph (private `_operations_by_depth` in
    Keras 3.15).
    """
    by_depth = getattr(model, "_operations_by_depth", None)
    if not by_depth:
        return None
    return {id(op): depth for depth, ops_ in by_depth.items() for op in ops_}


# -- averaging and swapping (kerascool/averaging.py, swap.py, hook.py) ------------


def host_copy(variable):
    """A NumPy copy of a variable's value, kept on the host (a swap's raw values)."""
    import numpy as np

    # np.array(copy=True): on JAX CPU, convert_to_numpy may be a view of a buffer that a later step donates.
    # Through the Keras variable, not `.value`: under TF MirroredStrategy, in the strategy's scope, a
    # scalar's `.value.__array__` gives a NumPy scalar, which np.array rejects ("object __array__ method
    # not producing an array"); `keras.Variable.__array__` wraps it.
    return np.array(ops.convert_to_numpy(variable), copy=True)


def is_fit_validation(evaluate_kwargs: dict) -> bool:
    """True for the `evaluate` call that `fit` makes for validation.

    Keras 3.15's TF and JAX `fit` pass the private `_use_cached_eval_dataset=True`
    to `self.evaluate`; a user's `evaluate` call cannot.
    """
    return bool(evaluate_kwargs.get("_use_cached_eval_dataset", False))


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


# -- the train-step wrapper (kerascool/anneal.py, averaging.py, two_step.py) ----------


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


def train_step_data(args: tuple):
    """``(data, state)`` from the arguments of a backend's `train_step`.

    Keras 3.15: JAX's is ``train_step(state, data)`` with the step's state as
    a tuple (trainable, non-trainable, optimizer, metrics values); TF's is
    ``train_step(data)`` and works on the variables in place (state None).
    """
    if backend() == "jax":
        return args[1], args[0]
    return args[0], None


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


# -- two-gradient steps (kerascool/two_step.py) ----------------------------------


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


def training_loss(model, x, y, sample_weight):
    """The model's training loss on one batch, as its own `train_step` computes it."""
    # Private in Keras 3.15: `_call_has_training_arg`, and `_compute_loss`, which
    # also serves `compute_loss` overrides written without the `training` argument.
    y_pred = model(x, training=True) if model._call_has_training_arg else model(x)
    return model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)


def value_and_grad(fn, values: list):
    """``(fn(values), d fn / d values)`` for a scalar `fn` of a list of tensors.

    Gradients of values `fn` does not depend on are None (TF) or zeros (JAX).
    """
    if backend() == "jax":
        import jax

        return jax.value_and_grad(fn)(list(values))
    import tensorflow as tf

    values = list(values)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(values)
        out = fn(values)
    return out, tape.gradient(out, values)



# -- metrics updated inside the forward pass (kerascool/scalars.py) --------------------


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


# -- distribution (kerascool/distribution.py) -------------------------------------


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


# -- the learning-rate range finder (kerascool/lr_finder.py) -----------------------


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
