"""GradientAccumulation: decided against the big-batch run and Keras's own accumulation.

Oracles: (1) the same model trained with one step per k*b samples (the definition
of accumulation), (2) Keras's `gradient_accumulation_steps` on the same micro-batches,
(3) the initial values, exactly, for micro-steps that must not update.
"""

import keras
import numpy as np
import pytest

import kerascool
from tests.helpers import optimizer_state, regression_data, tiny_mlp, weights_of

B, K = 4, 4  # micro-batch size, micro-batches per update


def twin_models(optimizer_a, optimizer_b, seed=0):
    """Two models with identical initial weights, compiled with the given optimizers."""
    a, b = tiny_mlp(name="a"), tiny_mlp(name="b")
    b.set_weights(a.get_weights())
    a.compile(optimizer=optimizer_a, loss="mse")
    b.compile(optimizer=optimizer_b, loss="mse")
    return a, b


def assert_close(xs, ys, atol=1e-6):
    for x, y in zip(xs, ys):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def schedule():
    # Halves every real update: a schedule fed micro-steps would decay 4x faster.
    return keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda: keras.optimizers.SGD(schedule(), momentum=0.9),
        lambda: keras.optimizers.Adam(0.01),
    ],
    ids=["sgd_momentum_schedule", "adam"],
)
def test_equals_one_step_on_the_big_batch(make_optimizer):
    x, y = regression_data(n=32)
    big, small = twin_models(make_optimizer(), make_optimizer())
    initial = weights_of(small)
    big.fit(x, y, batch_size=B * K, epochs=2, shuffle=False, verbose=0)
    small.fit(x, y, batch_size=B, epochs=2, shuffle=False, verbose=0,
              callbacks=[kerascool.GradientAccumulation(steps=K)])

    assert_close(weights_of(small), weights_of(big))
    # 16 micro-batches, 4 real updates: schedules and Adam's bias correction saw 4.
    assert int(small.optimizer.iterations) == int(big.optimizer.iterations) == 4
    assert kerascool.real_steps(small) == 4
    assert not np.allclose(weights_of(small)[0], initial[0], atol=1e-3)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_equals_keras_builtin_accumulation(name):
    def make(**kwargs):
        if name == "sgd":
            return keras.optimizers.SGD(0.05, momentum=0.9, **kwargs)
        return keras.optimizers.Adam(0.01, **kwargs)

    x, y = regression_data(n=32)
    builtin, ours = twin_models(make(gradient_accumulation_steps=K), make())
    builtin.fit(x, y, batch_size=B, epochs=2, shuffle=False, verbose=0)
    ours.fit(x, y, batch_size=B, epochs=2, shuffle=False, verbose=0,
             callbacks=[kerascool.GradientAccumulation(steps=K)])

    assert_close(weights_of(ours), weights_of(builtin))
    # Keras's `iterations` reports micro-steps // k; ours counts real updates directly.
    assert int(ours.optimizer.iterations) == int(builtin.optimizer.iterations) == 4


def test_micro_steps_leave_weights_and_optimizer_state_exactly_untouched():
    x, y = regression_data(n=B * K)
    model, big = twin_models(keras.optimizers.Adam(0.01), keras.optimizers.Adam(0.01))
    model.optimizer.build(model.trainable_variables)
    weights0, state0 = weights_of(model), optimizer_state(model)
    accumulate = kerascool.GradientAccumulation(steps=K)

    # Three micro-batches: no update.
    model.fit(x[: B * (K - 1)], y[: B * (K - 1)], batch_size=B, shuffle=False, verbose=0, callbacks=[accumulate])
    for before, after in zip(weights0, weights_of(model)):
        np.testing.assert_array_equal(before, after)
    own_state = optimizer_state(model)[: len(state0)]  # the optimizer's own variables, iterations first
    for before, after in zip(state0, own_state):
        np.testing.assert_array_equal(before, after)
    assert int(model.optimizer.iterations) == 0 and kerascool.real_steps(model) == 0

    # The fourth micro-batch, in another fit: the partial sum carried over, one big-batch update.
    model.fit(x[B * (K - 1):], y[B * (K - 1):], batch_size=B, verbose=0, callbacks=[accumulate])
    big.fit(x, y, batch_size=B * K, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations) == 1 and kerascool.real_steps(model) == 1
    assert_close(weights_of(model), weights_of(big))
    assert not np.allclose(weights_of(model)[0], weights0[0])


