"""Watch attention maps form while a tiny transformer trains (kerascool.CaptureCallback).

    python examples/capture.py [--quick] [--out DIR] [--epochs N]

Task (synthetic): position 0 holds a query token asking for one content token;
the label says whether that content token occurs in the rest of the sequence.
The classifier reads position 0 only, so attention from it must learn to find
the matching token (averaging the sequence cannot tell), which the captured
maps show epoch after epoch. The model is stock Keras; a custom gated
feed-forward layer marks its gate with `kerascool.capture("gate", ...)`.
Writes, under --out: captures/probe.npz, captures/epoch_XXX.npz,
captures/epoch_XXX/<key>.png, and TensorBoard images in tensorboard/.
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerascool  # noqa: E402

CONTENT, LENGTH = 12, 10  # content tokens 1..12; query tokens 13..24 ask for "content token q"
VOCAB = 2 * CONTENT + 1


def make_data(n, seed):
    rng = np.random.default_rng(seed)
    q = rng.integers(1, CONTENT + 1, size=n)
    # Random content tokens other than q (shift the draws past q).
    x = rng.integers(1, CONTENT, size=(n, LENGTH))
    x = np.where(x >= q[:, None], x + 1, x)
    x[:, 0] = q + CONTENT  # the query
    lengths = rng.integers(LENGTH // 2, LENGTH + 1, size=n)
    y = rng.integers(0, 2, size=n)
    where = np.where(y == 1, rng.integers(1, lengths), -1)  # where q occurs (-1: nowhere)
    x[y == 1, where[y == 1]] = q[y == 1]
    x[np.arange(LENGTH)[None, :] >= lengths[:, None]] = 0  # padding (0) after each sequence's end
    return x.astype("int32"), y.astype("float32"), where


class GatedFeedForward(keras.layers.Layer):
    """x + W2(relu(W1 x) * sigmoid(Wg x)), with the gate marked as a capture point."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.up = keras.layers.Dense(units, activation="relu", name="up")
        self.gate = keras.layers.Dense(units, activation="sigmoid", name="gate")
        self.down = None

    def build(self, input_shape):
        self.up.build(input_shape)
        self.gate.build(input_shape)
        self.down = keras.layers.Dense(input_shape[-1], name="down")
        self.down.build(input_shape[:-1] + (self.up.units,))

    def call(self, x):
        gate = kerascool.capture("gate", self.gate(x))  # free unless a capture is running
        return x + self.down(self.up(x) * gate)


def build_model(dim=32, heads=4):
    tokens = keras.Input((LENGTH,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(VOCAB, dim, mask_zero=True, name="embed")(tokens)  # padding mask
    attended = keras.layers.MultiHeadAttention(heads, dim // heads, name="attention")(x, x)
    x = keras.layers.LayerNormalization(name="norm")(x + attended)
    x = GatedFeedForward(2 * dim, name="ffn")(x)
    x = x[:, 0]  # the query position only: the answer must reach it through attention
    return keras.Model(tokens, keras.layers.Dense(1, activation="sigmoid", name="head")(x), name="tiny_transformer")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("kerascool_out", "capture"), help="output folder")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a few seconds: small data, 2 epochs, no TensorBoard")
    args = parser.parse_args(argv)
    epochs = args.epochs or (2 if args.quick else 12)
    n_train = 256 if args.quick else 2500

    keras.utils.set_random_seed(0)
    x, y, where = make_data(n_train + 256, seed=0)
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="binary_crossentropy", metrics=["accuracy"])
    capture = kerascool.CaptureCallback(
        layers="head",  # a layer output by name (patterns as in kerascool.selection)
        probe=8,  # the first 8 validation samples, the same every epoch
        every=2 if args.quick else 3,  # epochs 3, 6, 9, 12 (quick: epoch 2)
        directory=os.path.join(args.out, "captures"),
        # TensorBoard images need TensorFlow (any backend); --quick leaves them out (importing TF takes time).
        log_dir=None if args.quick else os.path.join(args.out, "tensorboard"),
    )
    model.fit(x[:n_train], y[:n_train], validation_data=(x[n_train:], y[n_train:]), batch_size=64,
              epochs=epochs, verbose=2, callbacks=[capture])

    # The in-memory view: attention from the query (position 0) onto the matching token.
    where_probe = where[n_train:n_train + 8]
    hits = np.flatnonzero(where_probe > 0)  # probe samples where the token occurs
    length = (x[n_train:n_train + 8] != 0).sum(1)[hits]
    print("\nattention from the query onto the matching token (mean over heads and probe samples):")
    for epoch, values in capture.captures.items():
        scores = values["attention/attention_scores"]  # (probe, heads, queries, keys)
        onto = scores[hits, :, 0, where_probe[hits]]  # (hits, heads)
        print(f"  epoch {epoch:3d}: {onto.mean():.3f}   (uniform: {np.mean(1 / length):.3f})")
    print("captured keys:", ", ".join(f"{k} {v.shape}" for k, v in capture.latest.items()))

    # On demand, on any inputs (the probe's shape reuses the compiled pass; another shape compiles one more):
    now = capture.capture_now(x[:8])
    print("capture_now on 8 training samples:", {k: v.shape for k, v in now.items()})
    print(f"files in {os.path.abspath(os.path.join(args.out, 'captures'))}")
    return capture


if __name__ == "__main__":
    main()
