"""Capture of layer outputs, attention scores and capture points, each against an independent oracle.

Oracles: a functional sub-model of the same layers (Sequential/functional), a
NumPy forward pass from the layers' own weights (subclassed models, capture
points, attention as softmax(QK^T / sqrt(d)) with the padding mask), and a
training run without the callback (bit-identical weights).
"""

import os
import warnings

import keras
import numpy as np
import pytest
from helpers import regression_data, tiny_mlp, weights_of
from PIL import Image

import kerascool
from kerascool import heatmaps

V, T, D, HEADS, KEY_DIM = 12, 6, 8, 2, 4


# -- models --------------------------------------------------------------------
def attention_model():
    """Functional: tokens -> Embedding(mask_zero) -> MHA(self) -> mean -> Dense."""
    keras.utils.set_random_seed(3)
    tokens = keras.Input((T,), dtype="int32", name="tokens")
    # A wide embedding init gives attention maps far from uniform.
    x = keras.layers.Embedding(V, D, mask_zero=True, embeddings_initializer=keras.initializers.RandomNormal(stddev=1.0),
                               name="embed")(tokens)
    x = keras.layers.MultiHeadAttention(HEADS, KEY_DIM, name="mha")(x, x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    model = keras.Model(tokens, keras.layers.Dense(1, name="head")(x), name="attn")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


def token_data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, V, size=(n, T)).astype("int32")
    lengths = rng.integers(2, T + 1, size=n)
    x[np.arange(T)[None, :] >= lengths[:, None]] = 0  # padding at the end
    return x, rng.normal(size=(n, 1)).astype("float32")


class Block(keras.layers.Layer):
    """A user layer with nested layers and an explicit capture point."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.d1 = keras.layers.Dense(units, name="d1")
        self.d2 = keras.layers.Dense(units, name="d2")
        self.aux = keras.layers.Dense(units, name="aux")  # only used in training

    def build(self, input_shape):
        self.d1.build(input_shape)
        self.d2.build(self.d1.compute_output_shape(input_shape))
        self.aux.build(input_shape)

    def call(self, x, training=False):
        h = kerascool.capture("pre_relu", self.d1(x))
        y = self.d2(keras.ops.relu(h))
        if training:
            y = y + 0.0 * self.aux(x)
        return y


class Net(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.block = Block(5, name="block")
        self.head = keras.layers.Dense(2, name="head")

    def call(self, x, training=False):
        return self.head(self.block(x, training=training))


def subclassed():
    keras.utils.set_random_seed(5)
    model = Net(name="net")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model(np.zeros((1, 4), "float32"))  # builds every layer (Block.build builds aux too)
    return model


class WeightsAtEpochEnd(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = {}

    def on_epoch_end(self, epoch, logs=None):
        self.weights[epoch + 1] = [np.array(w) for w in self.model.get_weights()]


def _dense(layer, x):
    kernel, bias = (np.array(w) for w in layer.get_weights())
    return x @ kernel + bias


# -- what is captured ------------------------------------------------------------
def test_sequential_outputs_equal_functional_submodel_at_every_epoch():
    keras.utils.set_random_seed(1)
    model = tiny_mlp(inputs=4, hidden=6, outputs=2)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    x, y = regression_data(n=40, inputs=4, outputs=2)
    x_val = x[30:]
    cb = kerascool.CaptureCallback(layers=["hidden", "out"], probe=5)  # the first 5 validation samples
    snap = WeightsAtEpochEnd()
    model.fit(x[:30], y[:30], validation_data=(x_val, y[30:]), batch_size=8, epochs=3, verbose=0, callbacks=[cb, snap])

    assert sorted(cb.captures) == [1, 2, 3]
    oracle = keras.Model(model.inputs, [model.get_layer("hidden").output, model.get_layer("out").output])
    for epoch, values in cb.captures.items():
        assert list(values) == ["mlp/hidden", "mlp/out"]
        model.set_weights(snap.weights[epoch])  # the weights the capture saw
        hidden, out = oracle.predict(x_val[:5], verbose=0)
        np.testing.assert_allclose(values["mlp/hidden"], hidden, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(values["mlp/out"], out, rtol=1e-5, atol=1e-6)
    assert not np.allclose(cb.captures[1]["mlp/out"], cb.captures[3]["mlp/out"])  # training moved them


def test_subclassed_nested_layers_and_capture_point_equal_manual_forward():
    model = subclassed()
    x, y = regression_data(n=16, inputs=4, outputs=2, seed=3)
    probe = x[:3]
    cb = kerascool.CaptureCallback(layers=["block/d1", "block/d2", "head"], probe=probe)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])

    got = cb.latest
    assert set(got) == {"net/block/d1", "net/block/d2", "net/head", "net/block/pre_relu"}
    block = model.block
    pre = _dense(block.d1, probe)
    np.testing.assert_allclose(got["net/block/pre_relu"], pre, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["net/block/d1"], pre, rtol=1e-5, atol=1e-6)
    post = _dense(block.d2, np.maximum(pre, 0))
    np.testing.assert_allclose(got["net/block/d2"], post, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["net/head"], _dense(model.head, post), rtol=1e-5, atol=1e-6)


def test_a_pattern_takes_the_outer_layer_not_its_parts():
    model = subclassed()
    with kerascool.Capture(model, layers="block", points=False) as cap:
        model(np.ones((2, 4), "float32"))
    assert list(cap.values) == ["net/block"]


def _np_attention(model, tokens):
    """softmax(Q K^T / sqrt(d)) with the padding mask, from the layers' own weights."""
    embedding = np.array(model.get_layer("embed").get_weights()[0])[tokens]  # (B, T, D)
    mha = model.get_layer("mha")
    wq, bq = (np.array(w) for w in mha.query_dense.get_weights())
    wk, bk = (np.array(w) for w in mha.key_dense.get_weights())
    q = np.einsum("btd,dhk->bthk", embedding, wq) + bq
    k = np.einsum("btd,dhk->bthk", embedding, wk) + bk
    logits = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(KEY_DIM)
    valid = tokens != 0
    mask = (valid[:, :, None] & valid[:, None, :])[:, None]  # (B, 1, T, S): query and key masks
    logits = np.where(mask, logits, -1e9)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.where(mask, weights, 0.0), valid


