"""split / submodel: decided bit for bit against the original model and against the layers called by hand.

Oracles: (1) ``model(x)``, which ``top(bottom(x))`` must equal exactly; (2) the model's
layers called one after the other by hand, for submodel outputs; (3) the original
model's own weights, which training the new models must move (shared, not copied).
"""

import keras
import numpy as np
import pytest
from keras import ops

import kerascool
from tests.helpers import weights_of

RNG = np.random.default_rng(0)
X = RNG.normal(size=(8, 4)).astype("float32")


def np_of(x):
    return np.array(ops.convert_to_numpy(x))


def sequential_in_functional():
    encoder = keras.Sequential(
        [keras.Input((6,))] + [keras.layers.Dense(6, activation="tanh", name=f"block_{i}") for i in (1, 2, 3)],
        name="encoder",
    )
    inputs = keras.Input((4,), name="x")
    h = keras.layers.Dense(6, name="stem")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(encoder(h)), name="net")


def two_inputs(skip=False, late_input=False):
    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    merged = keras.layers.Concatenate(name="merge")(
        [keras.layers.Dense(5, name="dense_a")(a), keras.layers.Dense(5, name="dense_b")(b)]
    )
    h = keras.layers.Dense(10, activation="relu", name="block_1")(merged)
    h = keras.layers.Dense(10, name="block_2")(h)
    if skip:
        h = keras.layers.Add(name="skip")([h, merged])
    if late_input:
        h = keras.layers.Concatenate(name="late")([h, b])
    return keras.Model([a, b], keras.layers.Dense(1, name="head")(h), name="two")


def assert_same(a, b):
    for x, y in zip(keras.tree.flatten(a), keras.tree.flatten(b)):
        np.testing.assert_array_equal(np_of(x), np_of(y))


def test_split_sequential_in_functional_is_exact_shares_layers_and_trains_the_original(tmp_path):
    model = sequential_in_functional()
    for at in ("encoder", "block_2"):  # at the nested model; at a layer inside it, found by its plain name
        bottom, top = kerascool.split(model, at=at)
        assert_same(top(bottom(X)), model(X))
    bottom, top = kerascool.split(model, at="encoder/block_2")  # by path
    assert_same(top(bottom(X)), model(X))
    assert top.get_layer("head") is model.get_layer("head")
    assert set(map(id, bottom.weights)) | set(map(id, top.weights)) == set(map(id, model.weights))
    assert not set(map(id, bottom.weights)) & set(map(id, top.weights))

    before = weights_of(model)
    head = np_of(model.get_layer("head").kernel)
    top.compile(optimizer="sgd", loss="mse")
    top.fit(np_of(bottom(X)), np.ones((8, 2), "float32"), verbose=0)
    assert np.abs(np_of(model.get_layer("head").kernel) - head).max() > 1e-4  # the original's own variable moved
    moved = {w.path for w, b in zip(model.weights, before) if np.abs(np_of(w) - b).max() > 0}
    assert moved == {w.path for w in top.trainable_weights}  # ...and only the top's
    assert_same(top(bottom(X)), model(X))

    for part, x in ((bottom, X), (top, np_of(bottom(X)))):  # both save and load
        part.save(tmp_path / "part.keras")
        assert_same(keras.saving.load_model(tmp_path / "part.keras")(x), part(x))


def test_split_inside_the_nested_model_gives_the_top_the_rest_of_it():
    model = sequential_in_functional()
    bottom, top = kerascool.split(model, at="encoder/block_2")
    assert [layer.name for layer in bottom.layers[1:]] == ["stem", "block_1", "block_2"]
    assert [layer.name for layer in top.layers[1:]] == ["block_3", "head"]
    encoder = model.get_layer("encoder")
    by_hand = encoder.get_layer("block_2")(encoder.get_layer("block_1")(model.get_layer("stem")(X)))
    assert_same(bottom(X), by_hand)


def test_split_two_input_model_is_exact_and_bottom_takes_both_inputs():
    model = two_inputs()
    xb = RNG.normal(size=(8, 3)).astype("float32")
    bottom, top = kerascool.split(model, at="merge")
    assert_same(top(bottom([X, xb])), model([X, xb]))
    bottom, top = kerascool.split(model, at="block_1")
    assert_same(top(bottom([X, xb])), model([X, xb]))
    assert len(bottom.inputs) == 2 and len(top.inputs) == 1
    top.compile(optimizer="sgd", loss="mse")
    kernel = np_of(model.get_layer("block_2").kernel)
    top.fit(np_of(bottom([X, xb])), np.ones((8, 1), "float32"), verbose=0)
    assert np.abs(np_of(model.get_layer("block_2").kernel) - kernel).max() > 1e-4


