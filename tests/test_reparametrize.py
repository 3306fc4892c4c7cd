"""Reparametrize / WeightNormalization / ScaleReparametrization: decided against NumPy, PyTorch and closed forms.

Oracles: (1) ``g * v / ||v||`` in NumPy (forward); (2) PyTorch's
``torch.nn.utils.parametrizations.weight_norm`` trained with the same initial values
(10 SGD steps, <= 1e-5); (3) for the scale trick, the plain layer trained at
``lr * scale**2`` (SGD's closed form); (4) NumPy moments for the data-dependent init;
(5) a NumPy EMA recursion over the recorded raw parameters; (6) the update without
layer rates, for a multiplier on the raw parameters.
"""

import keras
import numpy as np
import pytest
from keras import ops

import kerascool
from tests.helpers import weights_of

RNG = np.random.default_rng(0)
X = RNG.normal(size=(16, 5)).astype("float32")
Y = RNG.normal(size=(16, 2)).astype("float32")


def np_of(x):
    return np.array(ops.convert_to_numpy(x))


def wn_mlp():
    inputs = keras.Input((5,))
    h = kerascool.WeightNormalization(keras.layers.Dense(4, activation="tanh"), name="wn1")(inputs)
    outputs = kerascool.WeightNormalization(keras.layers.Dense(2), name="wn2")(h)
    return keras.Model(inputs, outputs)


def wn_layers(model):
    return [layer for layer in model.layers if isinstance(layer, kerascool.WeightNormalization)]


def test_forward_equals_g_v_over_norm_v_in_numpy_for_dense_and_conv():
    dense = kerascool.WeightNormalization(keras.layers.Dense(3))
    dense.build((None, 5))
    conv = kerascool.WeightNormalization(keras.layers.Conv2D(3, 2, padding="valid", use_bias=False))
    conv.build((None, 4, 4, 2))
    for wrapper in (dense, conv):  # g away from ||v||, so that the normalization shows
        wrapper.g.assign(RNG.uniform(0.5, 2.0, size=wrapper.g.shape).astype("float32"))
    v, g, b = np_of(dense.raw), np_of(dense.g), np_of(dense.layer.bias)
    w = g * v / np.linalg.norm(v, axis=0, keepdims=True)
    np.testing.assert_allclose(np_of(dense(X)), X @ w + b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np_of(dense.reparametrized_weight()), w, rtol=1e-6, atol=1e-7)

    v, g = np_of(conv.raw), np_of(conv.g)  # kernel (2, 2, 2, 3): per output unit = over axes 0, 1, 2
    w = g * v / np.sqrt((v**2).sum(axis=(0, 1, 2), keepdims=True))
    images = RNG.normal(size=(2, 4, 4, 2)).astype("float32")
    expected = np.zeros((2, 3, 3, 3), "float32")
    for i in range(3):
        for j in range(3):
            expected[:, i, j, :] = np.einsum("nhwc,hwco->no", images[:, i : i + 2, j : j + 2, :], w)
    np.testing.assert_allclose(np_of(conv(images)), expected, rtol=1e-5, atol=1e-5)


def test_weight_normalization_starts_as_the_plain_layer():
    model = wn_mlp()
    plain = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    for wrapper, layer in zip(wn_layers(model), plain.layers):
        layer.set_weights([np_of(wrapper.raw), np_of(wrapper.layer.bias)])
        np.testing.assert_allclose(np_of(wrapper.g)[0], np.linalg.norm(np_of(wrapper.raw), axis=0), rtol=1e-6)
    np.testing.assert_allclose(np_of(model(X)), np_of(plain(X)), rtol=1e-5, atol=1e-6)


def test_training_trajectory_equals_pytorch_weight_norm_over_10_sgd_steps():
    import torch  # installed by .ci/run (the CPU build): a missing oracle must fail, not skip
    model = wn_mlp()
    wrappers = wn_layers(model)
    for wrapper in wrappers:  # g away from ||v||
        wrapper.g.assign(RNG.uniform(0.5, 2.0, size=wrapper.g.shape).astype("float32"))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    initial_g = np_of(wrappers[0].g)

    torch.manual_seed(0)
    linears = [torch.nn.Linear(5, 4), torch.nn.Linear(4, 2)]
    with torch.no_grad():
        for linear, wrapper in zip(linears, wrappers):
            linear.weight.copy_(torch.tensor(np_of(wrapper.raw).T))
            linear.bias.copy_(torch.tensor(np_of(wrapper.layer.bias)))
    linears = [torch.nn.utils.parametrizations.weight_norm(linear, dim=0) for linear in linears]
    with torch.no_grad():
        for linear, wrapper in zip(linears, wrappers):
            linear.parametrizations.weight.original0.copy_(torch.tensor(np_of(wrapper.g).reshape(-1, 1)))
    net = torch.nn.Sequential(linears[0], torch.nn.Tanh(), linears[1])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)

    def torch_state():
        state = []
        for linear in linears:
            p = linear.parametrizations.weight
            state += [p.original1.detach().numpy().T, p.original0.detach().numpy().reshape(1, -1),
                      linear.bias.detach().numpy()]
        return state

    def keras_state():
        return [np_of(t) for w in wrappers for t in (w.raw, w.g, w.layer.bias)]

    keras_steps = [keras_state()]

    class Record(keras.callbacks.Callback):  # one batch per epoch: the state after each SGD step
        def on_epoch_end(self, epoch, logs=None):
            keras_steps.append(keras_state())

    model.fit(X, Y, batch_size=16, epochs=10, shuffle=False, verbose=0, callbacks=[Record()])
    for step, keras_values in enumerate(keras_steps):
        for a, b in zip(keras_values, torch_state()):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"step {step}")
        if step < 10:
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(net(torch.tensor(X)), torch.tensor(Y)).backward()
            optimizer.step()
    assert len(keras_steps) == 11
    assert np.abs(keras_state()[1] - initial_g).max() > 1e-3  # g moved: the trajectory is not trivial
    np.testing.assert_allclose(np_of(model(X)), net(torch.tensor(X)).detach().numpy(), atol=1e-5)


