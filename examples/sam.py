"""Two-gradient steps: SAM and ASAM with Adam, Heun's method with plain gradient descent.

    python examples/sam.py [--quick] [--out DIR]

A small MLP learns a synthetic 4-class problem with 20% of the training labels
flipped, once with stock Adam and once decorated with `kerascool.sam` (and
`adaptive=True`, ASAM), all from the same start. Then Heun's method and plain
gradient descent take the same steps on a least-squares loss, compared with the
exact gradient flow they discretize (Heun is second-order accurate, gradient
descent first-order). Writes the histories into --out.
"""

import argparse
import json
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerascool  # noqa: E402


def classification(rng, n):
    x = rng.normal(size=(n, 16)).astype("float32")
    y = (np.argmax(x[:, :4] + 0.5 * x[:, 4:8] ** 2, axis=1)).astype("int32")
    return x, y


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few epochs on less data (about 10 s)")
    parser.add_argument("--out", default=os.path.join("kerascool_out", "sam"), help="output directory")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    n, epochs = (512, 3) if args.quick else (2048, 15)

    rng = np.random.default_rng(0)
    x, y = classification(rng, n)
    noisy = rng.random(n) < 0.2
    y_train = np.where(noisy, rng.integers(0, 4, size=n), y).astype("int32")
    x_val, y_val = classification(rng, 1024)

    results = {}
    decorators = {
        "stock Adam": lambda m: m,
        "SAM (rho 0.05)": lambda m: kerascool.sam(m, rho=0.05),
        "ASAM (rho 0.5)": lambda m: kerascool.sam(m, rho=0.5, adaptive=True),
    }
    for name, decorate in decorators.items():
        keras.utils.set_random_seed(0)
        model = decorate(keras.Sequential([keras.Input((16,)), keras.layers.Dense(128, activation="relu"),
                                           keras.layers.Dense(128, activation="relu"), keras.layers.Dense(4)]))
        model.compile(optimizer=keras.optimizers.Adam(2e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        history = model.fit(x, y_train, batch_size=64, epochs=epochs, validation_data=(x_val, y_val), verbose=0)
        results[name] = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        h = history.history
        print(f"{name:16s} train loss {h['loss'][0]:.3f} -> {h['loss'][-1]:.3f}   "
              f"val accuracy {h['val_accuracy'][-1]:.3f}   val loss {h['val_loss'][-1]:.3f}")

    # Heun vs gradient descent, same step, against the exact gradient flow dw/dt = -grad L(w)
    # of a least-squares loss (a linear ODE, solved by eigendecomposition).
    xr = (rng.normal(size=(256, 8)) * np.linspace(0.3, 2.0, 8)).astype("float32")
    yr = (xr @ rng.normal(size=(8, 1))).astype("float32")
    lr, steps = 0.1, 10
    a = np.hstack([xr, np.ones((256, 1))]).astype("float64")  # weights then bias
    hessian = 2 / len(a) * a.T @ a
    w_star = np.linalg.lstsq(a, yr.astype("float64"), rcond=None)[0]
    eigenvalues, basis = np.linalg.eigh(hessian)
    for name, decorate in (("gradient descent", lambda m: m), ("Heun", kerascool.heun)):
        keras.utils.set_random_seed(0)
        model = decorate(keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)]))
        model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
        w0 = np.vstack([model.get_weights()[0], model.get_weights()[1][None]]).astype("float64")
        history = model.fit(xr, yr, batch_size=256, epochs=steps, verbose=0)
        flow = w_star + basis @ (np.exp(-eigenvalues * lr * steps)[:, None] * (basis.T @ (w0 - w_star)))
        w = np.vstack([model.get_weights()[0], model.get_weights()[1][None]])
        error = float(np.linalg.norm(w - flow))
        results[name] = {"loss": [float(v) for v in history.history["loss"]], "distance_to_flow": error}
        print(f"{name:16s} after {steps} steps of {lr}: distance to the gradient flow at t={lr * steps:g}: {error:.2e}")

    with open(os.path.join(args.out, "histories.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"outputs in {os.path.abspath(args.out)}")
    return results


if __name__ == "__main__":
    main()
