"""Small models and data shared by the tests (tiny, so CI stays fast)."""

import keras
import numpy as np

BACKEND = keras.backend.backend()


def tiny_mlp(inputs=4, hidden=3, outputs=1, name="mlp"):
    return keras.Sequential(
        [keras.Input((inputs,)), keras.layers.Dense(hidden, name="hidden"), keras.layers.Dense(outputs, name="out")],
        name=name,
    )


def regression_data(n=32, inputs=4, outputs=1, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, inputs)).astype("float32")
    y = rng.normal(size=(n, outputs)).astype("float32")
    return x, y


def weights_of(model):
    """All weights as NumPy arrays (syncs JAX state)."""
    return [np.array(w) for w in model.get_weights()]


def optimizer_state(model):
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in model.optimizer.variables]
