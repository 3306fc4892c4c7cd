"""kerascool demo: stock `model.fit` plus kerascool callbacks.

    python examples/demo.py [--out DIR] [--epochs N]
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerascool  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="kerascool_out", help="output directory (default: ./kerascool_out)")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 16)).astype("float32")
    y = (x[:, :1] * 2 - x[:, 1:2]).astype("float32")
    model = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(32, activation="relu", name="body"), keras.layers.Dense(1, name="head")]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    clip = kerascool.GradientTransform(
        kerascool.SkipNonFinite(), kerascool.ClipByLayerNorm(1.0), log_norms="global"
    )
    history = model.fit(x, y, batch_size=32, epochs=args.epochs, validation_split=0.2, callbacks=[clip], verbose=2)
    print(f"\nfinal val_loss {history.history['val_loss'][-1]:.4f}, "
          f"mean gradient norm in the last epoch {history.history['grad_norm'][-1]:.3f}")
    print(f"outputs in {os.path.abspath(args.out)}")
    return history


if __name__ == "__main__":
    main()
