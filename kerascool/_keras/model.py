"""Models and variables: layers, symbolic inputs, compiled inference, state sync, copies.

Private Keras accesses checked against keras 3.15.1 (TF 2.21, JAX 0.10.2).
"""

from __future__ import annotations

import keras
from keras import ops


def backend() -> str:
    return keras.backend.backend()


def flatten_layers(model) -> list:
    """All layers below `model`, depth first, nested ones included."""
    # Private in Keras 3.15; the public `model.layers` is not recursive.
    return list(model._flatten_layers(include_self=False, recursive=True))


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


def host_copy(variable):
    """A NumPy copy of a variable's value, kept on the host (a swap's raw values)."""
    import numpy as np

    # np.array(copy=True): on JAX CPU, convert_to_numpy may be a view of a buffer that a later step donates.
    # Through the Keras variable, not `.value`: under TF MirroredStrategy, in the strategy's scope, a
    # scalar's `.value.__array__` gives a NumPy scalar, which np.array rejects ("object __array__ method
    # not producing an array"); `keras.Variable.__array__` wraps it.
    return np.array(ops.convert_to_numpy(variable), copy=True)


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


def call_order(model):
    """A subclassed model's top-level layers in the order its `call` first uses them; or None.

    Subclassed models list `model.layers` in attribute-assignment order, which
    need not be the order of the forward pass. A symbolic pass (no data) on
    the input shapes the model was built with (private `_build_shapes_dict`,
    Keras 3.15) records the first call of each layer through an instance-level
    `call` (Keras's `Layer.__call__` calls `self.call`), removed afterwards.
    None for functional and Sequential models (their order is known), and
    where the pass cannot run.
    """
    if isinstance(model, keras.Sequential) or getattr(model, "_operations_by_depth", None):
        return None
    shapes = getattr(model, "_build_shapes_dict", None)
    if not shapes or len(shapes) != 1:
        return None
    shape = tuple(shapes.values())[0]
    if not isinstance(shape, (tuple, list)) or not all(d is None or isinstance(d, int) for d in shape):
        return None
    from keras.src import backend as backend_module

    order, layers = [], list(model.layers)
    for layer in layers:
        original = layer.call

        def recording(*args, _layer=layer, _original=original, **kwargs):
            if not any(seen is _layer for seen in order):
                order.append(_layer)
            return _original(*args, **kwargs)

        object.__setattr__(layer, "call", recording)
    try:
        backend_module.compute_output_spec(model, keras.KerasTensor(tuple(shape), dtype=model.input_dtype))
    except Exception:  # noqa: BLE001 - data-dependent control flow: order unknown
        return None
    finally:
        for layer in layers:
            layer.__dict__.pop("call", None)
    return order + [layer for layer in layers if not any(layer is seen for seen in order)]
