"""Read and substitute a built layer's weight attributes (checked against keras 3.15.1).

Keras's built-in layers keep each weight in an instance attribute and read
it from there in `call`: Dense, EinsumDense and the convolutions in
``_kernel`` (behind a ``kernel`` property that adds LoRA and quantization),
Embedding in ``_embeddings``, ``bias``, ``gamma``... Setting that attribute
to a tensor for the duration of one call makes the layer compute with the
tensor instead of the variable. The attribute is written into the
instance ``__dict__`` directly, so that Keras's attribute tracking (which
would try to track or lock it) never sees the temporary value.
"""

from __future__ import annotations

import contextlib

import keras


def weight_attributes(layer, variable) -> list[str]:
    """The names of `layer`'s instance attributes that hold `variable` itself."""
    return [name for name, value in vars(layer).items() if value is variable]


def find_weight(layer, name: str):
    """The variable `layer` calls `name` (attribute, or the name of one of its weights)."""
    value = getattr(layer, name, None)
    if isinstance(value, keras.Variable):
        return value
    found = [w for w in layer.weights if w.name == name and weight_attributes(layer, w)]
    return found[0] if len(found) == 1 else None


def attribute(layer, name: str):
    """The instance attribute `name` of `layer` (not a property of its class)."""
    return vars(layer)[name]


@contextlib.contextmanager
def substituted(layer, replacements: dict):
    """Within the block, `layer`'s attributes named in `replacements` hold the given values."""
    saved = {name: vars(layer)[name] for name in replacements}
    try:
        vars(layer).update(replacements)
        yield
    finally:
        vars(layer).update(saved)
