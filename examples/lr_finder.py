"""Find a learning rate, then train with a one-cycle schedule at it.

    python examples/lr_finder.py [--quick] [--out DIR]

1. `kerascool.find_lr` sweeps the rate of a small MLP on a synthetic
   regression task and writes ``lr_finder.png``; the model and its Adam
   state are restored exactly afterwards (checked below).
2. The model trains with `kerascool.OneCycle` peaking at the suggested rate,
   next to the same model at Keras's default constant rate.
3. `kerascool.mc_dropout_predict` gives the spread of the predictions: larger
   far from the training data than on it.
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerascool  # noqa: E402


def task(n, rng, scale=1.0):
    """y = sin(3 x.u) + (x.v)^2 / 2 with x in 8 dimensions."""
    x = rng.normal(scale=scale, size=(n, 8)).astype("float32")
    u, v = np.linspace(-1, 1, 8) / 2.0, np.cos(np.arange(8)) / 3.0
    return x, (np.sin(3 * x @ u) + 0.5 * (x @ v) ** 2)[:, None].astype("float32")


def make_model():
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dropout(0.1),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a fast run (used by the tests)")
    parser.add_argument("--out", default=os.path.join("kerascool_out", "lr_finder"), help="output folder")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    epochs = 2 if args.quick else 20
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = task(1024 if args.quick else 8192, rng)
    xv, yv = task(1024, rng)

    model = make_model()
    model.compile(optimizer=keras.optimizers.Adam(), loss="mse")
    model.optimizer.build(model.trainable_variables)
    before = [np.array(keras.ops.convert_to_numpy(v.value)) for v in model.variables + model.optimizer.variables]
    result = kerascool.find_lr(
        model, (x, y), batch_size=64, start_lr=1e-5, end_lr=10.0,
        num_steps=30 if args.quick else 100, plot=os.path.join(args.out, "lr_finder.png"),
    )
    after = [np.array(keras.ops.convert_to_numpy(v.value)) for v in model.variables + model.optimizer.variables]
    restored = all(a.tobytes() == b.tobytes() for a, b in zip(before, after))
    print(f"swept {len(result.rates)} rates, diverged: {result.diverged}, suggested rate {result.suggested_lr:.2e}")
    print(f"model and optimizer state restored bit for bit: {restored}")
    print(f"plot: {result.plot_path}")

    steps = epochs * int(np.ceil(len(x) / 64))
    schedules = {"constant 1e-3": 1e-3, f"one-cycle to {result.suggested_lr:.1e}": kerascool.OneCycle(result.suggested_lr, steps)}
    for name, rate in schedules.items():
        keras.utils.set_random_seed(1)
        model = make_model()
        model.compile(optimizer=keras.optimizers.Adam(rate), loss="mse")
        history = model.fit(x, y, batch_size=64, epochs=epochs, validation_data=(xv, yv), verbose=0)
        print(f"{name:>24}: val_loss {history.history['val_loss'][-1]:.4f}")

    far, _ = task(512, rng, scale=3.0)
    _, std_near = kerascool.mc_dropout_predict(model, xv, num_samples=20, batch_size=8192)
    _, std_far = kerascool.mc_dropout_predict(model, far, num_samples=20, batch_size=8192)
    print(f"MC dropout spread: {float(std_near.mean()):.4f} on data like the training data, "
          f"{float(std_far.mean()):.4f} far from it")
    print(f"outputs in {os.path.abspath(args.out)}")
    return result


if __name__ == "__main__":
    main()