def test_a_cut_that_other_tensors_cross_is_refused_naming_them():
    with pytest.raises(ValueError, match=r"these tensors cross it: \[\"output of layer 'merge'\"\]"):
        kerascool.split(two_inputs(skip=True), at="block_2")
    with pytest.raises(ValueError, match=r"these tensors cross it: \[\"input 'b'\"\]"):
        kerascool.split(two_inputs(late_input=True), at="block_1")
    # Naming the crossing tensor too makes the cut clean: top takes both.
    model = two_inputs(skip=True)
    bottom, top = kerascool.split(model, at=["block_2", "merge"])
    xb = RNG.normal(size=(8, 3)).astype("float32")
    assert_same(top(bottom([X, xb])), model([X, xb]))
    assert [t.name for t in top.inputs] == ["block_2", "merge"]


def test_keras_hub_bert_backbone_splits_only_with_its_padding_mask_named():
    import keras_hub  # installed by .ci/run: a missing keras-hub must fail, not skip
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=8, intermediate_dim=16, max_sequence_length=8
    )
    inputs = {
        "token_ids": RNG.integers(0, 50, size=(3, 8)).astype("int32"),
        "segment_ids": np.zeros((3, 8), "int32"),
        "padding_mask": np.array([[1] * 8, [1] * 5 + [0] * 3, [1] * 2 + [0] * 6], "int32"),
    }
    # Every transformer layer also reads the padding mask: a cut at one layer alone is not clean.
    with pytest.raises(ValueError, match=r"cross it: \[\"input 'padding_mask'\"\]"):
        kerascool.split(backbone, at="transformer_layer_0")
    bottom, top = kerascool.split(backbone, at=["transformer_layer_0", "padding_mask"])
    hidden, mask = bottom(inputs)
    outputs = top([hidden, mask])
    assert set(outputs) == {"sequence_output", "pooled_output"}
    assert_same(outputs, backbone(inputs))
    assert top.get_layer("transformer_layer_1") is backbone.get_layer("transformer_layer_1")


def test_submodel_outputs_equal_the_layers_called_by_hand():
    model = sequential_in_functional()
    encoder = model.get_layer("encoder")
    stem = model.get_layer("stem")(X)
    block_1 = encoder.get_layer("block_1")(stem)
    head = model(X)

    features = kerascool.submodel(model, outputs=["stem", "encoder/block_1", "head"])
    assert_same(features(X), [stem, block_1, head])
    as_dict = kerascool.submodel(model, outputs={"low": "block_1", "out": "head"})  # plain name: found in encoder
    assert_same(as_dict(X), {"low": block_1, "out": head})
    single = kerascool.submodel(model, outputs="encoder")
    assert_same(single(X), encoder(stem))
    assert single.get_layer("encoder") is encoder  # not reached into: stays one layer

    two = two_inputs()
    xb = RNG.normal(size=(8, 3)).astype("float32")
    merged = kerascool.submodel(two, outputs="merge")
    by_hand = np.concatenate([np_of(two.get_layer("dense_a")(X)), np_of(two.get_layer("dense_b")(xb))], axis=1)
    assert_same(merged([X, xb]), by_hand)


def test_a_sequential_model_can_be_split_and_sliced():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="a"), keras.layers.Dense(2, name="b")])
    bottom, top = kerascool.split(model, at="a")
    assert_same(top(bottom(X)), model(X))
    assert_same(kerascool.submodel(model, outputs="a")(X), model.get_layer("a")(X))


def test_subclassed_models_are_pointed_to_capture():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

    net = Net()
    net(X)
    with pytest.raises(TypeError, match="kerascool.Capture.*kerascool.CaptureCallback"):
        kerascool.submodel(net, outputs="dense")
    with pytest.raises(TypeError, match="Expected a functional or Sequential model"):
        kerascool.split(net, at="dense")
    with pytest.raises(ValueError, match="has no input shape yet"):
        kerascool.split(keras.Sequential([keras.layers.Dense(1, name="a")]), at="a")


def test_misuse_is_refused_with_keras_style_messages():
    model = sequential_in_functional()
    with pytest.raises(ValueError, match=r"Invalid value for argument `at`.*Received: at='nope'"):
        kerascool.split(model, at="nope")
    with pytest.raises(ValueError, match=r"'stem' is not a functional or Sequential sub-model"):
        kerascool.split(model, at="stem/block_1")
    with pytest.raises(ValueError, match="Invalid value for argument `at`"):
        kerascool.split(model, at=[])
    with pytest.raises(ValueError, match="Invalid value for argument `outputs`"):
        kerascool.submodel(model, outputs=[])
    shared = keras.layers.Dense(4, name="shared")
    inputs = keras.Input((4,))
    twice = keras.Model(inputs, shared(shared(inputs)))
    with pytest.raises(ValueError, match="'shared' is called 2 times"):
        kerascool.split(twice, at="shared")