def test_gradient_transforms_see_the_accumulated_gradient():
    # Clipping is nonlinear: clipping each micro-batch gradient would not equal this oracle.
    x, y = regression_data(n=32)
    clip = 0.01
    big, small = twin_models(keras.optimizers.SGD(1.0), keras.optimizers.SGD(1.0))
    initial = weights_of(big)
    big.fit(x, y, batch_size=B * K, epochs=1, shuffle=False, verbose=0,
            callbacks=[kerascool.GradientTransform(kerascool.ClipByGlobalNorm(clip))])
    # Listed after the transform on purpose: hooks run by order, accumulation first.
    small.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0,
              callbacks=[kerascool.GradientTransform(kerascool.ClipByGlobalNorm(clip)),
                         kerascool.GradientAccumulation(steps=K)])

    assert_close(weights_of(small), weights_of(big))
    # The clip was active: two updates of norm exactly `clip` each (lr 1), so at most 2*clip in all.
    moved = np.sqrt(sum(np.sum((w - w0) ** 2) for w, w0 in zip(weights_of(small), initial)))
    assert 0.5 * clip < moved <= 2 * clip + 1e-6


class _CrashAt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("simulated crash")


def test_backup_and_restore_resumes_the_partial_sum(tmp_path):
    # 3 micro-batches per epoch with k=2: each epoch ends with a half-full sum,
    # which the resumed run must get back to equal the uninterrupted one.
    x, y = regression_data(n=3 * B)
    kwargs = dict(batch_size=B, epochs=3, shuffle=False, verbose=0)
    reference, crashed = twin_models(keras.optimizers.Adam(0.01), keras.optimizers.Adam(0.01))
    initial = crashed.get_weights()
    reference.fit(x, y, callbacks=[kerascool.GradientAccumulation(steps=2)], **kwargs)

    backup_dir = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit(x, y, callbacks=[keras.callbacks.BackupAndRestore(backup_dir),
                                     kerascool.GradientAccumulation(steps=2), _CrashAt(1)], **kwargs)

    resumed = tiny_mlp(name="resumed")
    resumed.set_weights([np.zeros_like(w) for w in initial])  # restored from the backup, not from here
    resumed.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    resumed.fit(x, y, callbacks=[keras.callbacks.BackupAndRestore(backup_dir),
                                 kerascool.GradientAccumulation(steps=2)], **kwargs)

    assert_close(weights_of(resumed), weights_of(reference))
    assert kerascool.real_steps(resumed) == kerascool.real_steps(reference) == 4  # 9 micro-batches // 2


def test_one_step_is_the_stock_step():
    x, y = regression_data(n=16)
    stock, ours = twin_models(keras.optimizers.Adam(0.01), keras.optimizers.Adam(0.01))
    stock.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    ours.fit(x, y, batch_size=4, shuffle=False, verbose=0, callbacks=[kerascool.GradientAccumulation(steps=1)])
    assert_close(weights_of(ours), weights_of(stock), atol=0)
    assert kerascool.real_steps(ours) == int(ours.optimizer.iterations) == 4


@pytest.mark.parametrize("steps", [0, -2, 2.0, True, "4"])
def test_bad_steps_raise(steps):
    with pytest.raises(ValueError, match=r"Invalid value for argument `steps`. Expected an integer >= 1"):
        kerascool.GradientAccumulation(steps=steps)


def test_with_the_optimizers_own_accumulation_raises_before_training():
    x, y = regression_data(n=8)
    model = tiny_mlp()
    model.compile(optimizer=keras.optimizers.SGD(0.1, gradient_accumulation_steps=2), loss="mse")
    model.optimizer.build(model.trainable_variables)
    weights0 = weights_of(model)
    with pytest.raises(ValueError, match="already accumulates gradients"):
        model.fit(x, y, verbose=0, callbacks=[kerascool.GradientAccumulation(steps=2)])
    for before, after in zip(weights0, weights_of(model)):
        np.testing.assert_array_equal(before, after)


def test_get_config():
    assert kerascool.GradientAccumulation(steps=3).get_config() == {"steps": 3}
