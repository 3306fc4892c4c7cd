"""Two-gradient steps (SAM, ASAM, Heun), decided by closed forms and NumPy re-implementations.

Models are linear with the mean squared error, so the gradient at any point is known
in closed form: g(w, b) = 2/n X^T r, 2/n sum(r), with r = X w + b - y.
"""

import keras
import numpy as np
import pytest
from keras import ops

import kerascool
from tests.helpers import regression_data, tiny_mlp, weights_of

LR = 0.1


def linear_model(inputs=3, name="linear"):
    return keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(1, name="dense")], name=name)


def linear_grad(params, x, y):
    w, b = params
    r = x @ w + b - y
    n = len(x)
    return [2.0 / n * x.T @ r, 2.0 / n * r.sum(axis=0)]


def sam_grad(params, x, y, rho, adaptive=False, eta=0.01):
    """The SAM (or ASAM) gradient, re-implemented from the papers' formulas."""
    g = linear_grad(params, x, y)
    if adaptive:
        t = [np.abs(p) + eta for p in params]
        tg = [ti * gi for ti, gi in zip(t, g)]
        norm = np.sqrt(sum(np.sum(v**2) for v in tg))
        e = [rho * ti * ti * gi / norm for ti, gi in zip(t, g)]
    else:
        norm = np.sqrt(sum(np.sum(v**2) for v in g))
        e = [rho * gi / norm for gi in g]
    return linear_grad([p + ei for p, ei in zip(params, e)], x, y)


def assert_close(xs, ys, atol=1e-5):
    for x, y in zip(xs, ys):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def half_square_loss(y_true, y_pred):
    return 0.5 * ops.mean(ops.square(y_pred))


@pytest.mark.parametrize("a, theta", [(2.0, 1.5), (8.0, -0.7)])
def test_heun_one_step_equals_the_closed_form(a, theta):
    # L = a theta^2 / 2: a bias-free Dense(1) on the input sqrt(a), loss 0.5 * pred^2.
    model = kerascool.heun(keras.Sequential([
        keras.Input((1,)),
        keras.layers.Dense(1, use_bias=False, kernel_initializer=keras.initializers.Constant(theta)),
    ]))
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=half_square_loss)
    model.fit(np.full((1, 1), np.sqrt(a), "float32"), np.zeros((1, 1), "float32"), epochs=1, verbose=0)

    g = lambda t: a * t  # noqa: E731
    expected = theta - LR / 2 * (g(theta) + g(theta - LR * g(theta)))
    np.testing.assert_allclose(model.get_weights()[0][0, 0], expected, rtol=1e-6)
    # Not the plain gradient-descent step:
    assert abs(expected - (theta - LR * g(theta))) > 1e-3


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_steps_equal_the_formula(adaptive):
    x, y = regression_data(n=8, inputs=3)
    rho = 0.5 if adaptive else 0.05
    model = kerascool.sam(linear_model(), rho=rho, adaptive=adaptive)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    params = [w.astype("float64") for w in model.get_weights()]
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)  # two steps

    for batch in (slice(0, 4), slice(4, 8)):
        g = sam_grad(params, x[batch].astype("float64"), y[batch].astype("float64"), rho, adaptive)
        params = [p - LR * gi for p, gi in zip(params, g)]
    assert_close(weights_of(model), params)
    plain = [p - LR * gi for p, gi in zip(params, linear_grad(params, x[4:], y[4:]))]
    assert not np.allclose(plain[0], params[0], atol=1e-4)


def test_sam_with_adam_is_adam_on_the_sam_gradient():
    x, y = regression_data(n=12, inputs=3)
    model = kerascool.sam(linear_model(), rho=0.1)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    params = [w.astype("float64") for w in model.get_weights()]
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)

    # NumPy Adam (Keras's form: epsilon outside the square root, bias correction in the rate).
    m, v = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    for t, batch in enumerate((slice(0, 4), slice(4, 8), slice(8, 12)), start=1):
        g = sam_grad(params, x[batch], y[batch], rho=0.1)
        m = [0.9 * mi + 0.1 * gi for mi, gi in zip(m, g)]
        v = [0.999 * vi + 0.001 * gi**2 for vi, gi in zip(v, g)]
        rate = 0.05 * np.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        params = [p - rate * mi / (np.sqrt(vi) + 1e-7) for p, mi, vi in zip(params, m, v)]
    assert_close(weights_of(model), params)
    assert int(model.optimizer.iterations) == 3


