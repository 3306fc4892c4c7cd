"""Layer-wise learning rates through `fit`, against independent references.

Oracle: the same network trained with NumPy gradients (closed form for a
tanh MLP with MSE) and ONE STOCK KERAS OPTIMIZER PER GROUP at
``learning_rate * multiplier``, applied eagerly to plain variables: what
per-group learning rates mean in PyTorch (for schedules: plain SGD in NumPy
at the scheduled rate of each step). The decorated model is trained with
stock `model.fit`; the trajectories must agree to 1e-5 over 20 steps.
"""

import os

import keras
import numpy as np
import pytest
from helpers import weights_of

import kerascool
from kerascool._core import installation_of as registry_for
from kerascool.layer_rates import layer_rates_of

X = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
Y = np.random.default_rng(1).normal(size=(32, 2)).astype("float32")
BATCH, EPOCHS = 8, 5  # 4 steps per epoch: 20 steps


def chain(n_layers=3, name="net", width=5):
    sizes = [4] + [width] * (n_layers - 1) + [2]
    layers = [
        keras.layers.Dense(sizes[i + 1], activation="tanh" if i < n_layers - 1 else None, name=f"d{i}")
        for i in range(n_layers)
    ]
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((4,))] + layers, name=name)


def numpy_grads(weights, x, y):
    """d(mse)/d(weights) for `chain`: Dense+tanh layers, a linear last one."""
    x, y = x.astype("float64"), y.astype("float64")
    n = len(weights) // 2
    hs = [x]
    for i in range(n):
        z = hs[-1] @ weights[2 * i] + weights[2 * i + 1]
        hs.append(np.tanh(z) if i < n - 1 else z)
    d = 2 * (hs[-1] - y) / y.size
    grads = [None] * len(weights)
    for i in reversed(range(n)):
        if i < n - 1:
            d = d * (1 - hs[i + 1] ** 2)
        grads[2 * i], grads[2 * i + 1] = hs[i].T @ d, d.sum(0)
        d = d @ weights[2 * i].T
    return grads


def reference(w0, group_of, make_opt, lr, multipliers_at, steps, lr_at=None, transform=None):
    """Per-group optimizers at lr(t) * m(t, group) on NumPy gradients.

    `make_opt(lr)` builds one stock Keras optimizer per group, applied eagerly
    to plain variables; ``make_opt=None`` is plain SGD in NumPy (faster).
    """
    variables = [np.array(w, "float64") for w in w0] if make_opt is None else [keras.Variable(w) for w in w0]
    groups = sorted(set(group_of))
    opts = {g: make_opt(lr) for g in groups} if make_opt is not None else {}
    per_epoch = len(X) // BATCH
    for t in range(steps):
        s = (t % per_epoch) * BATCH
        values = [np.array(v if make_opt is None else v.numpy(), "float64") for v in variables]
        grads = numpy_grads(values, X[s : s + BATCH], Y[s : s + BATCH])
        if transform is not None:
            grads = transform(grads)
        base_lr = lr if lr_at is None else lr_at(t)
        for g in groups:
            idx = [i for i, gi in enumerate(group_of) if gi == g]
            if make_opt is None:
                for i in idx:
                    variables[i] = variables[i] - base_lr * multipliers_at(t, g) * grads[i]
                continue
            opts[g].learning_rate = base_lr * multipliers_at(t, g)
            opts[g].apply([grads[i].astype("float32") for i in idx], [variables[i] for i in idx])
    return [np.array(v if make_opt is None else v.numpy()) for v in variables]


def fit(model, epochs=EPOCHS, callbacks=(), **kwargs):
    return model.fit(X, Y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=list(callbacks),
                     **kwargs)


def assert_close(got, want, atol=1e-5):
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=atol)


