"""Per-layer gradient clipping: stock `fit` against `fit` + `GradientTransform(ClipByLayerNorm)`.

    KERAS_BACKEND=jax python bench/bench_gradient_transform.py [--quick]

~1M-parameter MLP, batch 256, AdamW; also with TF jit_compile when on TF.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
from common import data, interleaved, mlp, print_rows  # noqa: E402

import kerascool  # noqa: E402
from kerascool import hook  # noqa: E402


def main(quick: bool = False) -> list:
    backend = keras.backend.backend()
    n, batch = (2048, 256) if quick else (8192, 256)
    x, y = data(n, 256)
    rows = []
    for jit in ([True, False] if backend == "tensorflow" and not quick else [True]):
        def build():
            keras.utils.set_random_seed(0)
            model = mlp(1.0)
            model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="sparse_categorical_crossentropy",
                          jit_compile=jit)
            return model

        stock, clipped = build(), build()
        clip = kerascool.GradientTransform(kerascool.ClipByLayerNorm(1.0))

        def fit(model, **kw):
            model.fit(x, y, batch_size=batch, verbose=0, **kw)

        med = interleaved(
            {"stock": (stock, {}), "clip": (clipped, {"callbacks": [clip]})},
            fit, repeats=2 if quick else 5, epochs=3 if quick else 4,
        )
        runs = 2 if quick else 5
        rows.append({
            "bench": "per-layer clip (1M MLP, AdamW)", "backend": backend + (" jit" if jit and backend == "tensorflow" else ""),
            "stock_s": med["stock"], "feature_s": med["clip"], "ratio": med["clip"] / med["stock"],
            "traces_per_fit": hook.registry_for(clipped).trace_count / runs,
        })
    return rows


if __name__ == "__main__":
    print_rows(main(quick="--quick" in sys.argv))
