"""Lookahead while training, SWA over the last epochs, then BatchNorm statistics recomputed for the average.

    python examples/swa_lookahead.py [--quick] [--out DIR]

A small MLP with BatchNormalization learns a noisy synthetic regression with
SGD + momentum at a high learning rate, wrapped in `kerascool.Lookahead`
(k=5, alpha=0.5). `kerascool.SWA` averages the weights at the end of each
epoch of the last third of training; validation reports the raw weights and,
from the first averaged epoch on, the average (``val_swa_loss``). At the end the average goes into the model with
`kerascool.update_bn` run for it; the script compares the test loss of the
raw weights, of the average with the old statistics, and of the average with
recomputed ones, and saves the final model into --out.
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
    parser.add_argument("--quick", action="store_true", help="a few epochs only (a few seconds)")
    parser.add_argument("--out", default=os.path.join("kerascool_out", "swa_lookahead"), help="output directory")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    epochs, n = (3, 512) if args.quick else (15, 2048)

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)

    def task(size):
        x = rng.normal(size=(size, 16)).astype("float32")
        y = (np.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3] + 0.5 * rng.normal(size=(size, 1))).astype("float32")
        return x, y

    (x, y), (x_test, y_test) = task(n), task(1024)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(64, name="body"),
                              keras.layers.BatchNormalization(name="norm"), keras.layers.ReLU(),
                              keras.layers.Dense(1, name="head")])
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")

    swa = kerascool.SWA(start=2 * epochs // 3, validation="both")
    history = model.fit(x, y, batch_size=32, epochs=epochs, validation_split=0.25, verbose=0,
                        callbacks=[kerascool.Lookahead(k=5, alpha=0.5), swa])
    print("epoch  val_loss (raw)  val_swa_loss (average)")
    averaged = history.history.get("val_swa_loss", [])  # only from the first averaged epoch on
    first = epochs - len(averaged)
    for epoch, raw in enumerate(history.history["val_loss"]):
        average = f"{averaged[epoch - first]:22.4f}" if epoch >= first else f"{'-':>22}"
        print(f"{epoch + 1:5d}  {raw:14.4f}  {average}")
    print(f"(the average holds {swa.averaged_count()} epochs' weights)\n")

    raw = model.evaluate(x_test, y_test, verbose=0)
    with swa.swapped():
        stale = model.evaluate(x_test, y_test, verbose=0)  # average weights, statistics of the raw ones
        kerascool.update_bn(model, x, batch_size=32)
        fresh = model.evaluate(x_test, y_test, verbose=0)
        model.save(os.path.join(args.out, "swa.keras"))
    # Leaving the block put back the raw weights and their BatchNorm statistics.
    print(f"test loss: raw weights {raw:.4f}, SWA with old BatchNorm statistics {stale:.4f}, "
          f"SWA after update_bn {fresh:.4f}")
    print(f"SWA model in {os.path.abspath(args.out)}")
    return raw, stale, fresh


if __name__ == "__main__":
    main()