@pytest.fixture(scope="module")
def attention_run(tmp_path_factory):
    """One fit of the attention model, shared by the tests that only read its results."""
    keras.backend.clear_session()
    model = attention_model()
    x, y = token_data(n=24)
    tmp = tmp_path_factory.mktemp("capture")
    directory, log_dir = str(tmp / "captures"), str(tmp / "tb")
    # attention=True (default): every MultiHeadAttention layer; probe: the first 4 validation samples.
    cb = kerascool.CaptureCallback(layers="head", probe=4, every=2, directory=directory, log_dir=log_dir, keep=1)
    model.fit(x[:16], y[:16], validation_data=(x[16:], y[16:]), epochs=4, verbose=0, callbacks=[cb])
    return model, cb, x[16:20], directory, log_dir


def test_attention_scores_equal_softmax_qk_with_padding_mask(attention_run):
    model, cb, probe, _, _ = attention_run
    scores = cb.latest["mha/attention_scores"]  # epoch 4: the final weights
    assert scores.shape == (4, HEADS, T, T)
    want, valid = _np_attention(model, probe)
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-5)
    rows = scores.sum(-1)  # (B, H, T)
    np.testing.assert_allclose(rows[np.broadcast_to(valid[:, None, :], rows.shape)], 1.0, atol=1e-5)
    padded_keys = np.broadcast_to(~valid[:, None, None, :], scores.shape)
    assert padded_keys.any() and np.all(scores[padded_keys] == 0.0)
    assert scores.std() > 0.05  # not a uniform map: the check above has teeth


def test_attention_patch_is_restored_when_the_forward_pass_raises():
    model = attention_model()
    mha = model.get_layer("mha")
    with pytest.raises(ValueError):
        with kerascool.Capture(model, layers="head") as cap:
            assert _patched(mha) == {"_compute_attention"} and _patched(model.get_layer("head")) == {"call"}
            model(np.zeros((2, T + 3), "int32"))  # wrong length: the model raises mid-pass
    assert not cap.installed and not any(_patched(layer) for layer in model._flatten_layers())


def test_attention_scores_for_callers_that_ask_for_them_too():
    model = attention_model()
    mha = model.get_layer("mha")
    embedded = np.array(model.get_layer("embed")(token_data(n=3)[0]))  # no Keras mask: both calls alike
    with kerascool.Capture(model, attention="mha") as cap:
        out_alone = mha(embedded, embedded)
        out, scores = mha(embedded, embedded, return_attention_scores=True)
    np.testing.assert_allclose(np.array(out_alone), np.array(out), rtol=1e-6)
    assert list(cap.values) == ["mha/attention_scores", "mha/attention_scores#1"]
    np.testing.assert_allclose(cap.values["mha/attention_scores#1"], np.array(scores), rtol=1e-6)


