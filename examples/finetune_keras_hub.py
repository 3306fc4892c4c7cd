"""Fine-tune a keras-hub BERT with layer-wise rate decay, gradual unfreezing, EMA and attention capture.

    python examples/finetune_keras_hub.py [--quick] [--out DIR]

Needs keras-hub (``pip install keras-hub``). The backbone is a small
BERT-style `keras_hub.models.BertBackbone` built offline from a config with
random weights, so nothing is downloaded; with a real checkpoint the same
lines start from ``keras_hub.models.BertBackbone.from_preset(...)`` instead.
A new classification head reads its pooled [CLS] output.

Task (synthetic): ``[CLS] tokens... [SEP]`` of random lengths; the label says
whether the marker token occurs. The classifier reads the [CLS] position, so
attention from [CLS] has to find the marker, which the captured maps show.

kerascool on top of the stock `fit` and AdamW:

- `kerascool.layer_rates`: one group for the embeddings, one per transformer
  block (``r"transformer_layer_(\\d+)"``), then the pooler and the new head;
  layer-wise decay 0.7 from the head down;
- `kerascool.LayerRateScheduler.gradual_unfreezing`: the head trains alone
  first, one more group joins each epoch (ULMFiT);
- `kerascool.EMA` validated next to the raw weights (``val_ema_accuracy``);
- `kerascool.CaptureCallback`: the attention maps of every block on a fixed
  probe set, as ``.npz`` and heatmaps under ``--out/captures``.
"""

import argparse
import importlib.util
import json
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerascool  # noqa: E402

PAD, CLS, SEP, MARKER = 0, 1, 2, 3  # content tokens are 4 .. VOCAB - 1
VOCAB, LENGTH = 32, 16


def make_data(n: int, seed: int):
    """BERT inputs (dict) and labels; `where` is the marker's position (-1: absent)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, LENGTH + 1, size=n)  # [CLS] + content + [SEP]
    tokens = rng.integers(MARKER + 1, VOCAB, size=(n, LENGTH))
    y = rng.integers(0, 2, size=n)
    where = np.where(y == 1, rng.integers(1, lengths - 1), -1)
    tokens[y == 1, where[y == 1]] = MARKER
    tokens[:, 0] = CLS
    tokens[np.arange(n), lengths - 1] = SEP
    padding = np.arange(LENGTH)[None, :] >= lengths[:, None]
    tokens[padding] = PAD
    x = {
        "token_ids": tokens.astype("int32"),
        "segment_ids": np.zeros((n, LENGTH), "int32"),
        "padding_mask": (~padding).astype("int32"),
    }
    return x, y.astype("int32"), where


def build_classifier(keras_hub, num_layers: int):
    """A BERT backbone with a new classification head on its pooled [CLS] output."""
    # In real use: backbone = keras_hub.models.BertBackbone.from_preset("bert_tiny_en_uncased")
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB, num_layers=num_layers, num_heads=2, hidden_dim=32, intermediate_dim=64,
        max_sequence_length=LENGTH,
    )
    pooled = backbone.output["pooled_output"]
    logits = keras.layers.Dense(2, name="logits")(keras.layers.Dropout(0.1, name="head_dropout")(pooled))
    return keras.Model(backbone.input, logits, name="bert_classifier")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 blocks, 2 epochs, little data (for tests)")
    parser.add_argument("--out", default=os.path.join("kerascool_out", "finetune_keras_hub"), help="output directory")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("keras_hub") is None:
        print("finetune_keras_hub.py needs keras-hub, which is not installed: pip install keras-hub. Skipped.")
        return None
    import keras_hub

    os.makedirs(args.out, exist_ok=True)
    num_layers, epochs, n_train = (2, 2, 256) if args.quick else (4, 7, 2048)
    # One group per model part, bottom first: the embeddings, the blocks, the pooler, the new head.
    groups = [".*embedding.*", r"transformer_layer_(\d+)", "pooled_dense", "logits"]

    keras.utils.set_random_seed(0)
    x, y, where = make_data(n_train + 256, seed=0)
    x_train, x_val = ({k: v[part] for k, v in x.items()} for part in (slice(0, n_train), slice(n_train, None)))
    y_train, y_val, where_val = y[:n_train], y[n_train:], where[n_train:]
    model = build_classifier(keras_hub, num_layers)
    kerascool.layer_rates(model, groups=groups, decay=0.7, verbose=False)
    rates = kerascool.current_layer_rates(model)
    print("layer-rate multipliers, bottom group first:", {k: round(v, 3) for k, v in rates.items()})
    model.compile(
        optimizer=keras.optimizers.AdamW(2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    ema = kerascool.EMA(decay=0.98, warmup="timm", validation="both")
    unfreeze = kerascool.LayerRateScheduler.gradual_unfreezing(every=1, log=True)
    # A fixed probe set: 4 validation sequences with the marker (the heatmaps draw the first), 4 without.
    chosen = np.concatenate([np.flatnonzero(y_val == 1)[:4], np.flatnonzero(y_val == 0)[:4]])
    probe = {k: v[chosen] for k, v in x_val.items()}
    capture = kerascool.CaptureCallback(
        attention=True,  # every MultiHeadAttention layer inside the backbone
        probe=probe,
        every=epochs if args.quick else 2,
        directory=os.path.join(args.out, "captures"),
    )
    history = model.fit(x_train, y_train, validation_data=(x_val, y_val), batch_size=32,
                        epochs=epochs, verbose=2, callbacks=[unfreeze, ema, capture])

    logs = history.history
    print("\nepoch  val_accuracy (raw)  val_ema_accuracy  groups training")
    for epoch in range(epochs):
        training = sum(v[epoch] > 0 for k, v in logs.items() if k.startswith("layer_rate/"))
        print(f"{epoch + 1:5d}  {logs['val_accuracy'][epoch]:18.3f}  {logs['val_ema_accuracy'][epoch]:16.3f}"
              f"  {training}/{len(rates)}")

    # Attention from [CLS] (query position 0) onto the marker, in the last block, mean over heads.
    key = f"transformer_layer_{num_layers - 1}/self_attention_layer/attention_scores"
    probe_where = where_val[chosen]
    hits = np.flatnonzero(probe_where > 0)
    lengths = probe["padding_mask"].sum(1)
    print(f"\nattention from [CLS] onto the marker ({key}; uniform: {np.mean(1 / lengths[hits]):.3f}):")
    for epoch, values in capture.captures.items():
        print(f"  epoch {epoch:3d}: {values[key][hits, :, 0, probe_where[hits]].mean():.3f}")

    with open(os.path.join(args.out, "layer_rates.txt"), "w") as f:
        f.write(kerascool.layer_rate_table(model) + "\n")
    with open(os.path.join(args.out, "history.json"), "w") as f:
        json.dump({k: [float(v) for v in vals] for k, vals in logs.items()}, f, indent=1)
    print(f"\ncaptures (npz, png), layer-rate table and history in {os.path.abspath(args.out)}")
    return {"val_accuracy": logs["val_accuracy"][-1], "val_ema_accuracy": logs["val_ema_accuracy"][-1]}


if __name__ == "__main__":
    main()