@pytest.mark.parametrize("order", ["sam_first", "anneal_first"])
def test_the_second_gradient_sees_the_annealed_loss_weight(order):
    # loss = beta_t * mse with beta_t = 1 + t set per step by AnnealVariable. SAM's
    # perturbation is normalized (beta cancels), its second gradient is beta_t times
    # the mse gradient: a stale beta would show. Either order of setting them up.
    x, y = regression_data(n=12, inputs=3)
    model = linear_model()
    model.beta = keras.Variable(1.0, trainable=False, name="beta")
    compile_kwargs = dict(optimizer=keras.optimizers.SGD(LR), loss=lambda t, p: model.beta * ops.mean((t - p) ** 2))
    params = [np.array(v, "float64") for v in model.trainable_variables]

    def anneal():
        return kerascool.AnnealVariable(model.beta, lambda t: 1.0 + t)

    if order == "anneal_first":  # one plain step first: the annealing is set up before SAM
        model.compile(**compile_kwargs)
        model.fit(x[:4], y[:4], batch_size=4, epochs=1, verbose=0, callbacks=[anneal()])
        params = [p - LR * 1.0 * g for p, g in zip(params, linear_grad(params, x[:4], y[:4]))]
    model = kerascool.sam(model, rho=0.05)
    model.compile(**compile_kwargs)
    if order == "anneal_first":
        model.optimizer.build(model.trainable_variables)
    first = kerascool.real_steps(model)
    model.fit(x[4:], y[4:], batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[anneal()])

    for t, batch in enumerate((slice(4, 8), slice(8, 12)), start=first):
        g = sam_grad(params, x[batch].astype("float64"), y[batch].astype("float64"), rho=0.05)
        params = [p - LR * (1.0 + t) * gi for p, gi in zip(params, g)]
    assert_close([np.array(v) for v in model.trainable_variables], params)
    assert float(model.beta.numpy()) == 1.0 + first + 1


def test_sam_trains_a_small_model_below_its_first_epoch_loss():
    x, y = regression_data(n=64, inputs=4)
    y = np.tanh(x[:, :1] * 1.5 - x[:, 1:2]).astype("float32")
    model = kerascool.sam(keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]), rho=0.05)
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=5, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("scaling", ["loss_scale_optimizer", "loss_scale_factor"])
def test_loss_scaling_gives_the_same_step(scaling):
    # float32 model, scale a power of two: scaling and unscaling are exact.
    x, y = regression_data(n=4, inputs=3)
    model = kerascool.sam(linear_model(), rho=0.05)
    if scaling == "loss_scale_optimizer":
        optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(LR), initial_scale=1024.0)
    else:
        optimizer = keras.optimizers.SGD(LR, loss_scale_factor=1024.0)
    model.compile(optimizer=optimizer, loss="mse")
    params = model.get_weights()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    expected = [p - LR * g for p, g in zip(params, sam_grad(params, x, y, rho=0.05))]
    assert_close(weights_of(model), expected)


class _BatchLogs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append(dict(logs))


def test_fit_metrics_progress_bar_and_callbacks_see_the_unperturbed_loss(capsys):
    x, y = regression_data(n=8, inputs=3)
    model = kerascool.sam(linear_model(), rho=0.5)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", metrics=["mae"])
    w, b = model.get_weights()
    batch_logs = _BatchLogs()
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=1, validation_data=(x, y), callbacks=[batch_logs])

    residual = x @ w + b - y  # at the weights the step started from
    np.testing.assert_allclose(history.history["loss"][0], np.mean(residual**2), rtol=1e-5)
    np.testing.assert_allclose(history.history["mae"][0], np.mean(np.abs(residual)), rtol=1e-5)
    np.testing.assert_allclose(batch_logs.logs[0]["loss"], np.mean(residual**2), rtol=1e-5)
    np.testing.assert_allclose(history.history["val_loss"][0], model.evaluate(x, y, verbose=0)[0], rtol=1e-5)
    assert "loss:" in capsys.readouterr().out  # the progress bar ran


def test_gradient_transforms_and_accumulation_see_the_final_gradient():
    # Two micro-batches, each with its own SAM gradient, averaged, then clipped, then SGD.
    x, y = regression_data(n=8, inputs=3)
    clip, rho = 0.05, 0.05
    model = kerascool.sam(linear_model(), rho=rho)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    params = model.get_weights()
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[
        kerascool.GradientAccumulation(steps=2),
        kerascool.GradientTransform(kerascool.ClipByGlobalNorm(clip)),
    ])

    g = [(a + b) / 2 for a, b in zip(sam_grad(params, x[:4], y[:4], rho), sam_grad(params, x[4:], y[4:], rho))]
    norm = np.sqrt(sum(np.sum(gi**2) for gi in g))
    assert norm > clip  # the clip is active
    expected = [p - gi * clip / norm for p, gi in zip(params, g)]
    assert_close(weights_of(model), expected)
    assert kerascool.real_steps(model) == 1


