"""Lookahead: decided against a NumPy simulation of SGD + Lookahead, and by equivalences.

Oracles: (1) plain SGD on a linear least-squares model, simulated in NumPy with the
paper's rule (slow weights from the initial weights), step by step (<= 1e-5);
(2) alpha=1 is plain training, bit for bit; (3) accumulating 2 micro-batches of 4
equals batches of 8 (the counter of real updates drives the synchronisation);
(4) an EMA next to it averages the synchronised weights (NumPy recursion).
"""

import keras
import numpy as np
import pytest

import kerascool
from tests.helpers import regression_data, weights_of
from tests.test_ema import Recorder, assert_close, ema_oracle

LR, K, ALPHA = 0.1, 3, 0.5


def linear(name="linear"):
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="dense")], name=name)


def twins(optimizer):
    a, b = linear("a"), linear("b")
    b.set_weights(a.get_weights())
    a.compile(optimizer=optimizer(), loss="mse")
    b.compile(optimizer=optimizer(), loss="mse")
    return a, b


def simulate(x, y, kernel, bias, batch, epochs, k, alpha):
    """SGD on mean((x W + b - y)^2) with Lookahead, in float64; weights after every update."""
    w, b = kernel.astype("float64"), bias.astype("float64")
    slow_w, slow_b = w.copy(), b.copy()
    trajectory, n = [], 0
    for _ in range(epochs):
        for i in range(0, len(x), batch):
            xb, yb = x[i:i + batch], y[i:i + batch]
            r = xb @ w + b - yb
            w, b = w - LR * 2 * xb.T @ r / len(xb), b - LR * 2 * r.sum(0) / len(xb)
            n += 1
            if n % k == 0:
                slow_w, slow_b = slow_w + alpha * (w - slow_w), slow_b + alpha * (b - slow_b)
                w, b = slow_w.copy(), slow_b.copy()
            trajectory.append([w, b])
    return trajectory


def test_equals_numpy_simulation_and_an_ema_averages_the_synchronised_weights():
    x, y = regression_data(n=32)
    model = linear()
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    initial = weights_of(model)
    recorder, ema = Recorder(), kerascool.EMA(0.7)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[recorder, ema, kerascool.Lookahead(k=K, alpha=ALPHA)])  # EMA listed first on purpose
    expected = simulate(x, y, *initial, batch=8, epochs=2, k=K, alpha=ALPHA)
    assert len(recorder.weights) == len(expected) + 1 == 9
    for got, want in zip(recorder.weights[1:], expected):
        assert_close(got, want, atol=1e-5)
    assert_close(recorder.weights[K], expected[K - 1], atol=1e-5)
    with ema.swapped():
        assert_close(weights_of(model), ema_oracle(recorder.weights, 0.7))


def test_alpha_one_is_plain_training_bit_for_bit():
    plain, ahead = twins(lambda: keras.optimizers.Adam(0.05))
    x, y = regression_data(n=32)
    plain.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    ahead.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[kerascool.Lookahead(k=2, alpha=1.0)])
    for a, b in zip(weights_of(plain), weights_of(ahead)):
        np.testing.assert_array_equal(a, b)


def test_synchronises_on_real_updates_under_gradient_accumulation():
    big, small = twins(lambda: keras.optimizers.Adam(0.05))
    x, y = regression_data(n=32)
    big.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[kerascool.Lookahead(k=K, alpha=ALPHA)])
    small.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
              callbacks=[kerascool.GradientAccumulation(steps=2), kerascool.Lookahead(k=K, alpha=ALPHA)])
    assert_close(weights_of(small), weights_of(big))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, r"Invalid value for argument `k`. Expected an integer >= 1. Received: k=0"),
        ({"k": 2.5}, "k=2.5"),
        ({"alpha": 0.0}, r"Invalid value for argument `alpha`. Expected a value in \(0, 1\]. Received: alpha=0.0"),
        ({"alpha": 1.5}, "alpha=1.5"),
        ({"alpha": True}, "alpha=True"),
    ],
)
def test_misuse_is_refused_before_training(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kerascool.Lookahead(**kwargs)


def test_get_config():
    assert kerascool.Lookahead(k=4, alpha=0.8).get_config() == {"k": 4, "alpha": 0.8}
