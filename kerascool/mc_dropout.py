"""`mc_dropout_predict`: Monte Carlo dropout, the mean and spread of stochastic predictions.

Gal & Ghahramani (2016): keep dropout on at prediction time and read the
spread of several passes as the model's uncertainty. Only the dropout layers
(`Dropout`, its spatial variants, `GaussianDropout`, `AlphaDropout`, nested
ones included, such as the dropout inside `MultiHeadAttention`) are switched
to training mode; everything else, BatchNorm included, stays in inference
mode and no variable changes. Dropout built into other layers (the
``dropout=`` argument of recurrent layers) is not reached.

>>> import numpy as np, keras, kerascool
>>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dropout(0.5), keras.layers.Dense(1)])
>>> mean, std = kerascool.mc_dropout_predict(model, np.ones((2, 3)), num_samples=8)
>>> mean.shape, std.shape
((2, 1), (2, 1))
"""

from __future__ import annotations

from typing import Optional

import keras
import numpy as np
from keras import tree

from kerascool import _keras

DROPOUT_LAYERS = (keras.layers.Dropout, keras.layers.GaussianDropout, keras.layers.AlphaDropout)


def _always_training(call):
    def call_in_training(*args, **kwargs):
        kwargs["training"] = True
        return call(*args, **kwargs)

    return call_in_training


_TILE_BYTES = 64 << 20  # inputs repeated for several passes per predict call, up to this size


def _passes_per_call(x, num_samples: int) -> int:
    """How many passes one `predict` call makes: several for arrays, one otherwise."""
    leaves = tree.flatten(x)
    if not leaves or not all(hasattr(a, "shape") and hasattr(a, "dtype") and len(a.shape) >= 1 for a in leaves):
        return 1  # a dataset or a generator: one pass per call
    nbytes = sum(np.asarray(a).nbytes for a in leaves)
    return int(max(1, min(num_samples, _TILE_BYTES // max(nbytes, 1))))


def mc_dropout_predict(model, x, num_samples: int = 30, batch_size: Optional[int] = None):
    """Mean and standard deviation of `num_samples` predictions with dropout on.

    Args:
        model: a Keras model with at least one dropout layer.
        x: the inputs, anything ``model.predict`` accepts.
        num_samples: number of stochastic passes (>= 2).
        batch_size: passed to ``model.predict``.

    Returns:
        ``(mean, std)``, NumPy arrays shaped like ``model.predict(x)`` (the
        same structure for several outputs); ``std`` is the population
        standard deviation over the passes (``ddof=0``), accumulated in
        float64 (passes are merged as they come; not all are kept).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(
            f"Invalid value for argument `num_samples`. Expected an integer >= 2. Received: num_samples={num_samples!r}"
        )
    layers = [layer for layer in _keras.flatten_layers(model) if isinstance(layer, DROPOUT_LAYERS)]
    if not layers:
        raise ValueError(
            f"mc_dropout_predict: model {model.name!r} has no dropout layer (keras.layers.Dropout, "
            "SpatialDropout*, GaussianDropout or AlphaDropout), so every pass would give the same prediction."
        )
    originals = []
    passes_per_call = _passes_per_call(x, num_samples)
    try:
        for layer in layers:
            originals.append((layer, layer.__dict__.get("call")))
            object.__setattr__(layer, "call", _always_training(layer.call))  # bypass Keras attribute tracking
        model.predict_function = None  # trace once with dropout on
        count, mean, m2 = 0, None, None
        while count < num_samples:
            k = min(passes_per_call, num_samples - count)
            if passes_per_call > 1:
                # k passes in one predict call: k copies of the inputs, each row
                # gets its own dropout mask (one call costs far more than a pass).
                tiled = tree.map_structure(lambda a: np.concatenate([np.asarray(a)] * k), x)
                out = model.predict(tiled, batch_size=batch_size, verbose=0)
                samples = tree.map_structure(lambda a: np.asarray(a, "float64").reshape((k, -1) + a.shape[1:]), out)
            else:
                out = model.predict(x, batch_size=batch_size, verbose=0)
                samples = tree.map_structure(lambda a: np.asarray(a, "float64")[None], out)
            # Chan et al.'s merge of (count, mean, m2) with the k new passes.
            new_mean = tree.map_structure(lambda s: s.mean(axis=0), samples)
            new_m2 = tree.map_structure(lambda s, m: ((s - m) ** 2).sum(axis=0), samples, new_mean)
            if mean is None:
                mean, m2 = new_mean, new_m2
            else:
                total = count + k
                delta = tree.map_structure(lambda a, b: b - a, mean, new_mean)
                mean = tree.map_structure(lambda m, d: m + d * (k / total), mean, delta)
                m2 = tree.map_structure(lambda q, nq, d: q + nq + d * d * (count * k / total), m2, new_m2, delta)
            count += k
    finally:
        for layer, previous in reversed(originals):
            if previous is None:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", previous)
        model.predict_function = None  # the next predict traces without the override
    std = tree.map_structure(lambda q: np.sqrt(q / count), m2)
    to_float32 = lambda a: a.astype("float32")  # noqa: E731
    return tree.map_structure(to_float32, mean), tree.map_structure(to_float32, std)