OPTIMIZERS = {
    "sgd": lambda lr: keras.optimizers.SGD(lr),
    "sgd_momentum": lambda lr: keras.optimizers.SGD(lr, momentum=0.9, nesterov=True),
    "adam": lambda lr: keras.optimizers.Adam(lr),
    "adamw": lambda lr: keras.optimizers.AdamW(lr, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_trajectory_equals_one_stock_optimizer_per_group(name):
    lr = 0.05
    model = kerascool.layer_rates(chain(), decay=0.4, verbose=False)  # d0: 0.16, d1: 0.4, d2: 1
    model.compile(optimizer=OPTIMIZERS[name](lr), loss="mse")
    w0 = weights_of(model)
    fit(model)
    want = reference(w0, [0, 0, 1, 1, 2, 2], OPTIMIZERS[name], lr, lambda t, g: 0.4 ** (2 - g), steps=20)
    assert_close(weights_of(model), want)
    assert registry_for(model).trace_count == 1
    # the multiplier changed the trajectory: the bottom group moved far less than the top one
    moved = [np.abs(a - b).max() for a, b in zip(weights_of(model), w0)]
    assert moved[0] < moved[4]


def test_multiplier_zero_keeps_weights_bit_identical_while_others_train():
    model = kerascool.layer_rates(chain(), {"d1": 0.0, "d.*": 2.0}, verbose=False)
    model.compile(optimizer=keras.optimizers.AdamW(0.05, weight_decay=0.5), loss="mse")  # decay would move d1
    w0 = weights_of(model)
    fit(model, epochs=2)
    w = weights_of(model)
    assert np.array_equal(w[2], w0[2]) and np.array_equal(w[3], w0[3])
    assert all(not np.array_equal(w[i], w0[i]) for i in (0, 1, 4, 5))
    assert kerascool.current_layer_rates(model) == {"d1": 0.0, "d.*": 2.0}


def test_decorate_before_compile_then_recompile_keeps_working():
    """Uncompiled decoration: state is built when fit starts; a re-compile gets fresh state."""
    stock = chain()
    stock.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model = kerascool.layer_rates(chain(), {"d0": 0.0, "d2": 3.0}, verbose=False)  # d1 keeps 1 (no group)
    assert kerascool.current_layer_rates(model) == {"d0": 0.0, "d2": 3.0}
    w0 = weights_of(model)
    for round_ in range(2):
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")  # round 1: a new optimizer
        stock.set_weights(weights_of(model))
        before = weights_of(model)
        model.fit(X, Y, batch_size=32, verbose=0)  # one full-batch SGD step
        stock.fit(X, Y, batch_size=32, verbose=0)
        got = [a - b for a, b in zip(weights_of(model), before)]
        want = [m * (a - b) for m, a, b in zip([0, 0, 1, 1, 3, 3], weights_of(stock), before)]
        assert_close(got, want, atol=1e-6)
        assert np.array_equal(weights_of(model)[0], w0[0])
        assert registry_for(model).trace_count == round_ + 1  # one trace per compiled optimizer
        assert any("layer_rates_multipliers" in v.path for v in model.optimizer.variables)


def test_per_step_warmup_multipliers_in_force_are_the_scheduled_ones():
    lengths = [2, 5, 9]  # top group first
    model = kerascool.layer_rates(chain(), spread=(0.1, 1.0), verbose=False)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    w0 = weights_of(model)
    warmup = kerascool.LayerRateScheduler.warmup(lengths, per="step", log=True)
    history = fit(model, callbacks=[warmup])
    base = [0.1, 0.1**0.5, 1.0]

    def m(t, g):
        return base[g] * min(1.0, (t + 1) / lengths[2 - g])

    assert_close(weights_of(model), reference(w0, [0, 0, 1, 1, 2, 2], None, 0.1, m, steps=20))
    assert registry_for(model).trace_count == 1
    # logs hold the multipliers of each epoch's last step (steps 3, 7, ...)
    for g, name in enumerate(["d0", "d1", "d2"]):
        want = [m(4 * e + 3, g) for e in range(5)]
        np.testing.assert_allclose(history.history[f"layer_rate/{name}"], want, rtol=1e-6)


def test_multiplier_one_is_exactly_the_stock_step():
    stock = chain()
    ours = kerascool.layer_rates(chain(), verbose=False)  # depth groups, multiplier 1
    ours.set_weights(stock.get_weights())
    for model in (stock, ours):
        model.compile(optimizer=keras.optimizers.AdamW(0.05, weight_decay=0.5), loss="mse")
        fit(model, epochs=2)
    for a, b in zip(weights_of(stock), weights_of(ours)):
        np.testing.assert_array_equal(a, b)


def test_gradual_unfreezing_over_four_groups():
    model = kerascool.layer_rates(chain(4), verbose=False)  # depth groups d0..d3, multiplier 1
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    w0 = weights_of(model)
    snapshots = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: snapshots.append(weights_of(model)))
    unfreeze = kerascool.LayerRateScheduler.gradual_unfreezing(every=1, log=True)
    history = fit(model, epochs=4, callbacks=[unfreeze, record])
    for epoch, w in enumerate(snapshots):
        for layer in range(4):
            frozen = layer < 3 - epoch  # epoch 0: only d3 (top) trains; one more group per epoch
            same = np.array_equal(w[2 * layer], w0[2 * layer]) and np.array_equal(w[2 * layer + 1], w0[2 * layer + 1])
            assert same == frozen, (epoch, layer)
    assert history.history["layer_rate/d0"] == [0.0, 0.0, 0.0, 1.0]
    assert history.history["layer_rate/d2"] == [0.0, 1.0, 1.0, 1.0]
    assert registry_for(model).trace_count == 1  # schedule changes did not retrace

    def m(t, g):
        return float(g >= 3 - t // 4)

    want = reference(w0, [0, 0, 1, 1, 2, 2, 3, 3], None, 0.1, m, steps=16)
    assert_close(weights_of(model), want)


def test_composes_with_gradient_transform_and_keras_lr_scheduler():
    model = kerascool.layer_rates(chain(), {"d0": 0.25, "d2": 0.5}, verbose=False)
    model.compile(optimizer=keras.optimizers.SGD(0.2), loss="mse")
    w0 = weights_of(model)
    clip = kerascool.GradientTransform(kerascool.ClipByGlobalNorm(0.05))
    schedule = keras.callbacks.LearningRateScheduler(lambda epoch: 0.2 * 0.5**epoch)
    fit(model, epochs=3, callbacks=[clip, schedule])

    def clip_np(grads):
        norm = np.sqrt(sum(np.sum(g**2) for g in grads))
        return [g * min(1.0, 0.05 / norm) for g in grads]

    mults = {0: 0.25, 1: 1.0, 2: 0.5}
    want = reference(w0, [0, 0, 1, 1, 2, 2], None, 0.2, lambda t, g: mults[g], steps=12,
                     lr_at=lambda t: 0.2 * 0.5 ** (t // 4), transform=clip_np)
    assert_close(weights_of(model), want)
    assert registry_for(model).trace_count == 1


def test_saved_keras_file_restores_multipliers_with_one_line(tmp_path):
    path = os.path.join(tmp_path, "decorated.keras")
    model = kerascool.layer_rates(chain(), decay=0.5, verbose=False)
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    fit(model, epochs=1, callbacks=[kerascool.LayerRateScheduler(lambda e, depth: [1.0, 0.0, 3.0][depth])])
    scheduled = {"d0": 0.75, "d1": 0.0, "d2": 1.0}  # decay 0.5 x the factors
    assert kerascool.current_layer_rates(model) == scheduled
    model.save(path)

    loaded = keras.saving.load_model(path)
    kerascool.layer_rates(loaded, decay=0.5, verbose=False).load_weights(path)  # the documented line
    assert kerascool.current_layer_rates(loaded) == scheduled
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):  # Adam moments too
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a.value), keras.ops.convert_to_numpy(b.value))
    fit(model, epochs=1)
    fit(loaded, epochs=1)
    assert_close(weights_of(loaded), weights_of(model), atol=1e-7)  # training continues identically


def test_depth_groups_for_sequential_functional_subclassed_and_explicit_patterns():
    seq = kerascool.layer_rates(chain(3), decay=0.5, verbose=False)
    assert kerascool.current_layer_rates(seq) == {"d0": 0.25, "d1": 0.5, "d2": 1.0}

    inp = keras.Input((4,))
    a, b = keras.layers.Dense(3, name="a")(inp), keras.layers.Dense(3, name="b")(inp)  # parallel branches
    h = keras.layers.Dense(3, name="c")(keras.layers.Add()([a, b]))
    func = keras.Model(inp, keras.layers.Dense(1, name="head")(h))
    kerascool.layer_rates(func, spread=(0.01, 1.0), verbose=False)
    assert kerascool.current_layer_rates(func) == pytest.approx({"a+b": 0.01, "c": 0.1, "head": 1.0})

    class Net(keras.Model):
        def __init__(self):
            super().__init__(name="net")
            self.embed = keras.layers.Dense(3, name="embed")
            self.blocks = [keras.layers.Dense(3, name=f"block_{i}") for i in (0, 1, 2, 10)]
            self.top = keras.layers.Dense(1, name="top")

        def call(self, x):
            x = self.embed(x)
            for block in self.blocks:
                x = block(x)
            return self.top(x)

    net = Net()
    net(X[:2])
    kerascool.layer_rates(net, decay=0.5, verbose=False)
    assert list(kerascool.current_layer_rates(net)) == ["embed", "block_0", "block_1", "block_2", "block_10", "top"]
    # explicit groups with a capture: one group per block in numeric order (10 after 2); first match wins
    kerascool.layer_rates(net, groups=["embed", r"block_(\d+)"], decay=0.5, verbose=False)
    rates = kerascool.current_layer_rates(net)
    assert rates == {"embed": 1 / 16, "block_0": 1 / 8, "block_1": 1 / 4, "block_2": 1 / 2, "block_10": 1.0}
    # a capture names the group up to the captured value: one group per block across its layers
    dense = [keras.layers.Dense(3, name=f"b_{i}_{p}") for i in (0, 1) for p in "xy"]
    flat = keras.Sequential([keras.Input((3,))] + dense)
    kerascool.layer_rates(flat, groups=r"b_(\d+)_.*", spread=(0.5, 1.0), verbose=False)
    assert kerascool.current_layer_rates(flat) == {"b_0": 0.5, "b_1": 1.0}
    assert [layer_rates_of(flat).slot_of[id(v)] for v in flat.trainable_variables] == [0] * 4 + [1] * 4
    table = kerascool.layer_rate_table(net)
    assert "top/kernel" in table and "1 (no group)" in table and "block_10/kernel" in table
    # rules: first match wins, even inside one layer
    kerascool.layer_rates(net, [("embed/kernel", 0.0), ("embed", 2.0)], verbose=False)
    hook = layer_rates_of(net)
    assert [hook.group_names[hook.slot_of[id(v)]] for v in net.layers[0].trainable_weights] == ["embed/kernel", "embed"]


def test_verbose_prints_the_table(capsys):
    kerascool.layer_rates(chain(), {"d2": 0.5})
    out = capsys.readouterr().out
    assert "net/d2/kernel" in out and "0.5" in out and "1 (no group)" in out


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rules": {"nope": 0.5}}, ValueError, "matches no variable"),
        ({"rules": {"d0": -1.0}}, ValueError, r"Expected a finite number >= 0. Received: rules\['d0'\]=-1.0"),
        ({"rules": {"d0": float("nan")}}, ValueError, "Expected a finite number >= 0"),
        ({"rules": {"d0": float("inf")}}, ValueError, "Expected a finite number >= 0"),
        ({"rules": {"d0": "fast"}}, TypeError, "Expected a number"),
        ({"decay": 1.5}, ValueError, r"Expected a value in \(0, 1\]. Received: decay=1.5"),
        ({"decay": 0.0}, ValueError, r"Received: decay=0.0"),
        ({"spread": (0.0, 1.0)}, ValueError, "Received: spread="),
        ({"decay": 0.5, "spread": (0.1, 1.0)}, ValueError, "not both"),
        ({"rules": {"d0": 0.5}, "decay": 0.5}, ValueError, "not both"),
        ({"rules": {"d.*": 0.5, "d1": 0.1}}, ValueError, "earlier entry already took"),
        ({"groups": ["d0", "nope"]}, ValueError, "matches no variable"),
    ],
)
def test_misuse_raises_before_anything_changes(kwargs, error, match):
    model = chain()
    model.compile(optimizer="adam", loss="mse")
    with pytest.raises(error, match=match):
        kerascool.layer_rates(model, verbose=False, **kwargs)
    assert not kerascool.installed(model) and not model.optimizer.built  # nothing touched