def test_data_dependent_init_standardizes_each_layer_on_the_batch():
    model = wn_mlp()
    first, second = wn_layers(model)
    kerascool.WeightNormalization.initialize_from_data(model, X)

    v = np_of(first.raw)
    t = X @ (v / np.linalg.norm(v, axis=0))
    scale = 1 / np.sqrt(t.var(axis=0) + 1e-10)
    np.testing.assert_allclose(np_of(first.g)[0], scale, rtol=1e-4)
    np.testing.assert_allclose(np_of(first.layer.bias), -t.mean(axis=0) * scale, rtol=1e-4, atol=1e-5)
    pre = np_of(first.layer.bias) + t * scale  # the first layer's pre-activations: standardized
    np.testing.assert_allclose(pre.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(pre.std(axis=0), 1, atol=1e-4)
    out = np_of(model(X))  # the second layer was initialized on the first one's initialized outputs
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=0), 1, atol=1e-4)
    v2 = np_of(second.raw)
    np.testing.assert_allclose(np_of(second.g)[0], 1 / (np.tanh(pre) @ (v2 / np.linalg.norm(v2, axis=0))).std(axis=0),
                               rtol=1e-4)


def test_scale_reparametrization_trains_like_the_plain_layer_at_scale_squared_times_the_rate():
    scale, lr = 3.0, 0.01
    scaled = keras.Sequential([keras.Input((5,)), kerascool.ScaleReparametrization(keras.layers.Dense(2), scale)])
    plain = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    wrapper = scaled.layers[0]
    theta0 = np_of(wrapper.reparametrized_weight())
    plain.set_weights([theta0, np_of(wrapper.layer.bias)])
    np.testing.assert_allclose(np_of(scaled(X)), np_of(plain(X)), rtol=1e-5, atol=1e-6)
    # Kernel: theta = scale * phi, SGD on phi at lr == SGD on theta at lr * scale**2; the bias is not scaled:
    # train only the kernels (bias rate 0 through layer rates is out of scope), so freeze the biases.
    wrapper.layer.bias.trainable = False
    plain.layers[0].bias.trainable = False
    scaled.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    plain.compile(optimizer=keras.optimizers.SGD(lr * scale**2), loss="mse")
    scaled.fit(X, Y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    plain.fit(X, Y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    theta = np_of(wrapper.reparametrized_weight())
    assert np.abs(theta - theta0).max() > 1e-2  # it trained
    np.testing.assert_allclose(theta, np_of(plain.layers[0].kernel), atol=1e-5)
    np.testing.assert_allclose(np_of(wrapper.raw) * scale, theta, rtol=1e-6)


@keras.saving.register_keras_serializable(package="kerascool_tests")
def positive(raw):
    return ops.softplus(raw)


def test_any_function_forward_and_gradients_reach_the_raw_parameter():
    wrapper = kerascool.Reparametrize(keras.layers.Dense(2, use_bias=False), positive, name="pos")
    model = keras.Sequential([keras.Input((5,)), wrapper])
    raw = np_of(wrapper.raw)
    np.testing.assert_allclose(np_of(model(X)), X @ np.log1p(np.exp(raw)), rtol=1e-5, atol=1e-6)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0)
    # One SGD step in closed form: d loss / d raw = X^T (2 (X W - Y) / n) * sigmoid(raw), W = softplus(raw).
    w = np.log1p(np.exp(raw))
    grad = X.T @ (2 * (X @ w - Y) / Y.size) * (1 / (1 + np.exp(-raw)))
    np.testing.assert_allclose(np_of(wrapper.raw), raw - 0.1 * grad, atol=1e-6)


@pytest.mark.parametrize("kind", ["weight_norm", "scale", "function"])
def test_keras_round_trip_gives_the_same_model(tmp_path, kind):
    make = {
        "weight_norm": lambda: kerascool.WeightNormalization(keras.layers.Dense(3, activation="relu"), name="r"),
        "scale": lambda: kerascool.ScaleReparametrization(keras.layers.Dense(3), 4.0, name="r"),
        "function": lambda: kerascool.Reparametrize(keras.layers.Dense(3), positive, name="r"),
    }[kind]
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(make()(inputs)))
    model.compile(optimizer="adam", loss="mse")
    model.fit(X, Y, epochs=2, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded.get_layer("r")) is type(model.get_layer("r"))
    for a, b in zip(weights_of(loaded), weights_of(model)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np_of(loaded(X)), np_of(model(X)), atol=0)
    assert [w.path for w in loaded.weights] == [w.path for w in model.weights]
    loaded.fit(X, Y, epochs=1, verbose=0)  # still trains


