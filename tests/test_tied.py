"""TiedHead: decided against an untied twin model, keras-hub's ReversibleEmbedding and NumPy recursions.

Oracles: (1) an untied model (an Embedding E1 and a Dense whose kernel is E.T): one SGD
step of the tied model moves E by the SUM of the two untied updates; (2) keras-hub's
``ReversibleEmbedding(..., reverse=True)`` for the forward product; (3) the stock update,
for a layer-rate multiplier applied once; (4) a NumPy EMA recursion over the recorded E.
"""

import keras
import numpy as np
import pytest
from keras import ops

import kerascool
from tests.helpers import weights_of

V, D, L = 12, 8, 6
RNG = np.random.default_rng(0)
TOKENS = RNG.integers(0, V, size=(64, L)).astype("int32")
NEXT = (TOKENS + 1) % V  # the tiny LM's task: predict the next token id


def np_of(x):
    return np.array(ops.convert_to_numpy(x))


def tiny_lm():
    tokens = keras.Input((L,), dtype="int32")
    embed = keras.layers.Embedding(V, D, name="embed")
    hidden = keras.layers.Dense(D, activation="tanh", name="mix")(embed(tokens))
    return keras.Model(tokens, kerascool.TiedHead(embed, name="head")(hidden))


def lm_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_a_tiny_lm_trains_with_one_embedding_variable_used_twice():
    model = tiny_lm()
    embed, head = model.get_layer("embed"), model.get_layer("head")
    assert head.matrix is embed.embeddings
    assert sum(w is embed.embeddings for w in model.weights) == 1
    assert [w.path for w in model.trainable_weights] == ["embed/embeddings", "mix/kernel", "mix/bias", "head/bias"]
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=lm_loss(), metrics=["accuracy"])
    history = model.fit(TOKENS, NEXT, batch_size=16, epochs=15, verbose=0)
    assert history.history["loss"][-1] < 0.2 * history.history["loss"][0]
    assert history.history["accuracy"][-1] > 0.95


def test_one_step_moves_the_embedding_by_the_sum_of_both_uses():
    lr = 0.5
    model = tiny_lm()
    E, mix = np_of(model.get_layer("embed").embeddings), model.get_layer("mix").get_weights()
    b = RNG.normal(size=(V,)).astype("float32")
    model.get_layer("head").bias.assign(b)

    tokens = keras.Input((L,), dtype="int32")
    hidden = keras.layers.Dense(D, activation="tanh", name="mix")(keras.layers.Embedding(V, D, name="e1")(tokens))
    untied = keras.Model(tokens, keras.layers.Dense(V, name="out")(hidden))
    untied.get_layer("e1").set_weights([E])
    untied.get_layer("mix").set_weights(mix)
    untied.get_layer("out").set_weights([E.T, b])
    np.testing.assert_allclose(np_of(model(TOKENS)), np_of(untied(TOKENS)), rtol=1e-5, atol=1e-5)

    for m in (model, untied):
        m.compile(optimizer=keras.optimizers.SGD(lr), loss=lm_loss())
        m.fit(TOKENS, NEXT, batch_size=64, epochs=1, verbose=0)
    step_in = np_of(untied.get_layer("e1").embeddings) - E
    step_out = np_of(untied.get_layer("out").kernel).T - E
    assert np.abs(step_in).max() > 1e-4 and np.abs(step_out).max() > 1e-4  # both uses have gradients
    np.testing.assert_allclose(np_of(model.get_layer("embed").embeddings) - E, step_in + step_out, atol=1e-6)
    np.testing.assert_allclose(np_of(model.get_layer("head").bias), np_of(untied.get_layer("out").bias), atol=1e-6)


