"""EMA: decided against a NumPy recursion over the recorded weights, Keras's `use_ema`, and runs without it.

Oracles: (1) `ema_oracle`, the module docstring's formulas re-implemented in NumPy
(float64) over the weights recorded after every batch (<= 1e-6); (2) Keras's built-in
`use_ema=True` on the same run; (3) the same training without EMA, bit for bit;
(4) `evaluate` on averages set by hand; (5) an uninterrupted run, for kill-and-resume.
"""

import os
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import kerascool
from tests.helpers import BACKEND, regression_data, tiny_mlp, weights_of

DECAY = 0.8


class Recorder(keras.callbacks.Callback):
    """The weights when training starts and after every batch."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def on_train_begin(self, logs=None):
        if not self.weights:
            self.weights.append(weights_of(self.model))

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append(weights_of(self.model))


class Boom(keras.callbacks.Callback):
    def __init__(self, where, error=RuntimeError):
        super().__init__()
        self.where, self.error = where, error

    def on_test_batch_end(self, batch, logs=None):
        if self.where == "test":
            raise self.error("boom in validation")

    def on_predict_batch_end(self, batch, logs=None):
        if self.where == "predict":
            raise self.error("boom in predict")


def ema_oracle(trajectory, decay, warmup=None, gamma=1.0, power=2 / 3, every=1, start=0):
    """The EMA of a weight trajectory, written from the documented formulas."""
    average = [w.astype("float64") for w in trajectory[0]]
    for n, weights in enumerate(trajectory[1:], start=1):
        if n <= start:
            average = [w.astype("float64") for w in weights]
            continue
        since = n - start
        if since % every:
            continue
        s = since // every - 1
        d = decay
        if warmup == "timm":
            d = min(decay, 1 - (1 + s / gamma) ** -power)
        elif warmup == "tf":
            d = min(decay, (1 + s) / (10 + s))
        average = [d * a + (1 - d) * w for a, w in zip(average, weights)]
    return average


def averages_of(model, ema):
    with ema.swapped():
        return weights_of(model)


def assert_close(xs, ys, atol=1e-6):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def compiled(optimizer=None, model=None, **compile_kwargs):
    model = model or tiny_mlp()
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.1), loss="mse", **compile_kwargs)
    return model


def fit(model, callbacks, epochs=2, batch_size=8, validation=False, **kwargs):
    x, y = regression_data(n=32)
    extra = {"validation_data": regression_data(n=16, seed=1)} if validation else {}
    return model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0,
                     callbacks=callbacks, **extra, **kwargs)


OPTIONS = {
    "plain": {},
    "timm": {"warmup": "timm"},
    "timm_gamma_power_start": {"warmup": "timm", "warmup_gamma": 2.0, "warmup_power": 0.75, "start": 2},
    "tf": {"warmup": "tf"},
    "every3": {"every": 3},
    "every2_start3": {"every": 2, "start": 3},
}


def test_averages_equal_numpy_recursions_over_the_recorded_weights():
    model, recorder = compiled(keras.optimizers.Adam(0.05)), Recorder()
    emas = {name: kerascool.EMA(DECAY, **options) for name, options in OPTIONS.items()}
    fit(model, [recorder, *emas.values()])  # several EMAs on one model: each its own average
    assert len(recorder.weights) == 9  # 8 real updates
    for name, options in OPTIONS.items():
        expected = ema_oracle(recorder.weights, DECAY, **{k.replace("warmup_", ""): v for k, v in options.items()})
        assert_close(averages_of(model, emas[name]), expected)
    assert_close(weights_of(model), recorder.weights[-1], atol=0)  # the raw weights are in the model


def test_decay_at_small_table():
    ema = kerascool.EMA(0.9, warmup="tf", every=2, start=1)
    # update 1: copy (before start); events at 3, 5, 7 with s = 0, 1, 2.
    table = [ema.decay_at(n) for n in range(1, 8)]
    expected = [0.0, None, 1 / 10, None, 2 / 11, None, 3 / 12]
    for got, want in zip(table, expected):
        assert (got is None) == (want is None)
        if want is not None:
            assert got == pytest.approx(want, abs=1e-7)


def test_equals_keras_builtin_use_ema_with_the_same_convention():
    def make(**kw):
        return keras.optimizers.Adam(0.05, **kw)

    builtin, ours = tiny_mlp(name="builtin"), tiny_mlp(name="ours")
    ours.set_weights(builtin.get_weights())
    compiled(make(use_ema=True, ema_momentum=DECAY), builtin)
    compiled(make(), ours)
    fit(builtin, [])  # Keras writes its averages into the model at the end of fit
    ema = kerascool.EMA(DECAY, start=1, swap_at_end=True)  # Keras: a copy at the first update
    fit(ours, [ema])
    assert_close(weights_of(ours), weights_of(builtin))


def test_training_with_ema_is_bit_identical_to_training_without():
    plain, with_ema = tiny_mlp(name="plain"), tiny_mlp(name="with_ema")
    with_ema.set_weights(plain.get_weights())
    compiled(keras.optimizers.Adam(0.05), plain)
    compiled(keras.optimizers.Adam(0.05), with_ema)
    history_plain = fit(plain, [], epochs=3, validation=True)
    ema = kerascool.EMA(DECAY)
    history_ema = fit(with_ema, [ema], epochs=3, validation=True)
    x, _ = regression_data(n=8)
    with_ema.predict(x, callbacks=[ema], verbose=0)
    for a, b in zip(weights_of(plain), weights_of(with_ema)):
        np.testing.assert_array_equal(a, b)
    assert history_plain.history["loss"] == history_ema.history["loss"]
    assert history_plain.history["val_loss"] != history_ema.history["val_loss"]  # validation saw the EMA


def test_validation_metrics_during_fit_are_those_of_the_averages():
    model, recorder = compiled(), Recorder()
    ema = kerascool.EMA(DECAY)
    history = fit(model, [recorder, ema], epochs=2, validation=True)
    xv, yv = regression_data(n=16, seed=1)
    probe = compiled(model=tiny_mlp(name="probe"))
    for epoch, end in enumerate((5, 9)):  # 4 updates per epoch: weights 0..4, 0..8
        probe.set_weights([w.astype("float32") for w in ema_oracle(recorder.weights[:end], DECAY)])
        by_hand = probe.evaluate(xv, yv, verbose=0)
        assert history.history["val_loss"][epoch] == pytest.approx(by_hand, rel=1e-5)


def test_validation_both_reports_raw_and_averaged_metrics():
    model = compiled()
    ema = kerascool.EMA(DECAY, validation="both")
    history = fit(model, [ema], epochs=1, validation=True)
    xv, yv = regression_data(n=16, seed=1)
    raw = model.evaluate(xv, yv, verbose=0)
    with ema.swapped():
        averaged = model.evaluate(xv, yv, verbose=0)
    assert history.history["val_loss"][0] == pytest.approx(raw, rel=1e-6)
    assert history.history["val_ema_loss"][0] == pytest.approx(averaged, rel=1e-6)
    assert raw != pytest.approx(averaged, rel=1e-3)


def test_evaluate_and_predict_with_the_callback_use_the_averages_and_restore_the_raw_weights():
    model = compiled()
    ema = kerascool.EMA(DECAY)
    fit(model, [ema])
    raw = weights_of(model)
    x, y = regression_data(n=16, seed=1)
    with ema.swapped():
        expected_pred = model.predict(x, verbose=0)
        expected_loss = model.evaluate(x, y, verbose=0)
    # Keras 3.15's SwapEMAWeights leaves the averages in the model after predict.
    np.testing.assert_allclose(model.predict(x, callbacks=[ema], verbose=0), expected_pred, atol=1e-6)
    assert_close(weights_of(model), raw, atol=0)
    assert model.evaluate(x, y, callbacks=[ema], verbose=0) == pytest.approx(expected_loss, rel=1e-6)
    assert_close(weights_of(model), raw, atol=0)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_exception_inside_validation_leaves_the_raw_weights(error):
    model, recorder = compiled(), Recorder()
    ema = kerascool.EMA(DECAY)
    with pytest.raises(error, match="boom in validation"):
        fit(model, [recorder, ema, Boom("test", error)], validation=True)
    assert len(recorder.weights) == 5  # stopped in the first validation
    assert_close(weights_of(model), recorder.weights[-1], atol=0)
    # The model still trains, with the EMA, afterwards.
    fit(model, [recorder, ema], epochs=1)
    assert_close(averages_of(model, ema), ema_oracle(recorder.weights, DECAY))


def test_a_keyboard_interrupt_inside_predict_leaves_the_raw_weights(error=KeyboardInterrupt):
    model = compiled()
    ema = kerascool.EMA(DECAY)
    fit(model, [ema], epochs=1)
    raw = weights_of(model)
    x, _ = regression_data(n=16)
    with pytest.raises(error, match="boom in predict"):
        model.predict(x, batch_size=4, callbacks=[ema, Boom("predict", error)], verbose=0)
    assert_close(weights_of(model), raw, atol=0)


def test_swapped_is_idempotent_nested_and_restores_on_exception():
    model = compiled()
    ema = kerascool.EMA(DECAY)
    fit(model, [ema], epochs=1)
    raw = weights_of(model)
    with ema.swapped():
        averaged = weights_of(model)
        with ema.swapped():  # nested: no second swap, and the outer one stays
            pass
        assert_close(weights_of(model), averaged, atol=0)
        x, y = regression_data(n=8)
        model.evaluate(x, y, callbacks=[ema], verbose=0)  # its own swap is a no-op; the outer one stays
        assert_close(weights_of(model), averaged, atol=0)
    assert_close(weights_of(model), raw, atol=0)
    with pytest.raises(ValueError, match="inside"):
        with ema.swapped():
            raise ValueError("inside")
    assert_close(weights_of(model), raw, atol=0)
    assert not all(np.array_equal(a, b) for a, b in zip(averaged, raw))


def test_checkpoints_hold_the_averages_in_any_callback_order(tmp_path):
    model = compiled()
    ema = kerascool.EMA(DECAY)

    def checkpoint(name, averaged):
        ckpt = keras.callbacks.ModelCheckpoint(str(tmp_path / f"{name}.weights.h5"), save_weights_only=True)
        return ema.with_averages(ckpt) if averaged else ckpt

    # Averaged checkpoints before and after the EMA; a plain one (as BackupAndRestore) in between.
    fit(model, [checkpoint("before", True), ema, checkpoint("raw", False), checkpoint("after", True)],
        validation=True)
    raw, averaged = weights_of(model), averages_of(model, ema)
    loaded = tiny_mlp(name="loaded")
    for name, expected in (("before", averaged), ("after", averaged), ("raw", raw)):
        loaded.load_weights(str(tmp_path / f"{name}.weights.h5"))
        assert_close(weights_of(loaded), expected, atol=0)
    assert_close(weights_of(model), raw, atol=0)


def test_swap_at_end_leaves_the_averages_in_the_model():
    model, recorder = compiled(), Recorder()
    ema = kerascool.EMA(DECAY, swap_at_end=True)
    fit(model, [recorder, ema])
    assert_close(weights_of(model), ema_oracle(recorder.weights, DECAY))


@pytest.mark.parametrize("accumulation", ["keras", "kerascool"])
def test_under_gradient_accumulation_the_average_moves_on_real_updates_only(accumulation):
    if accumulation == "keras":
        model, callbacks = compiled(keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)), []
    else:
        model, callbacks = compiled(), [kerascool.GradientAccumulation(steps=2)]
    recorder, ema = Recorder(), kerascool.EMA(DECAY)
    fit(model, [recorder, *callbacks, ema], batch_size=4)  # 16 micro-batches, 8 real updates
    trajectory = recorder.weights
    assert_close(trajectory[1], trajectory[0], atol=0)  # a micro-step does not update
    real = [trajectory[0]] + trajectory[2::2]
    assert_close(averages_of(model, ema), ema_oracle(real, DECAY))
    assert kerascool.real_steps(model) == 8


def test_non_trainable_variables_are_averaged_when_asked():
    def bn_model(name):
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="hidden"),
                                 keras.layers.BatchNormalization(momentum=0.5, name="bn"),
                                 keras.layers.Dense(1, name="out")], name=name)

    model, recorder = compiled(model=bn_model("with_stats")), Recorder()
    ema = kerascool.EMA(DECAY, include_non_trainable=True)
    fit(model, [recorder, ema], validation=True)
    expected = ema_oracle(recorder.weights, DECAY)  # every weight, BatchNorm statistics included
    assert_close(averages_of(model, ema), expected)

    model, recorder = compiled(model=bn_model("without_stats")), Recorder()
    ema = kerascool.EMA(DECAY)
    fit(model, [recorder, ema])
    stats = [i for i, v in enumerate(model.weights) if not v.trainable]
    averaged, raw = averages_of(model, ema), weights_of(model)
    assert stats and all(np.array_equal(averaged[i], raw[i]) for i in stats)  # off: the current statistics


def test_steps_per_execution_gives_the_same_average():
    one, four = tiny_mlp(name="one"), tiny_mlp(name="four")
    four.set_weights(one.get_weights())
    compiled(keras.optimizers.Adam(0.05), one)
    compiled(keras.optimizers.Adam(0.05), four, steps_per_execution=4)
    ema_one, ema_four = kerascool.EMA(DECAY, every=3), kerascool.EMA(DECAY, every=3)
    fit(one, [ema_one])
    fit(four, [ema_four])
    assert_close(averages_of(four, ema_four), averages_of(one, ema_one))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"decay": 1.5}, r"Invalid value for argument `decay`. Expected a value in \(0, 1\). Received: decay=1.5"),
        ({"decay": 1}, "decay=1"),
        ({"decay": 0.0}, "decay=0.0"),
        ({"decay": "0.9"}, "decay='0.9'"),
        ({"every": 0}, r"`every`. Expected an integer >= 1. Received: every=0"),
        ({"every": 2.0}, "every=2.0"),
        ({"start": -1}, r"`start`. Expected an integer >= 0"),
        ({"warmup": "linear"}, "Received: warmup='linear'"),
        ({"warmup_power": 0}, "warmup_power=0"),
        ({"warmup_gamma": -1.0}, "warmup_gamma=-1.0"),
        ({"validation": "average"}, r"Expected one of \('ema', 'raw', 'both'\)"),
    ],
)
def test_misuse_is_refused_before_training(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kerascool.EMA(**kwargs)


def test_misuse_of_flags_and_of_an_untrained_average():
    with pytest.raises(TypeError, match="swap_at_end"):
        kerascool.EMA(swap_at_end="yes")
    with pytest.raises(TypeError, match="include_non_trainable"):
        kerascool.EMA(include_non_trainable=1)
    model = tiny_mlp()  # not compiled: no optimizer to hold averages
    x, _ = regression_data(n=4)
    with pytest.raises(ValueError, match="EMA has no averages yet"):
        model.predict(x, callbacks=[kerascool.EMA()], verbose=0)
    with pytest.raises(ValueError, match="EMA has no averages yet"):
        kerascool.EMA().swapped()


def test_get_config_round_trips():
    ema = kerascool.EMA(0.99, warmup="timm", every=2, start=3, validation="both")
    assert kerascool.EMA(**ema.get_config()).get_config() == ema.get_config()
    assert ema.get_config()["validation"] == "both"


RESUME_SCRIPT = textwrap.dedent('''
    import os, signal, sys
    import numpy as np, keras
    import kerascool

    def train(backup, kill):
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(48, 4)).astype("float32"), rng.normal(size=(48, 1)).astype("float32")
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
        ema = kerascool.EMA(0.8, warmup="timm")

        class Kill(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch
            def on_train_batch_end(self, batch, logs=None):
                if kill and self.epoch == 2 and batch == 3:
                    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, as on a preempted machine

        epochs = []
        log = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: epochs.append(e))
        restore = keras.callbacks.BackupAndRestore(backup)
        model.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0, callbacks=[ema, log, Kill(), restore])
        raw = model.get_weights()
        with ema.swapped():
            averaged = model.get_weights()
        return epochs, kerascool.real_steps(model), raw, averaged

    backup, out, mode = sys.argv[1:]
    if mode == "kill":
        train(backup, kill=True)
    else:
        results = {"resumed": train(backup, kill=False), "straight": train(backup + "_fresh", kill=False)}
        arrays = {}
        for run, (epochs, steps, raw, averaged) in results.items():
            arrays[f"{run}_epochs"], arrays[f"{run}_steps"] = np.array(epochs), np.array(steps)
            arrays.update({f"{run}_raw{i}": w for i, w in enumerate(raw)})
            arrays.update({f"{run}_ema{i}": w for i, w in enumerate(averaged)})
        np.savez(out, **arrays)
''')


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(RESUME_SCRIPT)
    env = dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="3")

    def run(mode):
        return subprocess.run([sys.executable, str(script), str(tmp_path / "backup"), str(tmp_path / "out.npz"), mode],
                              capture_output=True, text=True, timeout=120, env=env)

    killed = run("kill")  # killed in its third epoch, after BackupAndRestore saved the second
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run("resume")  # resumes, then trains once more from scratch without interruption
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    out = np.load(tmp_path / "out.npz")
    assert list(out["resumed_epochs"]) == [2, 3] and list(out["straight_epochs"]) == [0, 1, 2, 3]
    assert int(out["resumed_steps"]) == int(out["straight_steps"]) == 24  # the step counter was restored too
    names = [k[len("straight_"):] for k in out.files if k.startswith(("straight_raw", "straight_ema"))]
    assert len(names) == 8
    for name in names:
        np.testing.assert_allclose(out[f"resumed_{name}"], out[f"straight_{name}"], atol=1e-6, rtol=0, err_msg=name)
    assert not np.allclose(out["straight_raw0"], out["straight_ema0"], atol=1e-4)
