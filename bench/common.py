"""Shared benchmark harness: interleaved runs of stock `fit` against `fit` with a feature.

Each contender trains its own model in the same process; runs alternate
(stock, feature, stock, feature, ...) so that machine noise hits both alike.
A run is one `fit` of several epochs; the first epoch of each run (tracing,
compilation) is dropped, the rest are per-epoch times. The ratio reported
is median(feature epochs) / median(stock epochs).
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402


class EpochTimer(keras.callbacks.Callback):
    """Per-epoch wall seconds (`times`) and process CPU seconds (`cpu_times`, steadier on a shared machine)."""

    def __init__(self):
        super().__init__()
        self.times, self.cpu_times = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._t = (time.perf_counter(), time.process_time())

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._t[0])
        self.cpu_times.append(time.process_time() - self._t[1])


def mlp(params_million: float = 1.0, inputs: int = 256, width: int = 512):
    """An MLP of about `params_million` million parameters."""
    depth = max(1, int(round((params_million * 1e6 - inputs * width) / (width * width))))
    layers = [keras.Input((inputs,))]
    layers += [keras.layers.Dense(width, activation="relu", name=f"dense_{i}") for i in range(depth + 1)]
    layers += [keras.layers.Dense(10, name="head")]
    return keras.Sequential(layers, name="mlp")


def interleaved(contenders: dict, make_fit, repeats: int = 5, epochs: int = 4, cpu: dict = None) -> dict:
    """contenders: name -> (model, fit_kwargs). Returns name -> median epoch seconds.

    With `cpu` (a dict), also fills it with name -> median epoch CPU seconds.
    """
    samples = {name: [] for name in contenders}
    cpu_samples = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, (model, kwargs) in contenders.items():
            timer = EpochTimer()
            callbacks = list(kwargs.get("callbacks", [])) + [timer]
            make_fit(model, epochs=epochs, **{**kwargs, "callbacks": callbacks})
            samples[name] += timer.times[1:]
            cpu_samples[name] += timer.cpu_times[1:]
    if cpu is not None:
        cpu.update({name: statistics.median(ts) for name, ts in cpu_samples.items()})
    return {name: statistics.median(ts) for name, ts in samples.items()}


def data(n: int, inputs: int, classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, inputs)).astype("float32"), rng.integers(0, classes, size=(n,))


def print_rows(rows: list) -> None:
    if not rows:
        return
    keys = list(rows[0].keys())
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys))