@pytest.mark.parametrize("kind", ["functional", "sequential"])
def test_keras_round_trip_keeps_the_tie_and_the_values(tmp_path, kind):
    if kind == "functional":
        model = tiny_lm()
    else:
        embed = keras.layers.Embedding(V, D, name="embed")
        model = keras.Sequential([keras.Input((L,), dtype="int32"), embed, keras.layers.Dense(D, name="mix"),
                                  kerascool.TiedHead(embed, name="head")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=lm_loss())
    model.fit(TOKENS, NEXT, batch_size=16, epochs=1, verbose=0)
    model.save(tmp_path / "lm.keras")
    loaded = keras.saving.load_model(tmp_path / "lm.keras")
    embed, head = loaded.get_layer("embed"), loaded.get_layer("head")
    assert head.embedding is embed and head.matrix is embed.embeddings  # still one variable
    assert [w.name for w in loaded.weights] == ["embeddings", "kernel", "bias", "bias"]
    for a, b in zip(weights_of(loaded), weights_of(model)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np_of(loaded(TOKENS)), np_of(model(TOKENS)))
    # Training the loaded model moves the one matrix for both uses, as the original does.
    for m in (model, loaded):
        m.fit(TOKENS, NEXT, batch_size=16, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(np_of(loaded(TOKENS)), np_of(model(TOKENS)), atol=1e-5)


def test_forward_equals_keras_hub_reversible_embedding_and_ties_to_it():
    import keras_hub  # installed by .ci/run: a missing keras-hub must fail, not skip
    reversible = keras_hub.layers.ReversibleEmbedding(V, D)
    head = kerascool.TiedHead(reversible, use_bias=False)
    hidden = RNG.normal(size=(3, L, D)).astype("float32")
    reversible(TOKENS[:3])
    np.testing.assert_allclose(np_of(head(hidden)), np_of(reversible(hidden, reverse=True)), rtol=1e-5, atol=1e-6)
    assert head.matrix is reversible.embeddings


def test_layer_rates_give_the_shared_embedding_one_multiplier():
    def one_step(rules):
        keras.utils.set_random_seed(3)
        model = tiny_lm()
        if rules is not None:
            kerascool.layer_rates(model, rules, verbose=False)
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=lm_loss())
        before = np_of(model.get_layer("embed").embeddings)
        model.fit(TOKENS, NEXT, batch_size=64, epochs=1, verbose=0)
        return model, np_of(model.get_layer("embed").embeddings) - before

    _, stock = one_step(None)
    model, half = one_step({"embed": 0.5})
    assert np.abs(stock).max() > 1e-4
    np.testing.assert_allclose(half, 0.5 * stock, rtol=1e-5, atol=1e-8)  # once: not 0.25
    table = kerascool.layer_rate_table(model)
    assert table.count("embeddings") == 1
    # Depth groups: the matrix belongs to the embedding's group (the bottom one), not to the head's.
    kerascool.layer_rates(model, decay=0.5, verbose=False)
    rates = kerascool.current_layer_rates(model)
    assert list(rates) == ["embed", "mix", "head"] and rates["embed"] == 0.25
    row = [line for line in kerascool.layer_rate_table(model).splitlines() if "embed/embeddings" in line]
    assert len(row) == 1 and " embed " in row[0]


def test_ema_averages_the_shared_matrix_once():
    model = tiny_lm()
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=lm_loss())
    recorded = [np_of(model.get_layer("embed").embeddings)]

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            recorded.append(weights_of(self.model)[0])

    ema = kerascool.EMA(0.5)
    model.fit(TOKENS, NEXT, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[Record(), ema])
    expected = recorded[0].astype("float64")
    for e in recorded[1:]:
        expected = 0.5 * expected + 0.5 * e
    with ema.swapped():
        averaged = weights_of(model)
    assert len(averaged) == len(model.weights) == 4
    assert np.abs(expected - recorded[-1]).max() > 1e-4
    np.testing.assert_allclose(averaged[0], expected, atol=1e-6)


def test_a_subclassed_lm_built_only_by_fit_ties_too():
    class LM(keras.Model):
        def __init__(self):
            super().__init__()
            self.embed = keras.layers.Embedding(V, D)
            self.head = kerascool.TiedHead(self.embed)

        def call(self, tokens):
            return self.head(self.embed(tokens))

    model = LM()
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=lm_loss())
    model.fit(TOKENS, NEXT, batch_size=64, epochs=1, verbose=0)
    assert len(model.trainable_weights) == 2  # E and b
    E = np_of(model.embed.embeddings)
    np.testing.assert_allclose(np_of(model(TOKENS[:2])), E[TOKENS[:2]] @ E.T + np_of(model.head.bias), atol=1e-5)


def test_misuse_is_refused_with_keras_style_messages():
    with pytest.raises(ValueError, match="Invalid value for argument `embedding`"):
        kerascool.TiedHead("embed")
    with pytest.raises(ValueError, match="Invalid value for argument `use_bias`"):
        kerascool.TiedHead(keras.layers.Embedding(V, D), use_bias=1)
    built = keras.layers.Embedding(V, D)
    built.build()
    with pytest.raises(ValueError, match="Invalid value for argument `weight`.*Received: weight='kernel'"):
        kerascool.TiedHead(built, weight="kernel")
    with pytest.raises(ValueError, match="inputs need a last axis of 8"):
        kerascool.TiedHead(built)(np.zeros((2, 5), "float32"))
