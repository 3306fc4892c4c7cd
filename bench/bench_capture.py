"""Validation time: stock `fit` against `fit` + `CaptureCallback` (one probe batch per epoch).

    KERAS_BACKEND=jax python bench/bench_capture.py [--quick]

A small transformer classifier (token embedding + 2 self-attention blocks).
`ratio`: per epoch, (validation + the capture's own time, run right after
validation) / validation, timed in the same epoch (robust on a shared, loaded
machine). `ratio_across_runs`: validation-to-epoch-end time against
interleaved stock runs (noisier). The first epoch of every run (tracing) is
dropped; ratios are medians. Rows: capture kept in memory; plus `.npz`
files; plus PNG heatmaps (matplotlib drawing, reported apart).
"""

import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerascool  # noqa: E402


class ValidationTimer(keras.callbacks.Callback):
    """Per epoch: validation seconds, and seconds to the end of the epoch's callbacks (listed last)."""

    def __init__(self):
        super().__init__()
        self.validation, self.through_epoch_end = [], []

    def on_test_begin(self, logs=None):
        self._t = time.perf_counter()

    def on_test_end(self, logs=None):
        self.validation.append(time.perf_counter() - self._t)

    def on_epoch_end(self, epoch, logs=None):
        self.through_epoch_end.append(time.perf_counter() - self._t)


class TimedCapture(kerascool.CaptureCallback):
    """The capture's own seconds per epoch (probe pass, copies, files)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seconds = []

    def on_epoch_end(self, epoch, logs=None):
        start = time.perf_counter()
        super().on_epoch_end(epoch, logs)
        self.seconds.append(time.perf_counter() - start)


def transformer(vocab=1000, length=32, dim=64, heads=4, blocks=2):
    tokens = keras.Input((length,), dtype="int32")
    x = keras.layers.Embedding(vocab, dim, mask_zero=True, name="embed")(tokens)
    for i in range(blocks):
        attended = keras.layers.MultiHeadAttention(heads, dim // heads, name=f"mha_{i}")(x, x)
        x = keras.layers.LayerNormalization(name=f"norm_{i}")(x + attended)
        x = x + keras.layers.Dense(dim, activation="relu", name=f"ffn_{i}")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(tokens, keras.layers.Dense(2, name="head")(x), name="transformer")


def main(quick: bool = False) -> list:
    backend = keras.backend.backend()
    n_train, n_val, batch = (64, 256, 64) if quick else (256, 2048, 64)
    repeats, epochs = (1, 3) if quick else (3, 5)
    blocks = 1 if quick else 2
    rng = np.random.default_rng(0)
    x = rng.integers(1, 1000, size=(n_train + n_val, 32)).astype("int32")
    y = rng.integers(0, 2, size=(n_train + n_val,))
    out = tempfile.mkdtemp(prefix="bench_capture_")
    modes = {"stock": None, "memory": {}}
    if not quick:
        modes["npz"] = {"directory": "npz", "plots": False}
        modes["npz+png"] = {"directory": "png", "plots": True}
    models, traces = {}, {}
    samples = {name: [] for name in modes}  # validation (+ capture) seconds, epochs of every run
    in_run = {name: [] for name in modes}  # (validation + capture) / validation, same epoch
    for name in modes:
        keras.utils.set_random_seed(0)
        models[name] = transformer(blocks=blocks)
        models[name].compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    try:
        for _ in range(repeats):
            for name, options in modes.items():
                timer = ValidationTimer()
                callbacks = [timer]
                if options is not None:
                    if "directory" in options:
                        options = {**options, "directory": os.path.join(out, options["directory"])}
                    capture = TimedCapture(layers="head", probe=8, **options)
                    callbacks.insert(0, capture)
                models[name].fit(x[:n_train], y[:n_train], validation_data=(x[n_train:], y[n_train:]),
                                 batch_size=batch, epochs=epochs, verbose=0, callbacks=callbacks)
                samples[name] += timer.through_epoch_end[1:]  # epoch 1 traces: dropped
                if options is not None:
                    in_run[name] += [(v + c) / v for v, c in zip(timer.validation[1:], capture.seconds[1:])]
                    traces[name] = capture.trace_count
    finally:
        shutil.rmtree(out, ignore_errors=True)
    stock = statistics.median(samples["stock"])
    rows = []
    for name in modes:
        if name == "stock":
            continue
        median = statistics.median(samples[name])
        rows.append({
            "bench": f"validation + capture ({name}; {blocks} MHA + head, probe 8, val {n_val})",
            "backend": backend, "stock_s": stock, "feature_s": median,
            # Same epoch: (validation + the capture's own time) / validation; immune to load
            # changes between runs on a shared machine.
            "ratio": statistics.median(in_run[name]),
            "ratio_across_runs": median / stock,
            "traces_per_fit": traces[name],
        })
    return rows


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import print_rows

    print_rows(main(quick="--quick" in sys.argv))
