"""`ScalarMetric`: log any scalar computed inside a layer's `call` or a loss.

Keras 3 dropped ``add_metric``. Its replacement is a Keras `Metric` tracked by
a layer: Keras reports every metric that the model's layers hold, as
``name`` for training and ``val_name`` for validation, in the progress bar and
in History, averaged over the steps of the epoch. That works on TF as it is,
but on JAX the forward pass runs inside ``jax.value_and_grad`` under
``stateless_call``, where a metric's variables are not part of the mapped
state: Keras 3.15 fails there. `ScalarMetric.log` takes the update out of the
forward pass (`kerascool._keras.defer_metric_update`) and applies it to the
step's metric state right after the loss, still inside the compiled step, so
the same layer code works on both backends.

Create the metric in the layer's ``__init__`` (it must be tracked by a layer
of the model or by the model itself) and call ``log`` in ``call``; for a
loss function, track it on the model (``model.kl = ScalarMetric("kl")``).

>>> import numpy as np, keras, kerascool
>>> class Hidden(keras.layers.Layer):
...     def __init__(self, **kwargs):
...         super().__init__(**kwargs)
...         self.dense = keras.layers.Dense(3)
...         self.sq_norm = kerascool.ScalarMetric("hidden_sq_norm")
...     def call(self, x):
...         h = self.dense(x)
...         self.sq_norm.log(keras.ops.mean(keras.ops.sum(h * h, axis=-1)))
...         return h
>>> model = keras.Sequential([keras.Input((4,)), Hidden(), keras.layers.Dense(1)])
>>> model.compile(optimizer="sgd", loss="mse")
>>> history = model.fit(np.ones((8, 4)), np.ones((8, 1)), epochs=1, verbose=0)
>>> "hidden_sq_norm" in history.history
True
"""

from __future__ import annotations

import keras
from keras import ops

from kerascool import _keras


class ScalarMetric(keras.metrics.Mean):
    """A scalar logged once per call, reported as its mean over the epoch.

    Args:
        name: the key in the logs (``val_<name>`` for validation). Names must
            be unique among the model's metrics.
        dtype: the dtype of the running mean (float32 by default).
    """

    def __init__(self, name: str, dtype=None):
        if not isinstance(name, str) or not name:
            raise ValueError(f"Invalid value for argument `name`. Expected a non-empty string. Received: name={name!r}")
        super().__init__(name=name, dtype=dtype)

    def log(self, value) -> None:
        """Record `value` (a scalar tensor) for this step; no gradient flows through it."""
        value = ops.convert_to_tensor(value)
        size = 1
        for dim in value.shape:
            size *= dim if dim is not None else 2  # an unknown dimension is not one value
        if size != 1:
            raise ValueError(
                f"ScalarMetric {self.name!r} logs one value per call. Received a tensor of shape "
                f"{tuple(value.shape)}: reduce it first, e.g. `keras.ops.mean(x)`."
            )
        value = ops.stop_gradient(ops.cast(ops.reshape(value, ()), self.dtype))
        if not _keras.defer_metric_update(self, value):
            self.update_state(value)