def test_misuse_at_fit_start_leaves_weights_untouched():
    model = chain()
    model.compile(optimizer="sgd", loss="mse")
    w0 = weights_of(model)
    with pytest.raises(ValueError, match="has no layer rates. Decorate it first"):
        fit(model, epochs=1, callbacks=[kerascool.LayerRateScheduler.gradual_unfreezing()])
    kerascool.layer_rates(model, verbose=False)
    with pytest.raises(ValueError, match="gives 2 per-group values, but the model has 3"):
        fit(model, epochs=1, callbacks=[kerascool.LayerRateScheduler.warmup([1, 2])])
    with pytest.raises(ValueError, match=r"returned -1.0 at t=0"):
        fit(model, epochs=1, callbacks=[kerascool.LayerRateScheduler(lambda t, depth: -1.0)])
    assert all(np.array_equal(a, b) for a, b in zip(weights_of(model), w0))
    ema = chain()
    ema.compile(optimizer=keras.optimizers.Adam(use_ema=True), loss="mse")
    with pytest.raises(ValueError, match="use_ema=True"):
        kerascool.layer_rates(ema, verbose=False)
    with pytest.raises(ValueError, match=r"Expected an integer >= 1. Received: every=0"):
        kerascool.LayerRateScheduler.gradual_unfreezing(every=0)
    with pytest.raises(ValueError, match=r"Received: per='batch'"):
        kerascool.LayerRateScheduler(lambda t, d: 1.0, per="batch")

