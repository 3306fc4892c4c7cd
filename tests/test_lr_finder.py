"""find_lr: state restored bit for bit, a plot written, a sensible suggestion on a known problem.

Oracles: byte equality of every model, optimizer and metric variable before
and after (also after an exception mid-sweep); a training run after find_lr
equal to the same run without it; the loss of each sweep step recomputed in
NumPy from the closed-form rate; and a least-squares problem with whitened
inputs whose Hessian is 2I, so SGD converges in one step at rate 0.5 and
diverges above 1.
"""

import sys

import keras
import numpy as np
import pytest
from PIL import Image

import kerascool
from kerascool.lr_finder import suggest_lr


def state(model):
    variables = model.variables + model.optimizer.variables + model.metrics_variables
    return [np.array(keras.ops.convert_to_numpy(v.value), copy=True) for v in variables]


def assert_same_state(before, after):
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


def regression(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    x = (x - x.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(x.T, bias=True))).T  # whitened: E[xx^T] = I
    x = x.astype("float32")
    w = rng.normal(size=(4, 1)).astype("float32")
    return x, (x @ w).astype("float32")


def busy_model():
    """BatchNorm statistics, a dropout seed, Adam moments: state of every kind."""
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", metrics=["mae"])
    return model


def test_state_is_restored_bit_for_bit_and_the_plot_is_written(tmp_path):
    x, y = regression()
    model = busy_model()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)  # non-trivial optimizer state
    before = state(model)
    rate_variable = model.optimizer.variables[1]
    path = tmp_path / "plots" / "lr.png"
    result = kerascool.find_lr(model, (x, y), batch_size=32, num_steps=12, end_lr=1.0, plot=str(path))
    assert_same_state(before, state(model))
    assert model.optimizer.variables[1] is rate_variable
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-3)
    assert result.plot_path == str(path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
    assert 5 <= len(result.rates) <= 12
    np.testing.assert_allclose(result.rates, 1e-7 * (1.0 / 1e-7) ** (np.arange(len(result.rates)) / 11), rtol=1e-9)
    assert result.rates.shape == result.losses.shape == result.smoothed_losses.shape


def test_training_after_find_lr_equals_training_without_it():
    x, y = regression()
    model = busy_model()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    start = state(model)
    variables = model.variables + model.optimizer.variables + model.metrics_variables

    model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    without = [np.array(w) for w in model.get_weights()]
    for v, value in zip(variables, start):
        v.assign(value)
    kerascool.find_lr(model, (x, y), batch_size=32, num_steps=10, plot=None)
    model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(without, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_each_step_trains_at_the_closed_form_rate():
    """SGD on least squares: the loss of step i follows from the NumPy recursion at rate r_i."""
    x, y = regression(64)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(optimizer=keras.optimizers.SGD(0.123), loss="mse")
    w = np.array(model.get_weights()[0], "float64")
    result = kerascool.find_lr(model, (x, y), batch_size=64, start_lr=1e-3, end_lr=1.0, num_steps=12,
                               smoothing=0.0, plot=None)
    xs, ys = x.astype("float64"), y.astype("float64")
    for rate, loss in zip(result.rates, result.losses):
        err = xs @ w - ys
        assert loss == pytest.approx(float(np.mean(err**2)), rel=1e-4)
        w = w - rate * 2.0 * xs.T @ err / len(xs)
    np.testing.assert_allclose(result.smoothed_losses, result.losses)  # smoothing=0: no averaging


def test_suggestion_on_a_problem_with_a_known_good_rate():
    x, y = regression(512)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    result = kerascool.find_lr(model, (x, y), batch_size=128, start_lr=1e-5, end_lr=100.0, num_steps=100, plot=None)
    assert result.diverged and len(result.rates) < 100  # stopped on divergence (rates > 1 diverge)
    assert 1e-5 <= result.suggested_lr <= 100.0
    # Best 0.5, divergence above 1. "valley" (the default) is conservative by design (fastai: about a
    # tenth of the rate at the minimum): within 30x below the best; the others within 10x.
    assert 0.5 / 30 <= result.suggested_lr <= 1.0
    for method in ("steepest", "minimum"):
        assert 0.05 <= suggest_lr(result.rates, result.smoothed_losses, method) <= 1.0, method


def test_an_exception_mid_sweep_restores_everything(monkeypatch):
    x, y = regression(64)
    model = busy_model()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    before = state(model)

    original = kerascool.lr_finder._Sweep.on_epoch_end

    def interrupted(self, epoch, logs=None):  # Ctrl-C arrives between two steps of the sweep
        original(self, epoch, logs)
        if epoch == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(kerascool.lr_finder._Sweep, "on_epoch_end", interrupted)
    with pytest.raises(KeyboardInterrupt):
        kerascool.find_lr(model, (x, y), batch_size=16, num_steps=20, plot=None)
    assert_same_state(before, state(model))
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # still trains, at its own rate
    assert np.isfinite(history.history["loss"][0])


def test_a_scheduled_optimizer_gets_its_schedule_back():
    x, y = regression(64)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    schedule = kerascool.OneCycle(0.1, total_steps=100)
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss="mse")
    before = state(model)
    kerascool.find_lr(model, (x, y), batch_size=16, num_steps=8, plot=None)
    assert_same_state(before, state(model))
    assert float(model.optimizer.learning_rate) == pytest.approx(float(schedule(0)))


def test_misuse_and_a_missing_matplotlib(monkeypatch):
    x, y = regression(32)
    uncompiled = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match=r"find_lr needs a compiled model"):
        kerascool.find_lr(uncompiled, (x, y))
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    for kwargs, match in [
        ({"start_lr": 0.0}, r"`start_lr`. Expected a finite number > 0. Received: start_lr=0.0"),
        ({"start_lr": 1.0, "end_lr": 0.1}, r"`end_lr`. Expected a value > start_lr=1.0. Received: end_lr=0.1"),
        ({"num_steps": 3}, r"`num_steps`. Expected an integer >= 5. Received: num_steps=3"),
        ({"smoothing": 1.0}, r"`smoothing`. Expected a value in \[0, 1\)"),
        ({"diverge_threshold": 1.0}, r"`diverge_threshold`. Expected a number > 1"),
        ({"suggest": "elbow"}, r"`suggest`. Expected one of \('valley', 'steepest', 'minimum'\)"),
        ({"plot": "lr.jpg"}, r"`plot`. Expected a path ending in .png, or None"),
    ]:
        with pytest.raises(ValueError, match=match):
            kerascool.find_lr(model, (x, y), **kwargs)
    with pytest.raises(ValueError, match=r"`data`. Expected \(x, y\), \(x, y, sample_weight\) or a dataset"):
        kerascool.find_lr(model, (x,))

    before = state(model)
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install kerascool\[plot\]"):
        kerascool.find_lr(model, (x, y), plot="lr.png")
    assert_same_state(before, state(model))


def fastai_valley(lrs, losses):
    """fastai's `valley` suggestion (fastai/callback/schedule.py), transcribed."""
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if (losses[i] < losses[j]) and (lds[i] < lds[j] + 1):
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return max_start + int(sections) + int(sections / 2)


def test_valley_matches_fastai():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(200):
        n = int(rng.integers(5, 80))
        rates, losses = np.logspace(-5, 1, n), rng.normal(size=n).cumsum()
        idx = fastai_valley(rates, losses)
        if idx < 0:  # fastai wraps around to the LAST (largest) rate there; we take the first
            assert suggest_lr(rates, losses, "valley") == rates[0]
            continue
        assert suggest_lr(rates, losses, "valley") == rates[idx]
        checked += 1
    assert checked > 150
