"""PythonMetric: a NumPy metric per epoch in the logs, monitored by Keras callbacks, best weights kept.

Oracles: a scripted metric sequence whose best epochs are known in advance
(files saved exactly then, EarlyStopping stopping exactly when its patience
runs out), the weights recorded at each epoch's end, a NumPy exact-match
metric on ``model.predict``, and the EMA's own averages (``ema.swapped()``).
"""

import os

import keras
import numpy as np
import pytest

import kerascool


def tiny(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


def data(n=16):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype("float32")
    return x, (x[:, :1] - x[:, 1:2]).astype("float32")


class WeightsAtEpochEnd(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append([np.array(w) for w in self.model.get_weights()])


def test_scripted_metric_saves_best_weights_at_the_right_epochs_and_drives_early_stopping(tmp_path):
    script = [0.1, 0.4, 0.3, 0.6, 0.5, 0.2, 0.9, 0.95]
    calls = []

    def score(y_true, y_pred):
        calls.append((y_true.shape, y_pred.shape))
        return script[len(calls) - 1]

    x, y = data()
    model = tiny()
    metric = kerascool.PythonMetric(score, (x, y), filepath=str(tmp_path / "best_{epoch}.weights.h5"))
    record = WeightsAtEpochEnd()
    stop = keras.callbacks.EarlyStopping(monitor="val_score", mode="max", patience=2)
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "keras_best.weights.h5"), monitor="val_score", mode="max", save_best_only=True, save_weights_only=True
    )
    history = model.fit(x, y, epochs=8, verbose=0, callbacks=[metric, record, stop, checkpoint])

    # Best at epochs 0, 1, 3 (0-based); no improvement at 4 and 5 -> patience 2 stops after epoch 5.
    assert history.history["val_score"] == pytest.approx(script[:6])
    assert sorted(os.listdir(tmp_path)) == ["best_1.weights.h5", "best_2.weights.h5", "best_4.weights.h5", "keras_best.weights.h5"]
    assert metric.best == pytest.approx(0.6) and metric.best_epoch == 3
    assert calls[0] == ((16, 1), (16, 1))
    for kept, recorded in zip(metric.best_weights, record.weights[3]):
        np.testing.assert_array_equal(kept, recorded)
    for path in ("best_4.weights.h5", "keras_best.weights.h5"):  # ours and ModelCheckpoint's agree
        fresh = tiny(seed=1)
        fresh.load_weights(str(tmp_path / path))
        for loaded, recorded in zip(fresh.get_weights(), record.weights[3]):
            np.testing.assert_array_equal(loaded, recorded)


def test_metric_sees_true_labels_and_predictions_and_restores_the_best():
    x, y = data()
    labels = (y > 0).astype("float32")

    def exact_match(y_true, y_pred):
        return float(np.mean((y_pred > 0.5) == (y_true > 0.5)))

    model = tiny()
    record = WeightsAtEpochEnd()
    batches = [(x[:8], labels[:8]), (x[8:], labels[8:])]  # any iterable of (x, y) batches
    metric = kerascool.PythonMetric(exact_match, batches, name="val_em", mode="max", restore_best=True)
    history = model.fit(x, labels, epochs=5, verbose=0, callbacks=[metric, record])
    for e in range(5):
        probe = tiny()
        probe.set_weights(record.weights[e])
        assert history.history["val_em"][e] == pytest.approx(exact_match(labels, probe.predict(x, verbose=0)))
    best = int(np.argmax(history.history["val_em"]))  # first maximum: later ties are not improvements
    assert metric.best_epoch == best
    for now, kept in zip(model.get_weights(), record.weights[best]):
        np.testing.assert_array_equal(now, kept)


def test_with_ema_the_metric_and_the_kept_weights_are_the_averages():
    x, y = data()
    seen = []

    def mse(y_true, y_pred):  # scripted to improve every epoch: the last epoch's weights are kept
        seen.append(np.array(y_pred))
        return 1.0 / len(seen)

    model = tiny()
    ema = kerascool.EMA(decay=0.5)
    metric = kerascool.PythonMetric(mse, (x, y), mode="min")  # averages="auto" finds the EMA
    model.fit(x, y, batch_size=4, epochs=3, verbose=0, callbacks=[ema, metric])
    raw = model.predict(x, verbose=0)
    with ema.swapped():
        averaged = model.predict(x, verbose=0)
        averaged_weights = [np.array(w) for w in model.get_weights()]
    assert not np.allclose(raw, averaged)  # the two differ, so the check below can tell them apart
    np.testing.assert_allclose(seen[-1], averaged, rtol=1e-6)
    assert metric.best_epoch == 2
    for kept, avg in zip(metric.best_weights, averaged_weights):
        np.testing.assert_array_equal(kept, avg)
    # averages=None: the model's own weights.
    raw_metric = kerascool.PythonMetric(mse, (x, y), mode="min", averages=None)
    seen.clear()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[ema, raw_metric])
    np.testing.assert_allclose(seen[-1], model.predict(x, verbose=0), rtol=1e-6)


def test_misuse():
    x, y = data()
    with pytest.raises(TypeError, match=r"Expected a callable fn\(y_true, y_pred\) -> float"):
        kerascool.PythonMetric("bleu", (x, y))
    with pytest.raises(ValueError, match=r"`mode`. Expected one of \('max', 'min'\). Received: mode='auto'"):
        kerascool.PythonMetric(np.mean, (x, y), mode="auto")
    with pytest.raises(ValueError, match=r"`filepath`. Expected a path ending in `.weights.h5`"):
        kerascool.PythonMetric(np.mean, (x, y), filepath="best.h5")
    with pytest.raises(ValueError, match=r"`validation_data`. Expected \(x, y\) arrays"):
        kerascool.PythonMetric(np.mean, (x,))
    with pytest.raises(ValueError, match=r"`validation_data`. Expected \(x, y\) arrays"):
        kerascool.PythonMetric(np.mean, 3)
    with pytest.raises(ValueError, match=r"`averages`"):
        kerascool.PythonMetric(np.mean, (x, y), averages="ema")
    model = tiny()
    bad = kerascool.PythonMetric(lambda t, p: {"bleu": 1.0}, (x, y), name="val_bleu")
    with pytest.raises(TypeError, match=r"PythonMetric 'val_bleu': `fn` must return one number"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[bad])
