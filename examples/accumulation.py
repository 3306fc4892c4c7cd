"""Gradient accumulation: the big-batch run on the activation memory of a small batch.

    python examples/accumulation.py [--quick] [--out DIR]

The same model (no BatchNorm) is trained twice from the same start with Adam
and a learning-rate schedule: once with batches of 256, once with micro-batches
of 32 and `kerascool.GradientAccumulation(steps=8)`. Both end with the same
weights (to float32 rounding): the schedule and Adam's bias correction count
real updates, not micro-batches. Writes both histories into --out.
"""

import argparse
import json
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerascool  # noqa: E402

BIG, MICRO = 256, 32


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few epochs on less data (about 10 s)")
    parser.add_argument("--out", default=os.path.join("kerascool_out", "accumulation"), help="output directory")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    n, epochs = (1024, 2) if args.quick else (4096, 6)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 20)).astype("float32")
    y = (np.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3] + 0.1 * rng.normal(size=(n, 1))).astype("float32")

    results, weights = {}, {}
    for name in ("big batch", "accumulated"):
        keras.utils.set_random_seed(0)  # same initial weights for both
        model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(64, activation="gelu"),
                                  keras.layers.Dense(64, activation="gelu"), keras.layers.Dense(1)])
        schedule = keras.optimizers.schedules.CosineDecay(3e-3, decay_steps=epochs * n // BIG)
        model.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse")
        if name == "big batch":
            history = model.fit(x, y, batch_size=BIG, epochs=epochs, shuffle=False, verbose=0)
        else:
            history = model.fit(x, y, batch_size=MICRO, epochs=epochs, shuffle=False, verbose=0,
                                callbacks=[kerascool.GradientAccumulation(steps=BIG // MICRO)])
        results[name] = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        weights[name] = model.get_weights()
        print(f"{name:12s} optimizer updates {int(model.optimizer.iterations):4d}   "
              f"final training loss {history.history['loss'][-1]:.4f}")

    diff = max(float(np.abs(a - b).max()) for a, b in zip(weights["big batch"], weights["accumulated"]))
    print(f"largest weight difference between the two runs: {diff:.2e}")
    with open(os.path.join(args.out, "histories.json"), "w") as f:
        json.dump({"histories": results, "max_weight_difference": diff}, f, indent=1)
    print(f"outputs in {os.path.abspath(args.out)}")
    return diff


if __name__ == "__main__":
    main()
