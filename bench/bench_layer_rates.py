"""Layer-wise learning rates: stock `fit` against `fit` on a model decorated with `kerascool.layer_rates`.

    KERAS_BACKEND=jax python bench/bench_layer_rates.py [--quick]

Two models, AdamW: the ~1M-parameter MLP (batch 256, depth groups with
decay 0.8) and a small transformer classifier (2 blocks, d=64, sequence 32,
batch 64, groups embed / block_i / head with decay 0.75). Also the MLP with
a per-step warmup schedule running in the step, and on TF with and without
jit_compile. Prints per-epoch median ratios (feature / stock) of wall time
(`ratio`) and of process CPU time (`cpu_ratio`, steadier on a shared
machine), and the number of traces of the decorated model's step.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from common import data, interleaved, mlp, print_rows  # noqa: E402

import kerascool  # noqa: E402
from kerascool import hook  # noqa: E402


def transformer(vocab=1000, length=32, dim=64, heads=4, blocks=2, classes=10):
    tokens = keras.Input((length,), dtype="int32")
    x = keras.layers.Embedding(vocab, dim, name="embed")(tokens)
    for i in range(blocks):
        h = keras.layers.MultiHeadAttention(heads, dim // heads, name=f"block_{i}_attn")(x, x)
        x = keras.layers.LayerNormalization(name=f"block_{i}_norm1")(x + h)
        h = keras.layers.Dense(2 * dim, activation="relu", name=f"block_{i}_ffn1")(x)
        h = keras.layers.Dense(dim, name=f"block_{i}_ffn2")(h)
        x = keras.layers.LayerNormalization(name=f"block_{i}_norm2")(x + h)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(tokens, keras.layers.Dense(classes, name="head")(x), name="transformer")


def _bench(name, build, decorate, x, y, batch, quick, jit, callbacks=()):
    def make():
        keras.utils.set_random_seed(0)
        model = build()
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="sparse_categorical_crossentropy",
                      jit_compile=jit)
        return model

    stock, decorated = make(), decorate(make())

    def fit(model, **kw):
        model.fit(x, y, batch_size=batch, verbose=0, **kw)

    runs = 2 if quick else 5
    cpu_med = {}
    med = interleaved(
        {"stock": (stock, {}), "layer_rates": (decorated, {"callbacks": list(callbacks)})},
        fit, repeats=runs, epochs=2 if quick else 4, cpu=cpu_med,
    )
    backend = keras.backend.backend()
    return {
        "bench": name,
        "backend": backend + (" jit" if jit and backend == "tensorflow" else ""),
        "stock_s": med["stock"],
        "feature_s": med["layer_rates"],
        "ratio": med["layer_rates"] / med["stock"],
        "cpu_ratio": cpu_med["layer_rates"] / cpu_med["stock"],
        "traces": hook.registry_for(decorated).trace_count,
        "fits": runs,
    }


def main(quick: bool = False) -> list:
    backend = keras.backend.backend()
    rows = []
    n_mlp, n_tok = (512, 256) if quick else (8192, 2048)
    x_mlp, y_mlp = data(n_mlp, 256)
    rng = np.random.default_rng(0)
    x_tok, y_tok = rng.integers(0, 1000, size=(n_tok, 32)).astype("int32"), rng.integers(0, 10, size=(n_tok,))
    jits = [True, False] if backend == "tensorflow" and not quick else [True]
    for jit in jits:
        rows.append(_bench(
            "1M MLP, depth groups, decay 0.8", lambda: mlp(1.0),
            lambda m: kerascool.layer_rates(m, decay=0.8, verbose=False),
            x_mlp, y_mlp, 256, quick, jit,
        ))
        if quick:  # --quick (CI smoke run, < 20 s): the MLP only
            continue
        rows.append(_bench(
            "transformer, embed/block_i/head, decay 0.75", transformer,
            lambda m: kerascool.layer_rates(m, groups=["embed", r"block_(\d+)_.*", "head"], decay=0.75,
                                            verbose=False),
            x_tok, y_tok, 64, quick, jit,
        ))
        rows.append(_bench(
            "1M MLP + per-step warmup schedule", lambda: mlp(1.0),
            lambda m: kerascool.layer_rates(m, decay=0.8, verbose=False),
            x_mlp, y_mlp, 256, quick, jit,
            callbacks=[kerascool.LayerRateScheduler.warmup(100, per="step")],
        ))
    return rows


if __name__ == "__main__":
    print_rows(main(quick="--quick" in sys.argv))
