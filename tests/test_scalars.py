"""ScalarMetric: a scalar computed inside `call` or a loss shows in History, averaged per epoch.

Oracle: the model is linear, so the logged quantities (the mean squared norm
of the hidden layer, the mean prediction) are recomputed in NumPy from the
weights recorded before each step; the epoch value is their mean over the
epoch's steps, the validation value the one at the end of the epoch.
"""

import keras
import numpy as np
import pytest
from keras import ops

import kerascool
from tests.helpers import BACKEND


class Hidden(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3)
        self.sq_norm = kerascool.ScalarMetric("hidden_sq_norm")

    def call(self, x):
        h = self.dense(x)
        self.sq_norm.log(ops.mean(ops.sum(h * h, axis=-1)))
        return h


def build():
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(1, name="out")(Hidden(name="hidden")(inputs))
    model = keras.Model(inputs, outputs)
    model.pred_mean = kerascool.ScalarMetric("pred_mean")  # tracked by the model, logged by the loss

    def loss(y_true, y_pred):
        model.pred_mean.log(ops.mean(y_pred))
        return ops.mean((y_true - y_pred) ** 2)

    return model, loss


class WeightsPerBatch(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = []

    def on_train_batch_begin(self, batch, logs=None):
        self.weights.append([np.array(w) for w in self.model.get_weights()])


def quantities(weights, x):
    w1, b1, w2, b2 = [w.astype("float64") for w in weights]
    h = x @ w1 + b1
    return np.mean(np.sum(h * h, axis=-1)), np.mean(h @ w2 + b2)


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_logged_scalars_equal_the_recomputed_quantities(steps_per_execution):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    xv = rng.normal(size=(8, 4)).astype("float32")
    yv = rng.normal(size=(8, 1)).astype("float32")
    model, loss = build()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss, steps_per_execution=steps_per_execution)
    record = WeightsPerBatch()

    class WeightsAtEpochEnd(keras.callbacks.Callback):
        weights = []

        def on_epoch_end(self, epoch, logs=None):
            self.weights.append([np.array(w) for w in self.model.get_weights()])

    end = WeightsAtEpochEnd()
    history = model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
                        validation_data=(xv, yv), callbacks=[record, end])
    if steps_per_execution == 1:
        per_step = [quantities(w, x[(t % 4) * 4:(t % 4) * 4 + 4]) for t, w in enumerate(record.weights)]
        for e in range(2):
            np.testing.assert_allclose(history.history["hidden_sq_norm"][e], np.mean([q[0] for q in per_step[4 * e:4 * e + 4]]), rtol=1e-5)
            np.testing.assert_allclose(history.history["pred_mean"][e], np.mean([q[1] for q in per_step[4 * e:4 * e + 4]]), rtol=1e-5, atol=1e-6)
    for e in range(2):
        sq, mean = quantities(end.weights[e], xv)
        np.testing.assert_allclose(history.history["val_hidden_sq_norm"][e], sq, rtol=1e-5)
        np.testing.assert_allclose(history.history["val_pred_mean"][e], mean, rtol=1e-5, atol=1e-6)
    # evaluate reports them too, and a layer called eagerly updates its metric directly.
    logs = model.evaluate(xv, yv, verbose=0, return_dict=True)
    np.testing.assert_allclose(logs["hidden_sq_norm"], quantities(model.get_weights(), xv)[0], rtol=1e-5)
    layer = model.get_layer("hidden")
    layer.sq_norm.reset_state()
    layer(xv)
    np.testing.assert_allclose(float(layer.sq_norm.result()), quantities(model.get_weights(), xv)[0], rtol=1e-5)


def test_no_gradient_flows_through_the_logged_value():
    """The metric reads the hidden layer; training with it equals training without it."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    logged, loss = build()
    logged.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    plain.set_weights(logged.get_weights())
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    logged.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(logged.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_misuse():
    with pytest.raises(ValueError, match=r"Expected a non-empty string. Received: name=''"):
        kerascool.ScalarMetric("")

    class Vector(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.m = kerascool.ScalarMetric("v")

        def call(self, x):
            self.m.log(x)  # not reduced
            return x

    with pytest.raises(ValueError, match=r"logs one value per call. Received a tensor of shape .*reduce it first"):
        keras.Sequential([keras.Input((4,)), Vector(), keras.layers.Dense(1)])  # raised as the model is built

    untracked = kerascool.ScalarMetric("untracked")

    class Loose(keras.layers.Layer):
        def call(self, x):
            untracked.log(ops.mean(x))
            return x

    model = keras.Sequential([keras.Input((4,)), Loose(), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    if BACKEND == "jax":
        with pytest.raises(ValueError, match=r"'untracked' is updated inside the model's forward pass or loss but is not tracked"):
            model.fit(np.ones((8, 4)), np.ones((8, 1)), epochs=1, verbose=0)
    else:  # TF updates it in place, but Keras reports only the metrics the model tracks
        history = model.fit(np.ones((8, 4)), np.ones((8, 1)), epochs=1, verbose=0)
        assert "untracked" not in history.history
