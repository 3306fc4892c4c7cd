"""Gradient transforms: skip corrupt batches, clip chosen layers, watch per-layer gradient norms.

    python examples/gradient_transforms.py [--quick] [--out DIR]

scikit-learn's digits (8x8 images of handwritten digits, shipped inside the
package) with a few corrupt training rows holding NaN, as a broken sensor or
a bad parse leaves them. Each batch that contains one gives NaN gradients.
The same MLP is trained twice from the same start with a stock Adam:

- stock `fit`: the first NaN gradient poisons every weight, and the model
  stays at chance for the rest of training;
- with one `kerascool.GradientTransform` callback: `SkipNonFinite` drops those
  steps (weights and Adam's moments untouched; ``skipped_steps`` counts them),
  `ClipByLayerNorm` clips each hidden layer to norm 1 (``kerascool.masked``
  chooses them by name), `AdaptiveClip` (NFNets) bounds the head's update
  relative to its weights, and ``log_norms="layer"`` adds the incoming
  gradient norm of every layer to the logs.

The corrupt rows make the epoch-mean training loss NaN in both runs (their
loss is NaN); the validation data is clean and tells the runs apart. Writes
both histories (JSON) and, with matplotlib, a plot of the per-layer gradient
norms into --out.
"""

import argparse
import json
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerascool  # noqa: E402

try:
    from sklearn.datasets import load_digits  # the data ships inside the package: nothing is downloaded
except ImportError:
    raise SystemExit("gradient_transforms.py reads scikit-learn's digits: pip install scikit-learn") from None


def digits_with_corrupt_rows(n_corrupt: int, seed: int = 0):
    """Digits scaled to [0, 1], shuffled, split 80/20; `n_corrupt` training rows get a NaN pixel."""
    data = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.target))
    x = (data.data[order] / 16.0).astype("float32")
    y = data.target[order].astype("int32")
    n_train = int(0.8 * len(y))
    x_train, y_train = x[:n_train].copy(), y[:n_train]
    bad = rng.choice(n_train, size=n_corrupt, replace=False)
    x_train[bad, rng.integers(0, x.shape[1], size=n_corrupt)] = np.nan
    return (x_train, y_train), (x[n_train:], y[n_train:])


def build_model():
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu", name="hidden_1"),
            keras.layers.Dense(64, activation="relu", name="hidden_2"),
            keras.layers.Dense(10, name="head"),
        ],
        name="digits_mlp",
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few epochs only (a few seconds)")
    parser.add_argument("--out", default=os.path.join("kerascool_out", "gradient_transforms"), help="output directory")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    epochs = 3 if args.quick else 12

    (x, y), (x_val, y_val) = digits_with_corrupt_rows(n_corrupt=4)
    histories = {}
    for run in ("stock", "kerascool"):
        keras.utils.set_random_seed(0)  # same initial weights and batch order in both runs
        model = build_model()
        model.compile(
            optimizer=keras.optimizers.Adam(3e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        callbacks = []
        if run == "kerascool":
            callbacks = [
                kerascool.GradientTransform(
                    kerascool.SkipNonFinite(),  # first, so that the others only see finite gradients
                    kerascool.masked(kerascool.ClipByLayerNorm(1.0), "hidden_.*"),
                    kerascool.masked(kerascool.AdaptiveClip(0.05), "head"),
                    log_norms="layer",
                )
            ]
        history = model.fit(x, y, batch_size=32, epochs=epochs, validation_data=(x_val, y_val), verbose=0,
                            callbacks=callbacks)
        histories[run] = {k: [float(v) for v in vals] for k, vals in history.history.items()}

    print("epoch  stock val_accuracy  kerascool val_accuracy  skipped steps (cumulative)")
    kc = histories["kerascool"]
    for epoch in range(epochs):
        print(f"{epoch + 1:5d}  {histories['stock']['val_accuracy'][epoch]:18.3f}  "
              f"{kc['val_accuracy'][epoch]:22.3f}  {int(kc['skipped_steps'][epoch]):26d}")
    layers = sorted(k for k in kc if k.startswith("grad_norm/"))
    print("\nincoming gradient norm per layer (epoch mean over the applied steps, before clipping):")
    for key in layers:
        print(f"  {key[len('grad_norm/'):]:20s} " + " ".join(f"{v:7.3f}" for v in kc[key]))

    with open(os.path.join(args.out, "histories.json"), "w") as f:
        json.dump(histories, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot)")
    else:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for key in layers:
            ax.plot(range(1, epochs + 1), kc[key], marker="o", label=key[len("grad_norm/"):])
        ax.axhline(1.0, color="gray", linestyle=":", label="hidden clip norm")
        ax.set(xlabel="epoch", ylabel="gradient norm (epoch mean)", yscale="log", title="per-layer gradient norms")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "grad_norms.png"), dpi=100)
        plt.close(fig)
    print(f"\nhistories and plot in {os.path.abspath(args.out)}")
    return {
        "stock_val_accuracy": histories["stock"]["val_accuracy"][-1],
        "val_accuracy": kc["val_accuracy"][-1],
        "skipped_steps": int(kc["skipped_steps"][-1]),
    }


if __name__ == "__main__":
    main()
