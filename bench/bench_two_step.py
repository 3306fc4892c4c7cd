"""Two-gradient steps: stock `fit` against `kerascool.sam(model)` and `kerascool.heun(model)`.

    KERAS_BACKEND=jax python bench/bench_two_step.py [--quick]

~1M-parameter MLP, batch 256, SGD with momentum for all (Heun's trial step is
plain gradient descent). Expected ratio about 2: two forward and backward
passes per step.
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
    n, batch = (256, 64) if quick else (8192, 256)
    x, y = data(n, 256)
    size = 0.1 if quick else 1.0

    def build(decorate=lambda m: m):
        keras.utils.set_random_seed(0)
        model = decorate(mlp(size))
        model.compile(optimizer=keras.optimizers.SGD(1e-2, momentum=0.9), loss="sparse_categorical_crossentropy")
        return model

    contenders = {
        "stock": build(),
        "sam": build(lambda m: kerascool.sam(m, rho=0.05)),
        "heun": build(kerascool.heun),
    }
    if not quick:
        contenders["asam"] = build(lambda m: kerascool.sam(m, rho=0.5, adaptive=True))

    def fit(model, **kw):
        model.fit(x, y, batch_size=batch, verbose=0, **kw)

    med = interleaved({k: (m, {}) for k, m in contenders.items()}, fit,
                      repeats=1 if quick else 5, epochs=2 if quick else 4)
    return [
        {
            "bench": f"{name} step vs stock ({size:g}M MLP, SGD momentum, batch {batch})",
            "backend": backend, "stock_s": med["stock"], "feature_s": med[name],
            "ratio": med[name] / med["stock"],
            # Traced once per model: the step is not re-traced per fit or per batch.
            "traces": hook.registry_for(contenders[name]).trace_count,
        }
        for name in contenders if name != "stock"
    ]


if __name__ == "__main__":
    print_rows(main(quick="--quick" in sys.argv))