def test_ema_averages_the_raw_parameters():
    model = wn_mlp()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    recorded = [weights_of(model)]

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            recorded.append(weights_of(self.model))

    record = Record()
    ema = kerascool.EMA(0.8)
    model.fit(X, Y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[record, ema])
    assert len(recorded) == 5
    expected = [w.astype("float64") for w in recorded[0]]
    for weights in recorded[1:]:
        expected = [0.8 * e + 0.2 * w for e, w in zip(expected, weights)]
    with ema.swapped():
        averages = weights_of(model)
    paths = [w.path for w in model.weights]
    assert {"wn1/g", "wn1/dense/kernel", "wn2/g"} <= set(paths)  # the raw parameters are what is averaged
    for path, a, e, last in zip(paths, averages, expected, recorded[-1]):
        assert np.abs(e - last).max() > 1e-4, path  # the average differs from the weights
        np.testing.assert_allclose(a, e, atol=1e-6, err_msg=path)


def test_layer_rates_scale_the_update_of_the_raw_parameters():
    def one_step(multiplier):
        keras.utils.set_random_seed(7)
        model = wn_mlp()
        if multiplier is not None:
            kerascool.layer_rates(model, {"wn1": multiplier}, verbose=False)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        before = [np_of(w) for w in model.weights]
        model.fit(X, Y, batch_size=16, epochs=1, verbose=0)
        return [(w.path, np_of(w) - b) for w, b in zip(model.weights, before)]

    stock, half = one_step(None), one_step(0.5)
    assert sum(path.startswith("wn1/") for path, _ in stock) == 3  # v, g and the bias of the first wrapper
    for (path, step), (_, half_step) in zip(stock, half):
        factor = 0.5 if path.startswith("wn1/") else 1.0
        assert np.abs(step).max() > 1e-5, path
        np.testing.assert_allclose(half_step, factor * step, rtol=1e-4, atol=1e-7, err_msg=path)


def test_subclassed_and_sequential_models_built_only_by_fit_start_from_the_right_values():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.wn = kerascool.WeightNormalization(keras.layers.Dense(3, kernel_initializer="ones"))
            self.scaled = kerascool.ScaleReparametrization(keras.layers.Dense(2, kernel_initializer="ones"), 4.0)

        def call(self, x):
            return self.scaled(self.wn(x))

    for model in (Net(), keras.Sequential([
        kerascool.WeightNormalization(keras.layers.Dense(3, kernel_initializer="ones")),
        kerascool.ScaleReparametrization(keras.layers.Dense(2, kernel_initializer="ones"), 4.0),
    ])):
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")  # rate 0: the values at the start
        model.fit(X, Y, epochs=1, verbose=0)
        wn, scaled = [layer for layer in model.layers]
        np.testing.assert_allclose(np_of(wn.g), np.full((1, 3), np.sqrt(5.0)), rtol=1e-6)
        np.testing.assert_allclose(np_of(scaled.raw), np.full((3, 2), 0.25), rtol=1e-6)
        np.testing.assert_allclose(np_of(model(X)), (3 * X.sum(axis=1, keepdims=True)).repeat(2, 1), rtol=1e-5)


def test_misuse_is_refused_with_keras_style_messages():
    with pytest.raises(ValueError, match="Invalid value for argument `layer`"):
        kerascool.WeightNormalization("dense")
    with pytest.raises(TypeError, match="Invalid value for argument `fn`"):
        kerascool.Reparametrize(keras.layers.Dense(2))
    with pytest.raises(TypeError, match="Invalid value for argument `fn`"):
        kerascool.Reparametrize(keras.layers.Dense(2), fn=3)
    with pytest.raises(ValueError, match="Invalid value for argument `scale`"):
        kerascool.ScaleReparametrization(keras.layers.Dense(2), scale=0)
    with pytest.raises(ValueError, match=r"Invalid value for argument `weight`.*'bias', 'kernel'.*weight='kernl'"):
        kerascool.WeightNormalization(keras.layers.Dense(2), weight="kernl").build((None, 3))
    with pytest.raises(ValueError, match="Invalid value for argument `axis`"):
        kerascool.WeightNormalization(keras.layers.Dense(2), axis=2).build((None, 3))
    with pytest.raises(ValueError, match="Expected a model with WeightNormalization layers"):
        kerascool.WeightNormalization.initialize_from_data(keras.Sequential([keras.layers.Dense(1)]), X)
