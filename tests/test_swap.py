"""WeightSwap: the one swapping mechanism, decided by exact equality with the values it must show or restore."""

import keras
import numpy as np
import pytest

import kerascool
from kerascool import swap as swap_lib
from tests.helpers import regression_data, tiny_mlp, weights_of


def model_and_swaps():
    model = tiny_mlp()
    model.compile(optimizer="sgd", loss="mse")
    raw = weights_of(model)
    shadows_a = [keras.Variable(np.full(v.shape, 1.0, "float32")) for v in model.weights]
    shadows_b = [keras.Variable(np.full(v.shape, 2.0, "float32")) for v in model.weights[:2]]  # the first layer only
    a = kerascool.WeightSwap(model, list(zip(model.weights, shadows_a)), name="a")
    b = kerascool.WeightSwap(model, list(zip(model.weights[:2], shadows_b)), name="b")
    return model, raw, a, b


def assert_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        np.testing.assert_array_equal(x, y)


def test_swap_in_and_out_are_idempotent_and_exact():
    model, raw, a, _ = model_and_swaps()
    assert a.swap_in() is True and a.is_swapped
    assert a.swap_in() is False
    assert all((w == 1.0).all() for w in weights_of(model))
    assert a.swap_out() is True and not a.is_swapped
    assert a.swap_out() is False
    assert_equal(weights_of(model), raw)


def test_stacked_swaps_show_the_last_one_and_restore_the_raw_values_at_the_end():
    model, raw, a, b = model_and_swaps()
    a.swap_in()
    b.swap_in()
    assert_equal(weights_of(model), [np.full(w.shape, v, "float32") for w, v in zip(raw, [2, 2, 1, 1])])
    a.swap_out()  # b stays in; the variables only a covered are raw again
    assert_equal(weights_of(model), [np.full(w.shape, 2, "float32") for w in raw[:2]] + raw[2:])
    b.swap_out()
    assert_equal(weights_of(model), raw)


def test_swapped_context_restores_on_exception_and_nests():
    model, raw, a, _ = model_and_swaps()
    with pytest.raises(KeyboardInterrupt):
        with a.swapped():
            with a.swapped():
                pass
            assert a.is_swapped  # the inner block did not swap back
            raise KeyboardInterrupt
    assert_equal(weights_of(model), raw)


def test_evaluate_guard_restores_swaps_opened_inside_and_keeps_outer_ones():
    model, raw, a, b = model_and_swaps()
    x, y = regression_data(n=8)

    class SwapThenFail(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            b.swap_in()

        def on_test_batch_end(self, batch, logs=None):
            raise RuntimeError("failed while swapped")

    with a.swapped():
        with pytest.raises(RuntimeError, match="failed while swapped"):
            model.evaluate(x, y, callbacks=[SwapThenFail()], verbose=0)
        assert a.is_swapped and not b.is_swapped  # b (opened inside) swapped out, a (outer) kept
        assert all((w == 1.0).all() for w in weights_of(model))
    assert_equal(weights_of(model), raw)


def test_protect_restores_state_changed_inside_a_swap_only():
    model, raw, a, _ = model_and_swaps()
    bias = model.weights[1]
    swap_lib.protect(model, [bias])  # no swap active: nothing to do
    with a.swapped():
        swap_lib.protect(model, [bias])
        bias.assign(np.full(bias.shape, 5.0, "float32"))
    assert_equal(weights_of(model), raw)
    bias.assign(np.full(bias.shape, 5.0, "float32"))  # outside a swap, changes stay
    assert (weights_of(model)[1] == 5.0).all()


def test_saving_inside_a_swap_saves_the_shadows(tmp_path):
    model, raw, a, _ = model_and_swaps()
    with a.swapped():
        model.save_weights(str(tmp_path / "a.weights.h5"))
    loaded = tiny_mlp(name="loaded")
    loaded.load_weights(str(tmp_path / "a.weights.h5"))
    assert all((w == 1.0).all() for w in weights_of(loaded))
    assert_equal(weights_of(model), raw)


def test_training_after_swapping_optimizer_shadows_works():
    # JAX: a variable and its shadow must never share a buffer (the train step donates both).
    model = tiny_mlp()
    model.compile(optimizer="adam", loss="mse")
    ema = kerascool.EMA(0.5)
    x, y = regression_data(n=16)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ema])
    with ema.swapped():
        swapped_in = weights_of(model)
        with pytest.raises(RuntimeError, match="inside an open weight swap"):
            model.train_on_batch(x[:8], y[:8])  # training here would be undone by the swap-out
        assert all(np.array_equal(a, b) for a, b in zip(swapped_in, weights_of(model)))
        model.predict(x, verbose=0)  # the averages were copied in, not aliased: the model still runs
    model.train_on_batch(x[:8], y[:8])
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ema])
    assert all(np.isfinite(w).all() for w in weights_of(model))
