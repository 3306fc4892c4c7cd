"""Schedules: values against closed forms, and the scheduled rate really reaches the optimizer.

Oracles: NumPy re-implementations written from the papers' / PyTorch's
definitions (not from our code), np.interp for piecewise-linear, and the
plain-SGD update ``w <- w - lr(t) * grad`` with the gradient of the MSE
computed in NumPy.
"""

import math

import keras
import numpy as np
import pytest

import kerascool


def values(schedule, steps):
    return np.array([float(keras.ops.convert_to_numpy(schedule(t))) for t in steps])


# -- closed forms --------------------------------------------------------------


def torch_one_cycle(t, max_lr, total, pct, div, final_div, anneal, three_phase):
    """PyTorch's OneCycleLR.get_lr, transcribed as a loop over its phase table."""
    initial = max_lr / div
    minimum = initial / final_div
    if three_phase:
        phases = [
            (float(pct * total) - 1, initial, max_lr),
            (float(2 * pct * total) - 2, max_lr, initial),
            (total - 1, initial, minimum),
        ]
    else:
        phases = [(float(pct * total) - 1, initial, max_lr), (total - 1, max_lr, minimum)]
    start_step = 0
    for i, (end_step, a, b) in enumerate(phases):
        if t <= end_step or i == len(phases) - 1:
            p = (t - start_step) / (end_step - start_step)
            if anneal == "cos":
                return b + (a - b) / 2.0 * (math.cos(math.pi * p) + 1)
            return (b - a) * p + a
        start_step = end_step


@pytest.mark.parametrize("anneal", ["cos", "linear"])
@pytest.mark.parametrize("three_phase", [False, True])
def test_one_cycle_matches_pytorch_definition(anneal, three_phase):
    kw = dict(max_lr=0.3, total=50, pct=0.3, div=25.0, final_div=1e4, anneal=anneal, three_phase=three_phase)
    schedule = kerascool.OneCycle(0.3, 50, pct_start=0.3, div_factor=25.0, final_div_factor=1e4,
                                  anneal=anneal, three_phase=three_phase)
    steps = range(50)
    expected = np.array([torch_one_cycle(t, **kw) for t in steps])
    np.testing.assert_allclose(values(schedule, steps), expected, rtol=2e-5, atol=1e-9)
    # Past the cycle it stays at the final rate (PyTorch raises there).
    np.testing.assert_allclose(values(schedule, [60, 1000]), [expected[-1]] * 2, rtol=1e-5)


def test_linear_warmup_to_a_number_and_to_a_schedule():
    np.testing.assert_allclose(values(kerascool.LinearWarmup(0.4, 4), range(7)), [0.1, 0.2, 0.3, 0.4, 0.4, 0.4, 0.4], rtol=1e-6)
    np.testing.assert_allclose(
        values(kerascool.LinearWarmup(1.0, 2, start=0.5), range(3)), [0.75, 1.0, 1.0], rtol=1e-6
    )
    cosine = keras.optimizers.schedules.CosineDecay(1.0, decay_steps=10)
    schedule = kerascool.LinearWarmup(cosine, warmup_steps=5)
    expected = [(t + 1) / 5 for t in range(5)] + [0.5 * (1 + math.cos(math.pi * min(s, 10) / 10)) for s in range(0, 12)]
    np.testing.assert_allclose(values(schedule, range(17)), expected, rtol=1e-5, atol=1e-7)


def test_piecewise_linear_as_bert4keras():
    schedule = kerascool.PiecewiseLinear({1000: 1, 2000: 0.1})
    steps = [0, 1, 250, 999, 1000, 1500, 1999, 2000, 5000]
    np.testing.assert_allclose(values(schedule, steps), np.interp(steps, [0, 1000, 2000], [0.0, 1.0, 0.1]), rtol=1e-5, atol=1e-7)
    scaled = kerascool.PiecewiseLinear({10: 2.0, 0: 4.0, 30: 1.0}, scale=1e-3)  # unordered keys, a point at 0
    steps = range(0, 40, 3)
    np.testing.assert_allclose(values(scaled, steps), 1e-3 * np.interp(steps, [0, 10, 30], [4.0, 2.0, 1.0]), rtol=1e-5)
    flat_start = kerascool.PiecewiseLinear({5: 1.0, 10: 3.0}, from_zero=False)
    np.testing.assert_allclose(values(flat_start, [0, 5, 7, 12]), [1.0, 1.0, 1.8, 3.0], rtol=1e-6)


