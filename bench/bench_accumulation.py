"""Gradient accumulation: `GradientAccumulation(4)` against Keras's `gradient_accumulation_steps=4`.

    KERAS_BACKEND=jax python bench/bench_accumulation.py [--quick]

~1M-parameter MLP, micro-batch 64, AdamW, 4 micro-batches per update; also with
TF jit_compile when on TF. The ratio is kerascool / Keras's built-in (target:
<= 1); ``vs_stock`` is kerascool / stock fit without accumulation (same batches).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
from common import data, interleaved, mlp, print_rows  # noqa: E402

import kerascool  # noqa: E402
from kerascool import hook  # noqa: E402

STEPS = 4


def main(quick: bool = False) -> list:
    backend = keras.backend.backend()
    n, batch = (256, 64) if quick else (4096, 64)
    size = 0.1 if quick else 1.0
    x, y = data(n, 256)
    rows = []
    for jit in ([True, False] if backend == "tensorflow" and not quick else [True]):
        def build(**optimizer_kwargs):
            keras.utils.set_random_seed(0)
            model = mlp(size)
            model.compile(optimizer=keras.optimizers.AdamW(1e-3, **optimizer_kwargs),
                          loss="sparse_categorical_crossentropy", jit_compile=jit)
            return model

        stock, builtin, ours = build(), build(gradient_accumulation_steps=STEPS), build()
        accumulate = kerascool.GradientAccumulation(steps=STEPS)

        def fit(model, **kw):
            model.fit(x, y, batch_size=batch, verbose=0, **kw)

        runs = 1 if quick else 5
        med = interleaved(
            {"stock": (stock, {}), "keras": (builtin, {}), "ours": (ours, {"callbacks": [accumulate]})},
            fit, repeats=runs, epochs=2 if quick else 4,
        )
        rows.append({
            "bench": f"accumulation k={STEPS} vs Keras's ({size:g}M MLP, AdamW, micro-batch {batch})",
            "backend": backend + (" jit" if jit and backend == "tensorflow" else ""),
            "keras_s": med["keras"], "ours_s": med["ours"], "ratio": med["ours"] / med["keras"],
            "vs_stock": med["ours"] / med["stock"], "keras_vs_stock": med["keras"] / med["stock"],
            "traces_per_fit": hook.registry_for(ours).trace_count / runs,
        })
    return rows


if __name__ == "__main__":
    print_rows(main(quick="--quick" in sys.argv))