class HubStyleAttention(keras.layers.MultiHeadAttention):
    """Like keras-hub's CachedMultiHeadAttention: its own `call`, no `return_attention_scores`."""

    def call(self, query, value, key=None, attention_mask=None, training=None):
        key = value if key is None else key
        output, _ = self._compute_attention(
            query=self._query_dense(query), key=self._key_dense(key), value=self._value_dense(value),
            attention_mask=attention_mask, training=training,
        )
        return self._output_dense(output)


class AttentionBlock(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.mha = HubStyleAttention(HEADS, KEY_DIM, name="mha")

    def call(self, x):
        return x + self.mha(x, x)


class Encoder(keras.Model):
    """Subclassed, nested: encoder -> block -> hub-style attention."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.embed = keras.layers.Embedding(V, D, embeddings_initializer=keras.initializers.RandomNormal(stddev=1.0),
                                            name="embed")
        self.block = AttentionBlock(name="block")

    def call(self, tokens):
        return self.block(self.embed(tokens))


def test_attention_of_a_hub_style_layer_nested_in_a_subclassed_model():
    keras.utils.set_random_seed(4)
    model = Encoder(name="encoder")
    tokens = np.random.default_rng(1).integers(1, V, size=(3, T)).astype("int32")  # no padding
    model(tokens)
    values = kerascool.CaptureCallback().capture_now(tokens, model=model)  # attention=True finds it
    assert list(values) == ["encoder/block/mha/attention_scores"]
    scores = values["encoder/block/mha/attention_scores"]
    mha = model.block.mha
    emb = np.array(model.embed.embeddings)[tokens]
    wq, bq = (np.array(w) for w in mha.query_dense.get_weights())
    wk, bk = (np.array(w) for w in mha.key_dense.get_weights())
    q, k = np.einsum("btd,dhk->bthk", emb, wq) + bq, np.einsum("btd,dhk->bthk", emb, wk) + bk
    logits = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(KEY_DIM)
    want = np.exp(logits - logits.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-5)
    assert scores.std() > 0.05


def test_capture_now_on_demand_without_fit():
    model = subclassed()
    cb = kerascool.CaptureCallback(layers="head", points=False)
    x = regression_data(n=4, inputs=4, outputs=2, seed=9)[0]
    values = cb.capture_now(x, model=model)
    np.testing.assert_allclose(values["net/head"], np.array(model(x)), rtol=1e-5, atol=1e-6)


# -- files ---------------------------------------------------------------------
def _tensorboard_images(log_dir):
    import tensorflow as tf

    images = {}
    folder = os.path.join(log_dir, "captures")
    for name in os.listdir(folder):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, name)):
            for value in event.summary.value:
                assert value.metadata.plugin_data.plugin_name == "images"
                width, height, png = tf.make_ndarray(value.tensor)
                images[(value.tag, event.step)] = (int(width), int(height), png)
    return images


def test_files_have_the_documented_layout(attention_run):
    _, cb, probe, directory, log_dir = attention_run
    assert sorted(cb.captures) == [4]  # every=2: epochs 2 and 4; keep=1: the last one in memory
    assert sorted(os.listdir(directory)) == ["epoch_002", "epoch_002.npz", "epoch_004", "epoch_004.npz", "probe.npz"]
    np.testing.assert_array_equal(np.load(os.path.join(directory, "probe.npz"))["x"], probe)
    with np.load(os.path.join(directory, "epoch_004.npz")) as saved:
        assert sorted(saved.files) == sorted(cb.latest) == ["head", "mha/attention_scores"]
        for key in saved.files:
            np.testing.assert_array_equal(saved[key], cb.latest[key])
    expected = {"mha/attention_scores": (2 * 240, 240), "head": (2 * 240, 240)}  # 2 heads in a row; a 2-D map
    for key, size in expected.items():
        for epoch in (2, 4):
            with Image.open(os.path.join(directory, f"epoch_{epoch:03d}", f"{key}.png")) as image:
                assert image.format == "PNG" and image.size == size
        assert heatmaps.image_size(cb.latest[key], key) == size

    images = _tensorboard_images(log_dir)
    assert sorted(images) == [("head", 2), ("head", 4), ("mha/attention_scores", 2), ("mha/attention_scores", 4)]
    width, height, png = images[("mha/attention_scores", 4)]
    assert (width, height) == expected["mha/attention_scores"]
    with open(os.path.join(directory, "epoch_004", "mha", "attention_scores.png"), "rb") as f:
        assert f.read() == png


def test_missing_matplotlib_names_the_extra(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    missing = lambda name, *a: None if name == "matplotlib" else find_spec(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", missing)
    with pytest.raises(ImportError, match=r"pip install kerascool\[plot\]"):
        kerascool.CaptureCallback(layers="head", directory="unused")
    kerascool.CaptureCallback(layers="head", directory="unused", plots=False)  # files without pictures: fine


def test_missing_tensorflow_for_tensorboard_says_so(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    missing = lambda name, *a: None if name == "tensorflow" else find_spec(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", missing)
    with pytest.raises(ImportError, match=r"TensorFlow is not installed: `pip install tensorflow-cpu`"):
        kerascool.CaptureCallback(layers="head", log_dir="unused")


# -- it does not disturb training -------------------------------------------------
def _train(with_capture):
    keras.utils.set_random_seed(11)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    h = keras.layers.Dropout(0.3, name="drop")(h)  # training randomness: must be drawn exactly alike
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(h), name="func")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x, y = regression_data(n=48, inputs=4, outputs=2)
    functions = []

    class TrainFunction(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            functions.append(self.model.train_function)

    callbacks = [TrainFunction()]
    if with_capture:
        callbacks.insert(0, kerascool.CaptureCallback(layers=["hidden", "drop"], probe=3))
    model.fit(x, y, validation_split=0.25, batch_size=8, epochs=2, verbose=0, callbacks=callbacks)
    return model, functions


def test_weights_bit_identical_and_train_function_untouched():
    stock, _ = _train(False)
    captured, functions = _train(True)
    for a, b in zip(weights_of(stock), weights_of(captured)):
        np.testing.assert_array_equal(a, b)
    assert all(f is functions[0] for f in functions)  # traced once, never replaced
    assert not any(_patched(layer) for layer in captured._flatten_layers())


def _patched(layer):
    """Instance attributes that shadow the methods a capture patches."""
    return {"call", "_compute_attention"} & set(vars(layer))


def test_patches_are_restored_on_exception_and_nothing_fires_after():
    model = subclassed()
    block = model.block
    cap = kerascool.Capture(model, layers=["block/d1", "head"])
    with pytest.raises(RuntimeError, match="boom"):
        with cap:
            assert _patched(block.d1) == {"call"}
            raise RuntimeError("boom")
    assert not any(_patched(layer) for layer in model._flatten_layers())
    cap.remove()  # idempotent
    model(np.ones((2, 4), "float32"))
    assert cap.keys == []  # nothing fires after exit, capture points included
    tensor = np.ones(3)
    assert kerascool.capture("free", tensor) is tensor


# -- misuse: clear errors before training, model untouched --------------------------
def _assert_fails_before_training(model, callback, x, y, match, **fit_kwargs):
    before = weights_of(model)
    with pytest.raises(ValueError, match=match):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callback], **fit_kwargs)
    assert int(model.optimizer.iterations.numpy()) == 0
    for a, b in zip(before, weights_of(model)):
        np.testing.assert_array_equal(a, b)
    assert not any(_patched(layer) for layer in model._flatten_layers())


def test_unknown_layer_name():
    model = attention_model()
    x, y = token_data(n=8)
    _assert_fails_before_training(model, kerascool.CaptureCallback(layers="dense_9"), x, y, "matches no layer")


def test_layer_never_called_in_a_forward_pass():
    model = Net(name="net")
    model.compile(optimizer="sgd", loss="mse")
    x, y = regression_data(n=8, inputs=4, outputs=2)
    model(x)
    model.optimizer.build(model.trainable_variables)
    cb = kerascool.CaptureCallback(layers="block/aux", probe=x[:2])
    _assert_fails_before_training(model, cb, x, y, r"'net/block/aux'.*never called")


def test_layer_never_called_with_validation_probe_subclassed():
    # No probe data and no declared inputs: checked on fit's first training
    # batch, before its step runs. `aux` runs only with training=True.
    model = subclassed()
    model.optimizer.build(model.trainable_variables)
    x, y = regression_data(n=8, inputs=4, outputs=2)
    cb = kerascool.CaptureCallback(layers=["head", "block/aux"])
    _assert_fails_before_training(model, cb, x, y, r"'net/block/aux'.*never called", validation_split=0.5)
    assert "before_first_train_step" not in getattr(model.train_function, "__qualname__", "")  # no spy left


def test_subclassed_check_leaves_training_bit_identical():
    # The check peeks at fit's first batch (JAX: hands it back in front of the
    # iterator); with steps_per_execution=2 each call takes two batches.
    def train(callbacks):
        model = subclassed()
        x, y = regression_data(n=40, inputs=4, outputs=2)
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", steps_per_execution=2)
        model.fit(x, y, validation_split=0.2, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
        return model

    cb = kerascool.CaptureCallback(layers="head", probe=3)
    captured, stock = train([cb]), train([])
    for a, b in zip(weights_of(stock), weights_of(captured)):
        np.testing.assert_array_equal(a, b)
    assert int(captured.optimizer.iterations.numpy()) == 16 and sorted(cb.captures) == [1, 2]


def test_unbuilt_subclassed_model_is_checked_before_its_first_step():
    class Gated(keras.Model):
        def __init__(self):
            super().__init__(name="gated")
            self.body = keras.layers.Dense(3, name="body")
            self.unused = keras.layers.Activation("relu", name="unused")  # no weights: always "built"

        def call(self, x):
            return self.body(x)

    model = Gated()
    model.compile(optimizer="sgd", loss="mse")
    x, y = regression_data(n=8, inputs=4, outputs=3)
    with pytest.raises(ValueError, match=r"'(gated/)?unused'.*never called"):
        model.fit(x, y, validation_split=0.5, verbose=0, callbacks=[kerascool.CaptureCallback(layers="unused")])
    assert int(model.optimizer.iterations.numpy()) == 0
    # The same callback kind on a called layer trains and captures the validation probe.
    cb = kerascool.CaptureCallback(layers="body", probe=2)
    model.fit(x, y, validation_split=0.5, epochs=2, verbose=0, callbacks=[cb])
    probe = x[4:6]  # validation_split takes the last samples
    np.testing.assert_allclose(cb.latest["gated/body"], _dense(model.body, probe), rtol=1e-5, atol=1e-6)


def test_layer_never_called_with_validation_probe_functional():
    model = attention_model()
    model.optimizer.build(model.trainable_variables)
    x, y = token_data(n=8)
    cb = kerascool.CaptureCallback(attention=False)  # nothing chosen, no capture points in this model
    _assert_fails_before_training(model, cb, x, y, "nothing to capture", validation_split=0.5)


@pytest.mark.parametrize("kind", ["functional", "subclassed"])
def test_probe_of_the_wrong_shape(kind):
    model = attention_model() if kind == "functional" else subclassed()
    model.optimizer.build(model.trainable_variables)
    if kind == "functional":
        x, y = token_data(n=8)
        bad = x[:2, :3]
    else:
        x, y = regression_data(n=8, inputs=4, outputs=2)
        bad = np.ones((2, 7), "float32")
    cb = kerascool.CaptureCallback(layers="head", probe=bad)
    _assert_fails_before_training(model, cb, x, y, r"(?s)Invalid value for argument `probe`.*\(2, [37]\)")


def test_argument_errors():
    with pytest.raises(ValueError, match=r"Invalid value for argument `every`.*Received: every=0"):
        kerascool.CaptureCallback(every=0)
    with pytest.raises(ValueError, match=r"Invalid value for argument `probe`.*Received: probe=0"):
        kerascool.CaptureCallback(probe=0)
    with pytest.raises(TypeError, match="Invalid value for argument `probe`"):
        kerascool.CaptureCallback(probe="first")
    with pytest.raises(ValueError, match="same non-empty batch axis"):
        kerascool.CaptureCallback(probe=[np.ones((2, 3)), np.ones((3, 3))])
    with pytest.raises(ValueError, match="matches no keras.layers.MultiHeadAttention"):
        kerascool.Capture(attention_model(), attention="head")
    with pytest.raises(TypeError, match="non-empty string"):
        kerascool.capture(3, np.ones(2))


def test_no_validation_data_warns():
    model = tiny_mlp()
    model.compile(optimizer="sgd", loss="mse")
    cb = kerascool.CaptureCallback(layers="hidden", probe=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(*regression_data(n=8), epochs=1, verbose=0, callbacks=[cb])
    assert cb.captures == {}
    assert any("ran no validation" in str(w.message) for w in caught)


def test_get_config():
    cb = kerascool.CaptureCallback(layers=["hidden"], probe=4, every=2)
    assert cb.get_config() == {"layers": ["hidden"], "attention": True, "probe": 4, "every": 2, "directory": None,
                               "plots": True, "log_dir": None, "keep": None, "points": True}
