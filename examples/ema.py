"""EMA of the weights: validate the average next to the raw weights, checkpoint it, save it.

    python examples/ema.py [--quick] [--out DIR]

A small MLP learns a noisy synthetic regression with a deliberately high
Adam learning rate, so the raw weights jitter from step to step. One
`kerascool.EMA` callback (decay 0.98, timm's warmup) averages them inside the
train step; with ``validation="both"`` every epoch reports ``val_loss`` (raw
weights) and ``val_ema_loss`` (the average). A `ModelCheckpoint` made with
``ema.with_averages(...)`` keeps the best average; ``with ema.swapped():``
saves the final average as a `.keras` model. Writes both files and the
history (JSON) into --out.
"""

import argparse
import json
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerascool  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few epochs only (a few seconds)")
    parser.add_argument("--out", default=os.path.join("kerascool_out", "ema"), help="output directory")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    epochs, n = (3, 512) if args.quick else (15, 2048)

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 16)).astype("float32")
    y = (np.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3] + 0.5 * rng.normal(size=(n, 1))).astype("float32")
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(64, activation="relu", name="body"),
                              keras.layers.Dense(1, name="head")])
    model.compile(optimizer=keras.optimizers.Adam(3e-2), loss="mse")

    ema = kerascool.EMA(decay=0.98, warmup="timm", validation="both")
    best = ema.with_averages(keras.callbacks.ModelCheckpoint(
        os.path.join(args.out, "best_ema.weights.h5"), monitor="val_ema_loss", mode="min", save_best_only=True,
        save_weights_only=True))
    history = model.fit(x, y, batch_size=32, epochs=epochs, validation_split=0.25, verbose=0, callbacks=[ema, best])

    print("epoch  val_loss (raw)  val_ema_loss (average)")
    for epoch, (raw, avg) in enumerate(zip(history.history["val_loss"], history.history["val_ema_loss"]), start=1):
        print(f"{epoch:5d}  {raw:14.4f}  {avg:22.4f}")
    with ema.swapped():  # the average in the model just for the save; the raw weights come back
        model.save(os.path.join(args.out, "ema.keras"))
    with open(os.path.join(args.out, "history.json"), "w") as f:
        json.dump(history.history, f, indent=1)
    print(f"\nbest average checkpoint, final average (.keras) and history in {os.path.abspath(args.out)}")
    return history


if __name__ == "__main__":
    main()
