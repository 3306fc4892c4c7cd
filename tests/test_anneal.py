"""AnnealVariable: the loss of each step is the NumPy loss with that step's scheduled value.

Oracle: the model is linear, so each batch loss ``mse + beta * mean(h**2)``
is recomputed in NumPy from the weights recorded before the step and the
value the schedule gives for that step; the epoch loss Keras reports is the
mean of the batch losses (equal batch sizes). Traces are counted by the
step hook (one per fit).
"""

import math

import keras
import numpy as np
import pytest
from keras import ops

import kerascool
from kerascool import _core


class Penalty(keras.layers.Layer):
    """Adds ``beta * mean(x**2)`` to the loss; beta is this layer's non-trainable variable."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.beta = keras.Variable(0.0, trainable=False, name="beta")

    def call(self, x):
        self.add_loss(self.beta * ops.mean(x * x))
        return x


def model_with_penalty():
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(2, name="hidden")(inputs)
    hidden = Penalty(name="penalty")(hidden)
    outputs = keras.layers.Dense(1, name="out")(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


def numpy_loss(weights, beta, x, y):
    w1, b1, w2, b2 = [w.astype("float64") for w in weights]
    h = x @ w1 + b1
    return float(np.mean((h @ w2 + b2 - y) ** 2) + beta * np.mean(h * h))


class WeightsPerBatch(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = []

    def on_train_batch_begin(self, batch, logs=None):
        self.weights.append([np.array(w) for w in self.model.trainable_weights])


def data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)).astype("float32"), rng.normal(size=(n, 1)).astype("float32")


def test_per_step_loss_uses_each_steps_value_without_retracing():
    x, y = data()
    model = model_with_penalty()
    beta = model.get_layer("penalty").beta
    schedule = {6: 3.0}  # 0 -> 3 over 6 steps, then 3 (PiecewiseLinear)
    anneal = kerascool.AnnealVariable(beta, schedule, log_as="beta")
    record = WeightsPerBatch()
    history = model.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0, callbacks=[anneal, record])
    values = [min(t, 6) * 0.5 for t in range(8)]
    batch_losses = [
        numpy_loss(w, values[t], x[(t % 2) * 8:(t % 2) * 8 + 8], y[(t % 2) * 8:(t % 2) * 8 + 8])
        for t, w in enumerate(record.weights)
    ]
    expected = [np.mean(batch_losses[2 * e:2 * e + 2]) for e in range(4)]
    np.testing.assert_allclose(history.history["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(history.history["beta"], [values[2 * e + 1] for e in range(4)], rtol=1e-6)
    assert float(beta.numpy()) == pytest.approx(values[7])
    assert _core.installation_of(model).trace_count == 1

    # A second fit continues from the shared step counter; a third without the
    # callback leaves the variable alone (no stale trace brings the prologue back).
    history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[anneal])
    assert history.history["beta"] == [pytest.approx(3.0)]
    beta.assign(0.25)
    record = WeightsPerBatch()
    history = model.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0, callbacks=[record])
    assert history.history["loss"][0] == pytest.approx(numpy_loss(record.weights[0], 0.25, x[:8], y[:8]), rel=1e-5)
    assert float(beta.numpy()) == 0.25


def test_per_epoch_python_schedule_and_validation_see_the_new_value():
    x, y = data(8, seed=1)
    model = model_with_penalty()
    beta = model.get_layer("penalty").beta

    def schedule(epoch):  # any Python: runs between epochs
        return 2.0 * math.cos(epoch) ** 2

    record = WeightsPerBatch()

    class WeightsAtEpochEnd(keras.callbacks.Callback):
        weights = []

        def on_epoch_end(self, epoch, logs=None):
            self.weights.append([np.array(w) for w in self.model.trainable_weights])

    end = WeightsAtEpochEnd()
    anneal = kerascool.AnnealVariable(beta, schedule, per="epoch", log_as="beta")
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0, validation_data=(x, y), callbacks=[anneal, record, end])
    for e in range(3):
        value = 2.0 * math.cos(e) ** 2
        assert history.history["loss"][e] == pytest.approx(numpy_loss(record.weights[e], value, x, y), rel=1e-5)
        assert history.history["val_loss"][e] == pytest.approx(numpy_loss(end.weights[e], value, x, y), rel=1e-5)
        assert history.history["beta"][e] == pytest.approx(value, rel=1e-6)


def test_variable_tracked_by_the_model_used_in_the_loss_function():
    x, y = data(8, seed=2)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.temperature = keras.Variable(1.0, trainable=False, name="temperature")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=lambda t, p: ops.mean((t - p) ** 2) / model.temperature)
    schedule = kerascool.OneCycle(4.0, total_steps=6, pct_start=0.5, div_factor=4.0, final_div_factor=2.0)
    record = WeightsPerBatch()
    history = model.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0,
                        callbacks=[kerascool.AnnealVariable(model.temperature, schedule), record])
    temps = [float(keras.ops.convert_to_numpy(schedule(t))) for t in range(6)]
    losses = []
    for t, (w, b) in enumerate(record.weights):
        xb, yb = x[(t % 2) * 4:(t % 2) * 4 + 4], y[(t % 2) * 4:(t % 2) * 4 + 4]
        losses.append(np.mean((xb @ w + b - yb) ** 2) / temps[t])
    np.testing.assert_allclose(history.history["loss"], [np.mean(losses[i:i + 2]) for i in (0, 2, 4)], rtol=1e-5)


def test_misuse_is_caught_before_training():
    model = model_with_penalty()
    x, y = data(8)
    weights = [np.array(w) for w in model.get_weights()]
    loose = keras.Variable(1.0, trainable=False, name="loose")
    with pytest.raises(ValueError, match=r"'loose' is not part of the model's state"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[kerascool.AnnealVariable(loose, {10: 1.0})])
    with pytest.raises(ValueError, match=r"'loose' is not part of the model's state"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[kerascool.AnnealVariable(loose, lambda e: 1.0, per="epoch")])
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)
    with pytest.raises(ValueError, match=r"is trainable, so the optimizer would change it too"):
        kerascool.AnnealVariable(model.get_layer("hidden").kernel, {10: 1.0})
    beta = model.get_layer("penalty").beta
    with pytest.raises(TypeError, match=r"Expected a keras.Variable. Received: variable=1.0"):
        kerascool.AnnealVariable(1.0, {10: 1.0})
    with pytest.raises(TypeError, match=r"Expected a callable fn\(step\) -> value"):
        kerascool.AnnealVariable(beta, 0.5)
    with pytest.raises(ValueError, match=r"Expected one of \('step', 'epoch'\). Received: per='batch'"):
        kerascool.AnnealVariable(beta, {10: 1.0}, per="batch")
    vector = keras.Variable(np.zeros(2, "float32"), trainable=False)
    with pytest.raises(ValueError, match=r"only a scalar variable can be logged"):
        kerascool.AnnealVariable(vector, {10: 1.0}, log_as="v")
    with pytest.raises(ValueError, match=r"does not broadcast to the variable's shape \(\)"):
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[kerascool.AnnealVariable(beta, lambda t: ops.ones((3,)) * t)])
