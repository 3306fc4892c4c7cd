"""mc_dropout_predict: mean and spread of stochastic passes, against the closed form of dropout.

Oracle: with ``y = sum_i x_i * m_i / (1 - p)`` (inverted dropout on the
input, then a Dense of ones), ``E[y] = sum_i x_i`` and
``Var[y] = p / (1 - p) * sum_i x_i**2``; with rate 0 every pass equals
``model.predict``.
"""

import keras
import numpy as np
import pytest

import kerascool
from kerascool import mc_dropout


def dropout_sum_model(rate, nested=False):
    dropout = keras.layers.Dropout(rate, seed=3)
    if nested:  # a dropout layer inside a nested model is reached too
        dropout = keras.Sequential([keras.Input((5,)), dropout], name="inner")
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.BatchNormalization(name="bn"),
            dropout,
            keras.layers.Dense(1, use_bias=False, kernel_initializer="ones", name="sum"),
        ]
    )


def inputs():
    return np.random.default_rng(0).normal(size=(6, 5)).astype("float32")


def test_rate_zero_gives_zero_spread_and_the_plain_prediction():
    model = dropout_sum_model(0.0)
    x = inputs()
    mean, std = kerascool.mc_dropout_predict(model, x, num_samples=5)
    assert np.all(std == 0.0)
    np.testing.assert_allclose(mean, model.predict(x, verbose=0), rtol=1e-6)


@pytest.mark.parametrize("nested", [False, True])
def test_spread_matches_the_closed_form_and_the_model_is_untouched(nested):
    p, n = 0.3, 400
    model = dropout_sum_model(p, nested)
    x = inputs()
    before_weights = [np.array(w) for w in model.get_weights()]
    before = model.predict(x, verbose=0)
    mean, std = kerascool.mc_dropout_predict(model, x, num_samples=n, batch_size=1200)
    xn = x.astype("float64") / np.sqrt(1.0 + 1e-3)  # BatchNorm in inference mode: moving mean 0, variance 1
    true_std = np.sqrt(p / (1 - p) * np.sum(xn**2, axis=1, keepdims=True))
    assert np.all(std > 0)
    # Sampling error of n passes: the mean within 4 standard errors, the std within ~4 x sqrt(1/(2n)).
    assert np.all(np.abs(mean - xn.sum(axis=1, keepdims=True)) <= 4 * true_std / np.sqrt(n))
    np.testing.assert_allclose(std, true_std, rtol=0.2)
    # BatchNorm stayed in inference mode, nothing changed, and predict is deterministic again.
    for a, b in zip(before_weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.predict(x, verbose=0), before)
    assert all("call" not in layer.__dict__ for layer in model._flatten_layers())


def test_one_predict_call_per_pass_when_inputs_are_not_tiled(monkeypatch):
    monkeypatch.setattr(mc_dropout, "_TILE_BYTES", 0)  # as for a dataset: one pass per predict call
    model = dropout_sum_model(0.5)
    x = inputs()
    calls = []
    original = model.predict
    monkeypatch.setattr(model, "predict", lambda *a, **k: calls.append(1) or original(*a, **k))
    mean, std = kerascool.mc_dropout_predict(model, x, num_samples=6)
    assert len(calls) == 6
    assert np.all(std > 0) and mean.shape == (6, 1)


def test_several_outputs_keep_their_structure():
    inputs_ = keras.Input((5,))
    dropped = keras.layers.Dropout(0.5)(inputs_)
    model = keras.Model(inputs_, {"a": keras.layers.Dense(1)(dropped), "b": keras.layers.Dense(2)(dropped)})
    mean, std = kerascool.mc_dropout_predict(model, inputs(), num_samples=4)
    assert mean["a"].shape == (6, 1) and std["b"].shape == (6, 2)
    assert np.all(std["b"] > 0)


def test_misuse():
    plain = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)], name="plain")
    with pytest.raises(ValueError, match=r"model 'plain' has no dropout layer"):
        kerascool.mc_dropout_predict(plain, inputs())
    with pytest.raises(ValueError, match=r"`num_samples`. Expected an integer >= 2. Received: num_samples=1"):
        kerascool.mc_dropout_predict(dropout_sum_model(0.1), inputs(), num_samples=1)
