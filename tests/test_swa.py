"""SWA and update_bn: decided against NumPy means of the recorded weights and of the batch statistics.

Oracles: (1) the plain mean of the weights recorded at the chosen epochs or updates
(<= 1e-6); (2) `evaluate` of that mean set by hand, for the validation metrics;
(3) BatchNorm statistics as the mean over batches of NumPy batch means and (biased)
variances; (4) an uninterrupted run, for an interrupted and resumed one.
"""

import keras
import numpy as np
import pytest

import kerascool
from tests.helpers import regression_data, tiny_mlp, weights_of
from tests.test_ema import Recorder, assert_close


class EpochRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(weights_of(self.model))


class FailAt(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("interrupted")


def bn_model(name="bn_model"):
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="hidden"),
                             keras.layers.BatchNormalization(momentum=0.5, name="bn"),
                             keras.layers.Dense(1, name="out")], name=name)


def mean_of(weight_lists):
    return [np.mean([ws[i].astype("float64") for ws in weight_lists], axis=0) for i in range(len(weight_lists[0]))]


def compiled(model):
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    return model


def test_per_epoch_average_and_validation_against_numpy():
    model, epochs = compiled(bn_model()), EpochRecorder()
    swa = kerascool.SWA(start=1, every=2, include_non_trainable=True)
    x, y = regression_data(n=32)
    xv, yv = regression_data(n=16, seed=1)
    history = model.fit(x, y, batch_size=8, epochs=5, shuffle=False, verbose=0,
                        validation_data=(xv, yv), callbacks=[epochs, swa])
    # Epochs 3 and 5 (counting from 1) are averaged: E > start=1 with (E - start) % every == 0.
    expected = mean_of([epochs.weights[2], epochs.weights[4]])
    assert swa.averaged_count() == 2
    with swa.swapped():
        assert_close(weights_of(model), expected)  # BatchNorm statistics included (opted in)
    assert_close(weights_of(model), epochs.weights[-1], atol=0)

    probe = compiled(bn_model("probe"))
    # Epochs 1-2: no average yet, validation sees the training weights; then the average so far.
    seen = [epochs.weights[0], epochs.weights[1], epochs.weights[2], epochs.weights[2], expected]
    for epoch, weights in enumerate(seen):
        probe.set_weights([w.astype("float32") for w in weights])
        assert history.history["val_loss"][epoch] == pytest.approx(probe.evaluate(xv, yv, verbose=0), rel=1e-5)


def test_per_step_average_against_numpy():
    model, recorder = compiled(tiny_mlp()), Recorder()
    swa = kerascool.SWA(start=3, every=2, unit="step", swap_at_end=True)
    x, y = regression_data(n=32)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[recorder, swa])
    chosen = [recorder.weights[n] for n in (5, 7)]  # updates n > 3 with (n - 3) % 2 == 0
    assert swa.averaged_count() == 2
    assert_close(weights_of(model), mean_of(chosen))  # swap_at_end: the average stays in the model


@pytest.mark.parametrize("restore_first", [True, False])
def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path, restore_first):
    x, y = regression_data(n=32)
    initial = tiny_mlp(name="initial").get_weights()

    def run(backup, fail=False):
        model = compiled(tiny_mlp())
        model.set_weights(initial)
        swa = kerascool.SWA(start=1)
        restore = keras.callbacks.BackupAndRestore(str(tmp_path / backup))
        callbacks = [restore, swa] if restore_first else [swa, restore]  # either saves before the other
        if fail:
            callbacks.append(FailAt(epoch=2, batch=1))
        model.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0, callbacks=callbacks)
        raw = weights_of(model)
        with swa.swapped():
            return raw, weights_of(model), swa.averaged_count()

    with pytest.raises(RuntimeError, match="interrupted"):
        run("backup", fail=True)
    resumed = run("backup")
    straight = run("fresh")
    assert resumed[2] == straight[2] == 3
    assert_close(resumed[0], straight[0])
    assert_close(resumed[1], straight[1])


def test_update_bn_sets_the_mean_of_the_batch_statistics():
    bn = keras.layers.BatchNormalization(name="bn")
    model = keras.Sequential([keras.Input((4,)), bn, keras.layers.Dense(1, name="out")])
    x, y = regression_data(n=40)
    others = [w for w, v in zip(weights_of(model), model.weights) if "moving" not in v.path]
    batches = [x[i:i + 8] for i in range(0, 40, 8)]
    mean = np.mean([b.mean(0) for b in batches], axis=0)
    var = np.mean([b.var(0) for b in batches], axis=0)  # biased batch variance, as Keras's BatchNormalization

    for data in (x, (x, y), [(b, None) for b in batches]):  # an array, an (x, y) tuple, an iterable of batches
        bn.moving_mean.assign(np.zeros(4, "float32"))
        kerascool.update_bn(model, data, batch_size=8)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean), mean, atol=1e-6)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_variance), var, atol=1e-6)
    assert bn.momentum == 0.99  # put back
    assert_close([w for w, v in zip(weights_of(model), model.weights) if "moving" not in v.path], others, atol=0)

    kerascool.update_bn(model, x, batch_size=8, steps=2)  # the first two batches only
    first_two = (batches[0].mean(0) + batches[1].mean(0)) / 2
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean), first_two, atol=1e-6)


def test_update_bn_inside_swapped_keeps_the_training_statistics():
    model = compiled(bn_model())
    swa = kerascool.SWA(start=0)
    x, y = regression_data(n=32)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[swa])
    raw = weights_of(model)
    with swa.swapped():
        kerascool.update_bn(model, x, batch_size=8)
        recomputed = weights_of(model)
    assert_close(weights_of(model), raw, atol=0)  # training weights and statistics are back
    stats = [i for i, v in enumerate(model.weights) if "moving" in v.path]
    assert stats and not all(np.array_equal(recomputed[i], raw[i]) for i in stats)


def test_swapped_before_the_first_average_is_refused():
    model = compiled(tiny_mlp())
    swa = kerascool.SWA(start=5)
    x, y = regression_data(n=16)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[swa])
    with pytest.raises(ValueError, match="SWA has averaged no weights yet"):
        swa.swapped()


def test_update_bn_without_batchnorm_changes_nothing_and_refuses_renorm():
    model = tiny_mlp()
    before = weights_of(model)
    kerascool.update_bn(model, regression_data(n=8)[0])
    assert_close(weights_of(model), before, atol=0)
    renorm = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(renorm=True)])
    with pytest.raises(ValueError, match="renorm=True"):
        kerascool.update_bn(renorm, regression_data(n=8)[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"start": -1}, r"Invalid value for argument `start`. Expected an integer >= 0. Received: start=-1"),
        ({"every": 0}, "every=0"),
        ({"unit": "batch"}, r"Expected one of \('epoch', 'step'\). Received: unit='batch'"),
        ({"validation": "ema"}, r"Expected one of \('swa', 'raw', 'both'\)"),
    ],
)
def test_misuse_is_refused_before_training(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kerascool.SWA(**kwargs)


def test_get_config_round_trips():
    swa = kerascool.SWA(start=2, every=3, unit="step", validation="both", swap_at_end=True)
    assert kerascool.SWA(**swa.get_config()).get_config() == swa.get_config()
