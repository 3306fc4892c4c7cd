"""EMA: stock `fit` against `fit` + `kerascool.EMA` and against Keras's built-in `use_ema=True`.

    KERAS_BACKEND=jax python bench/bench_ema.py [--quick]

~1M-parameter MLP, batch 256, AdamW, decay 0.999, no validation (the cost
measured is the in-step average). Three models train interleaved in one
process, as in bench/common.py, but each run on a freshly built model: Keras
3.15's ``use_ema=True`` cannot run a second ``fit`` on JAX (its averages
alias the weights). On TF also without jit_compile. Memory: the extra
optimizer state per trained parameter (1.0 = one extra copy).
"""

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from common import EpochTimer, data, mlp, print_rows  # noqa: E402

import kerascool  # noqa: E402
from kerascool import hook  # noqa: E402


def _size(variables) -> int:
    return int(sum(np.prod(v.shape) for v in variables))


def main(quick: bool = False) -> list:
    backend = keras.backend.backend()
    n, batch = (512, 256) if quick else (8192, 256)
    x, y = data(n, 256)
    rows = []
    for jit in ([True, False] if backend == "tensorflow" and not quick else [True]):
        def build(**optimizer_kwargs):
            keras.utils.set_random_seed(0)
            model = mlp(1.0)
            model.compile(optimizer=keras.optimizers.AdamW(1e-3, **optimizer_kwargs),
                          loss="sparse_categorical_crossentropy", jit_compile=jit)
            return model

        contenders = {
            "stock": lambda: (build(), []),
            "ema": lambda: (build(), [kerascool.EMA(0.999, start=1)]),  # Keras's convention
            "builtin": lambda: (build(use_ema=True, ema_momentum=0.999), []),
        }
        runs = 2 if quick else 5
        samples, last = {name: [] for name in contenders}, {}
        for _ in range(runs):  # interleaved: stock, ema, builtin, stock, ...
            for name, make in contenders.items():
                model, callbacks = make()
                timer = EpochTimer()
                model.fit(x, y, batch_size=batch, epochs=2 if quick else 4, verbose=0, callbacks=callbacks + [timer])
                samples[name] += list(zip(timer.times, timer.cpu_times))[1:]  # the first epoch traces
                last[name] = model
        med = {name: statistics.median(t[0] for t in times) for name, times in samples.items()}
        cpu = {name: statistics.median(t[1] for t in times) for name, times in samples.items()}
        stock, ours, builtin = last["stock"], last["ema"], last["builtin"]
        params = _size(stock.trainable_variables)
        rows.append({
            "bench": "EMA in the step (1M MLP, AdamW)",
            "backend": backend + (" jit" if jit and backend == "tensorflow" else ""),
            "stock_s": med["stock"],
            "feature_s": med["ema"],
            "builtin_s": med["builtin"],
            "ratio": med["ema"] / med["stock"],
            "builtin_ratio": med["builtin"] / med["stock"],
            "vs_builtin": med["ema"] / med["builtin"],
            "cpu_ratio": cpu["ema"] / cpu["stock"],
            "cpu_builtin_ratio": cpu["builtin"] / cpu["stock"],
            "cpu_vs_builtin": cpu["ema"] / cpu["builtin"],
            "extra_copies": (_size(ours.optimizer.variables) - _size(stock.optimizer.variables)) / params,
            "builtin_extra_copies": (_size(builtin.optimizer.variables) - _size(stock.optimizer.variables)) / params,
            "traces_per_fit": hook.registry_for(ours).trace_count,
        })
    return rows


if __name__ == "__main__":
    print_rows(main(quick="--quick" in sys.argv))