def test_schedules_survive_saving_a_compiled_model(tmp_path):
    schedules = [
        kerascool.LinearWarmup(keras.optimizers.schedules.CosineDecay(1e-2, 100), 10, start=1e-4),
        kerascool.OneCycle(1e-2, 100, pct_start=0.25, three_phase=True),
        kerascool.PiecewiseLinear({10: 1.0, 20: 0.1}, scale=1e-3),
    ]
    steps = [0, 5, 15, 50, 99]
    for i, schedule in enumerate(schedules):
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse")
        model.optimizer.build(model.trainable_variables)  # saved and loaded with its state
        path = str(tmp_path / f"model{i}.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
        restored = keras.optimizers.schedules.deserialize(loaded.optimizer.get_config()["learning_rate"])
        assert type(restored) is type(schedule)
        np.testing.assert_allclose(values(restored, steps), values(schedule, steps), rtol=1e-7)


# -- the rate reaches the optimizer --------------------------------------------


class WeightsAtEpochStart(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = []

    def on_epoch_begin(self, epoch, logs=None):
        self.weights.append([np.array(w) for w in self.model.get_weights()])


def mse_grads_two_layers(w1, b1, w2, b2, x, y):
    h = x @ w1 + b1
    g = 2.0 * ((h @ w2 + b2) - y) / y.size
    dh = g @ w2.T
    return [x.T @ dh, dh.sum(0), h.T @ g, g.sum(0)]


def two_layer_model():
    return keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, name="body"), keras.layers.Dense(1, name="head")], name="net"
    )


@pytest.mark.parametrize("multipliers", [None, {"body": 0.5}])
def test_warmup_reaches_the_sgd_update_and_combines_with_layer_rates(multipliers):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    model = two_layer_model()
    schedule = kerascool.LinearWarmup(0.2, warmup_steps=4, start=0.0)
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss="mse")
    if multipliers:
        kerascool.layer_rates(model, multipliers, verbose=False)
    record = WeightsAtEpochStart()
    epochs = 6  # one full batch per epoch: epoch t is update t
    model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0, callbacks=[record])
    trajectory = record.weights + [[np.array(w) for w in model.get_weights()]]
    rates = [0.05, 0.1, 0.15, 0.2, 0.2, 0.2]
    factor = [0.5, 0.5, 1.0, 1.0] if multipliers else [1.0] * 4  # body kernel, body bias, head kernel, head bias
    for t in range(epochs):
        before, after = trajectory[t], trajectory[t + 1]
        grads = mse_grads_two_layers(*[w.astype("float64") for w in before], x.astype("float64"), y.astype("float64"))
        for w0, w1, g, f in zip(before, after, grads, factor):
            np.testing.assert_allclose(w1 - w0, -f * rates[t] * g, rtol=2e-4, atol=1e-6)


def test_one_cycle_drives_adam_as_a_constant_rate_would_step_by_step():
    """Adam at step t with OneCycle == Adam whose constant rate is set to OneCycle(t) before step t."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 3)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    schedule = kerascool.OneCycle(0.05, total_steps=6, pct_start=0.5)
    a = two_layer_model()
    a.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse")
    b = two_layer_model()
    b.set_weights(a.get_weights())
    b.compile(optimizer=keras.optimizers.Adam(0.0), loss="mse")
    a.fit(x, y, batch_size=8, epochs=6, shuffle=False, verbose=0)

    class SetRate(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.model.optimizer.learning_rate = float(values(schedule, [epoch])[0])

    b.fit(x, y, batch_size=8, epochs=6, shuffle=False, verbose=0, callbacks=[SetRate()])
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-7)


# -- misuse --------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: kerascool.LinearWarmup(1e-3, 0), r"`warmup_steps`. Expected an integer >= 1. Received: warmup_steps=0"),
        (lambda: kerascool.LinearWarmup(-1.0, 10), r"`after`. Expected a finite number >= 0.0. Received: after=-1.0"),
        (lambda: kerascool.LinearWarmup(1e-3, 10, start=float("nan")), r"`start`"),
        (lambda: kerascool.OneCycle(0.0, 100), r"`max_lr`. Expected a finite number > 0.0"),
        (lambda: kerascool.OneCycle(1e-3, 100, pct_start=1.5), r"`pct_start`. Expected a finite number in \(0.0, 1.0\)"),
        (lambda: kerascool.OneCycle(1e-3, 10, pct_start=0.05), r"every phase of the cycle needs at least one step"),
        (lambda: kerascool.OneCycle(1e-3, 10, anneal="exp"), r"`anneal`. Expected one of \('cos', 'linear'\)"),
        (lambda: kerascool.OneCycle(1e-3, 1), r"`total_steps`. Expected an integer >= 2"),
        (lambda: kerascool.PiecewiseLinear({}), r"Expected a non-empty dict \{step: value\}"),
        (lambda: kerascool.PiecewiseLinear({-5: 1.0}), r"Expected integer steps >= 0. Received: step -5"),
        (lambda: kerascool.PiecewiseLinear({5: float("inf")}), r"`schedule\[5\]`. Expected a finite number"),
    ],
)
def test_bad_arguments_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