def test_ema_averages_the_sam_steps():
    x, y = regression_data(n=8, inputs=3)
    model = kerascool.sam(linear_model(), rho=0.05)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    params = model.get_weights()
    ema = kerascool.EMA(decay=0.5, start=1)  # a copy at the first update, then the average
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[ema])

    p1 = [p - LR * g for p, g in zip(params, sam_grad(params, x[:4], y[:4], 0.05))]
    p2 = [p - LR * g for p, g in zip(p1, sam_grad(p1, x[4:], y[4:], 0.05))]
    assert_close(weights_of(model), p2)
    with ema.swapped():
        assert_close(weights_of(model), [0.5 * a + 0.5 * b for a, b in zip(p1, p2)])


def test_second_evaluation_reuses_dropout_masks_and_keeps_first_batchnorm_statistics():
    # With a tiny rho the SAM step is the stock step, if and only if both evaluations
    # saw the same dropout mask; BatchNorm's statistics come from the first one only.
    x, y = regression_data(n=16, inputs=4)

    def make(name):
        keras.utils.set_random_seed(7)  # same dropout seeds for both models
        return keras.Sequential([
            keras.Input((4,)), keras.layers.Dense(16, name="d1"), keras.layers.Dropout(0.5),
            keras.layers.BatchNormalization(), keras.layers.Dense(1, name="d2")], name=name)

    stock, ours = make("stock"), make("ours")
    ours.set_weights(stock.get_weights())
    ours = kerascool.sam(ours, rho=1e-7)
    stock.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    ours.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    stock.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    ours.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert_close(weights_of(ours), weights_of(stock), atol=1e-5)


def test_stock_step_undoes_and_a_second_decoration_replaces():
    x, y = regression_data(n=4, inputs=3)
    model = kerascool.sam(linear_model(), rho=0.05)
    model = kerascool.sam(model, rho=0.2)  # replaces, does not stack
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    params = model.get_weights()
    model.fit(x, y, batch_size=4, verbose=0)
    params = [p - LR * g for p, g in zip(params, sam_grad(params, x, y, rho=0.2))]
    assert_close(weights_of(model), params)

    assert kerascool.stock_step(kerascool.stock_step(model)) is model  # idempotent
    model.fit(x, y, batch_size=4, verbose=0)
    params = [p - LR * g for p, g in zip(params, linear_grad(params, x, y))]
    assert_close(weights_of(model), params)


@pytest.mark.parametrize("rho", [0, -0.05, float("nan"), True, "0.05"])
def test_bad_rho_raises(rho):
    model = linear_model()
    with pytest.raises(ValueError, match=r"Invalid value for argument `rho`. Expected a finite number > 0"):
        kerascool.sam(model, rho=rho)
    assert "train_step" not in model.__dict__  # nothing changed


def test_other_misuse_raises():
    with pytest.raises(TypeError, match="Invalid value for argument `adaptive`"):
        kerascool.sam(linear_model(), adaptive="yes")
    with pytest.raises(ValueError, match="Invalid value for argument `eta`"):
        kerascool.sam(linear_model(), adaptive=True, eta=-1.0)
    with pytest.raises(TypeError, match="Expected a keras.Model"):
        kerascool.heun(keras.layers.Dense(1))


def test_apply_outside_fit_raises_with_the_fix():
    model = kerascool.heun(tiny_mlp())
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    model.fit(*regression_data(n=4), verbose=0)  # installs the hook on the optimizer
    grads = [ops.zeros(v.shape) for v in model.trainable_variables]
    with pytest.raises(RuntimeError, match="stock_step"):
        model.optimizer.apply(grads, model.trainable_variables)


_DATA_PARALLEL = r'''
import json, os, sys
if os.environ["KERAS_BACKEND"] == "jax":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
else:
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import contextlib, keras, numpy as np, kerascool

def scope(parallel):
    if not parallel:
        return contextlib.nullcontext()
    if keras.backend.backend() == "jax":
        import jax
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
        return contextlib.nullcontext()
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope()

rng = np.random.default_rng(0)
x, y = rng.normal(size=(16, 4)).astype("float32"), rng.normal(size=(16, 1)).astype("float32")
def run(parallel):
    keras.utils.set_random_seed(3)
    with scope(parallel):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
        model = kerascool.sam(model, rho=0.1)
        model.compile(keras.optimizers.Adam(0.01), "mse")
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[kerascool.GradientAccumulation(2)])
    return [np.array(w) for w in model.get_weights()]

single, parallel = run(False), run(True)
out = max(float(np.abs(a - b).max()) for a, b in zip(single, parallel))
print(json.dumps(out))
'''


def test_two_replicas_equal_one_device():
    # TF MirroredStrategy / JAX DataParallel on 2 CPU devices, global batch 8, SAM and accumulation:
    # the hooks see replica-summed gradients, so the perturbation (and Heun's trial step) is global.
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend(), TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", _DATA_PARALLEL], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) < 1e-6
