"""Values logged from inside the step are right under mixed precision, run_eagerly, steps_per_execution and ragged batches.

Oracles: closed forms. A linear model ``p = x W + b`` under MSE has the
gradient ``dW = 2 / (B * O) x^T (p - y)``, ``db = 2 / (B * O) sum(p - y)``,
computed in NumPy (float64) from the weights recorded before each batch;
`skipped_steps` counts the non-finite batches; the layer-rate warmup is
``min(1, (t + 1) / 8)`` times the decorated multiplier; a `ScalarMetric` of
``mean(x)`` is the mean of the batch means; a `PythonMetric` equals the
function on ``predict``. With steps_per_execution=2 the oracle is the same run
with 1 (itself checked against the closed form). Tolerances: 1e-5 in float32,
1e-2 (float16) and 4e-2 (bfloat16) relative under mixed precision.
"""

import keras
import numpy as np
import pytest

import kerascool
from tests import model_kinds as mk

BACKEND = keras.backend.backend()
NAN_SAMPLE = 9  # in batch 1 of every epoch

MODES = {
    "float32": dict(policy="float32", compile={}, n=32),
    "mixed_float16": dict(policy="mixed_float16", compile={}, n=32),
    "mixed_bfloat16": dict(policy="mixed_bfloat16", compile={}, n=32),
    "run_eagerly": dict(policy="float32", compile={"run_eagerly": True}, n=32),
    "steps_per_execution_2": dict(policy="float32", compile={"steps_per_execution": 2}, n=32),
    "ragged_last_batch": dict(policy="float32", compile={}, n=30),  # batches of 8, 8, 8, 6
}
RTOL = {"float32": 1e-5, "mixed_float16": 1e-2, "mixed_bfloat16": 4e-2}

_MODE_PARAMS = [
    pytest.param(m, marks=pytest.mark.skipif(BACKEND != "jax", reason="mixed_bfloat16 is checked on JAX only"))
    if m == "mixed_bfloat16" else m
    for m in MODES
]


@pytest.fixture(autouse=True)
def float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def _linear():
    inputs = keras.Input((mk.INPUTS,))
    return keras.Model(inputs, mk._dense(mk.OUTPUTS, 0, "d0")(inputs), name="net")


class _WeightsBefore(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = []

    def on_train_batch_begin(self, batch, logs=None):
        self.weights.append([np.array(w, "float64") for w in self.model.get_layer("d0").get_weights()])


def _grad_norms_closed_form(x, y, weights, batch_size=8):
    """Per-step gradient norm of the linear model under MSE, epoch by epoch."""
    per_epoch, steps = [], -(-len(x) // batch_size)
    for e in range(len(weights) // steps):
        norms = []
        for i in range(steps):
            kernel, bias = weights[e * steps + i]
            xb, yb = x[i * batch_size:(i + 1) * batch_size].astype("float64"), y[i * batch_size:(i + 1) * batch_size]
            r = xb @ kernel + bias - yb
            scale = 2.0 / r.size
            norms.append(np.sqrt(np.sum((scale * xb.T @ r) ** 2) + np.sum((scale * r.sum(0)) ** 2)))
        per_epoch.append(norms)
    return per_epoch


def _fit(mode, make_model, callbacks, x, y, optimizer=None):
    cfg = MODES[mode]
    keras.mixed_precision.set_global_policy(cfg["policy"])
    model = make_model()
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.05), loss="mse", **cfg["compile"])
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=callbacks).history
    for w in model.get_weights():
        assert np.all(np.isfinite(np.asarray(w, "float32")))
    return model, history


@pytest.mark.parametrize("log_norms", ["global", "layer"])
@pytest.mark.parametrize("mode", [
    pytest.param(m, marks=mk.known_issue(BACKEND == "jax", "JAX mixed_float16 grad norms differ from float32's"))
    if m == "mixed_float16" else m for m in _MODE_PARAMS
])
def test_grad_norms_and_skipped_steps(mode, log_norms):
    x, y = mk.data(n=MODES[mode]["n"])
    mixed = mode.startswith("mixed")
    if not mixed:  # under mixed precision Keras's loss scaling skips non-finite steps before any hook sees them
        x = x.copy()
        x[NAN_SAMPLE] = np.nan
    record = _WeightsBefore()

    def transform():
        return kerascool.GradientTransform(kerascool.SkipNonFinite(), log_norms=log_norms)

    extra = [] if mode == "steps_per_execution_2" else [record]
    model, history = _fit(mode, _linear, [transform()] + extra, x, y)
    assert list(history["skipped_steps"]) == ([0, 0] if mixed else [1, 2])
    keys = ["grad_norm"] + ([k for k in history if k.startswith("grad_norm/")] if log_norms == "layer" else [])
    if log_norms == "layer":
        assert [k.rsplit("/", 1)[-1] for k in keys[1:]] == ["d0"]
    if mode == "steps_per_execution_2":
        _, want = _fit("float32", _linear, [transform()], x, y)
        for key in keys:
            np.testing.assert_allclose(history[key], want[key], rtol=1e-6)
        return
    norms = _grad_norms_closed_form(x, y, record.weights)
    expected = [np.mean([n for n in epoch if np.isfinite(n)]) for epoch in norms]
    for key in keys:  # one layer: its norm is the global norm
        np.testing.assert_allclose(history[key], expected, rtol=RTOL.get(MODES[mode]["policy"], 1e-5), err_msg=key)


@pytest.mark.parametrize("mode", _MODE_PARAMS)
def test_layer_rate_scheduler_log(mode):
    def make():
        return kerascool.layer_rates(mk.make("functional"), groups=["d0", "d1"], decay=0.5, verbose=False)

    x, y = mk.data(n=MODES[mode]["n"])
    _, history = _fit(mode, make, [kerascool.LayerRateScheduler.warmup(8, log=True)], x, y)
    # The epochs' last steps are t = 3 and 7 (4 batches each, ragged or not).
    np.testing.assert_allclose(history["layer_rate/d0"], [0.25, 0.5], atol=1e-7)
    np.testing.assert_allclose(history["layer_rate/d1"], [0.5, 1.0], atol=1e-7)


class _InputMean(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.mean = kerascool.ScalarMetric("input_mean")

    def call(self, x):
        self.mean.log(keras.ops.mean(x))
        return x


def _with_input_mean():
    inputs = keras.Input((mk.INPUTS,))
    h = _InputMean(name="probe")(inputs)
    return keras.Model(inputs, mk._dense(mk.OUTPUTS, 0, "d0")(h), name="net")


@pytest.mark.parametrize("mode", _MODE_PARAMS)
def test_scalar_metric_and_python_metric(mode):
    x, y = mk.data(n=MODES[mode]["n"])
    xv, yv = mk.data(n=8, seed=1)

    def mse(y_true, y_pred):
        return float(np.mean((y_true - np.asarray(y_pred, "float64")) ** 2))

    model, history = _fit(mode, _with_input_mean, [kerascool.PythonMetric(mse, (xv, yv), mode="min")], x, y)
    batch_means = [x[i:i + 8].astype("float64").mean() for i in range(0, len(x), 8)]
    rtol = RTOL.get(MODES[mode]["policy"], 1e-5)
    np.testing.assert_allclose(history["input_mean"], [np.mean(batch_means)] * 2, rtol=rtol, atol=rtol * 1e-1)
    np.testing.assert_allclose(history["val_mse"][-1], mse(yv, model.predict(xv, verbose=0)), rtol=1e-6)
