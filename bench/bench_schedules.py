"""Schedules and annealing: stock `fit` at a constant rate against `fit` with them.

    KERAS_BACKEND=jax python bench/bench_schedules.py [--quick]

~1M-parameter MLP, batch 256, AdamW. Contenders, interleaved in one process:
a constant rate (stock), `OneCycle` as the optimizer's rate, and a constant
rate plus `AnnealVariable` setting a loss weight per step (the weight of an
L2 penalty on the logits, read by the loss; every model has that variable in
its loss, only one anneals it). Ratios are median epoch times against stock;
``traces_per_fit`` counts the traces of the hooked step.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
from common import data, interleaved, mlp, print_rows  # noqa: E402
from keras import ops  # noqa: E402

import kerascool  # noqa: E402
from kerascool import _core  # noqa: E402


def main(quick: bool = False) -> list:
    backend = keras.backend.backend()
    n, batch = (1024, 256) if quick else (8192, 256)
    epochs, repeats = (3, 2) if quick else (4, 5)
    x, y = data(n, 256)
    steps = epochs * repeats * (n // batch)
    xent = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def build(rate):
        keras.utils.set_random_seed(0)
        model = mlp(1.0)
        model.penalty_weight = keras.Variable(0.0, trainable=False, name="penalty_weight")
        loss = lambda t, p: xent(t, p) + model.penalty_weight * ops.mean(p * p)  # noqa: E731
        model.compile(optimizer=keras.optimizers.AdamW(rate), loss=loss)
        return model

    stock = build(1e-3)
    one_cycle = build(kerascool.OneCycle(1e-3, steps))
    annealed = build(1e-3)
    anneal = kerascool.AnnealVariable(annealed.penalty_weight, kerascool.PiecewiseLinear({steps: 1e-3}))

    def fit(model, **kw):
        model.fit(x, y, batch_size=batch, verbose=0, **kw)

    med = interleaved(
        {"stock": (stock, {}), "one_cycle": (one_cycle, {}), "anneal": (annealed, {"callbacks": [anneal]})},
        fit, repeats=repeats, epochs=epochs,
    )
    return [
        {"bench": "OneCycle rate (1M MLP, AdamW)", "backend": backend, "stock_s": med["stock"],
         "feature_s": med["one_cycle"], "ratio": med["one_cycle"] / med["stock"], "traces_per_fit": "n/a (no hook)"},
        {"bench": "AnnealVariable per step (loss weight)", "backend": backend, "stock_s": med["stock"],
         "feature_s": med["anneal"], "ratio": med["anneal"] / med["stock"],
         "traces_per_fit": _core.installation_of(annealed).trace_count / repeats},
    ]


if __name__ == "__main__":
    print_rows(main(quick="--quick" in sys.argv))
