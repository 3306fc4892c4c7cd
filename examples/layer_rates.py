"""Layer-wise learning rates: fine-tune a pretrained body with discriminative rates and gradual unfreezing.

    python examples/layer_rates.py [--quick] [--out DIR]

A small MLP body is pretrained on a synthetic task; a new head is put on it
and the model is fine-tuned on a related task twice from the same start:
stock (every layer at the optimizer's rate) and decorated with
`kerascool.layer_rates` (layer-wise decay 0.5) plus ULMFiT's gradual
unfreezing (`kerascool.LayerRateScheduler.gradual_unfreezing`). Writes the
table of multipliers and both histories into --out.
"""

import argparse
import json
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerascool  # noqa: E402
from kerascool._core import installation_of as registry_for  # noqa: E402


def body():
    return [keras.layers.Dense(32, activation="relu", name=f"block_{i}") for i in range(3)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few epochs only (about 10 s)")
    parser.add_argument("--out", default=os.path.join("kerascool_out", "layer_rates"), help="output directory")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    epochs = 4 if args.quick else 12

    # Pretraining task: 8 features tanh(x @ shared). Fine-tuning task: a new noisy
    # readout of the same features from only 96 examples, so the body is worth keeping.
    rng = np.random.default_rng(0)
    shared = rng.normal(size=(16, 8)) / 2
    x_pre = rng.normal(size=(256 if args.quick else 2048, 16)).astype("float32")
    y_pre = np.tanh(x_pre @ shared).astype("float32")
    x = rng.normal(size=(96, 16)).astype("float32")
    y = (np.tanh(x @ shared) @ rng.normal(size=(8, 1)) + 0.3 * rng.normal(size=(96, 1))).astype("float32")

    keras.utils.set_random_seed(0)
    layers = body()
    pretrain = keras.Sequential([keras.Input((16,))] + layers + [keras.layers.Dense(8, name="old_head")])
    pretrain.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    pretrain.fit(x_pre, y_pre, batch_size=64, epochs=2 if args.quick else epochs, verbose=0)
    pretrained = [layer.get_weights() for layer in layers]

    results = {}
    for name in ("stock", "layer_rates"):
        keras.utils.set_random_seed(1)
        layers = body()
        model = keras.Sequential([keras.Input((16,))] + layers + [keras.layers.Dense(1, name="head")], name=name)
        for layer, w in zip(layers, pretrained):
            layer.set_weights(w)
        callbacks = []
        if name == "layer_rates":
            kerascool.layer_rates(model, decay=0.5)  # prints the table: head 1, block_2 0.5, ...
            callbacks = [kerascool.LayerRateScheduler.gradual_unfreezing(every=1, log=True)]
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
        history = model.fit(x, y, batch_size=16, epochs=epochs, validation_split=0.33, verbose=0, callbacks=callbacks)
        results[name] = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        print(f"{name:12s} final val_loss {history.history['val_loss'][-1]:.4f}")
        if name == "layer_rates":
            with open(os.path.join(args.out, "layer_rates.txt"), "w") as f:
                f.write(kerascool.layer_rate_table(model) + "\n")
            trace_count = registry_for(model).trace_count
            print("multipliers per epoch:",
                  {k.split("/", 1)[1]: v for k, v in results[name].items() if k.startswith("layer_rate/")})

    with open(os.path.join(args.out, "histories.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"outputs in {os.path.abspath(args.out)}")
    return {
        "val_loss": {k: r["val_loss"][-1] for k, r in results.items()},
        "trace_count": trace_count,
    }


if __name__ == "__main__":
    main()
