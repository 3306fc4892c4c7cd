"""The kinds of model users write, as twins that start from the same weights.

Every layer has a seeded initializer, so two instances of any kind hold the
same values once built, without `set_weights` (a seeded Keras initializer
returns the same values on every call). Weights are compared BY LAYER NAME
(``d0``, ``d1``), since the kinds order their variables differently.

Kinds:
- ``functional``: built at construction (`keras.Input`), the reference;
- ``sequential``: `keras.Sequential` without `keras.Input`, built by `fit`;
- ``subclassed``: a `keras.Model` subclass, built by `fit`;
- ``reordered``: a subclass whose ``__init__`` creates ``d1`` before ``d0``
  while ``call`` runs ``d0`` first (its variables come in a different order).
"""

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()

KINDS = ("functional", "sequential", "subclassed", "reordered")
UNBUILT = KINDS[1:]
INPUTS, HIDDEN, OUTPUTS = 3, 4, 2


def _dense(units, seed, name, activation=None):
    return keras.layers.Dense(
        units,
        activation=activation,
        name=name,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
        bias_initializer=keras.initializers.RandomNormal(stddev=0.1, seed=100 + seed),
    )


class Net(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.d0 = _dense(HIDDEN, 0, "d0", "tanh")
        self.d1 = _dense(OUTPUTS, 1, "d1")

    def call(self, x):
        return self.d1(self.d0(x))


class ReorderedNet(keras.Model):
    """``__init__`` order (d1, d0) differs from ``call`` order (d0, d1)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.top = _dense(OUTPUTS, 1, "d1")
        self.bottom = _dense(HIDDEN, 0, "d0", "tanh")

    def call(self, x):
        return self.top(self.bottom(x))


def make(kind, name="net"):
    """A fresh, uncompiled model of `kind`."""
    if kind == "functional":
        inputs = keras.Input((INPUTS,))
        h = _dense(HIDDEN, 0, "d0", "tanh")(inputs)
        return keras.Model(inputs, _dense(OUTPUTS, 1, "d1")(h), name=name)
    if kind == "sequential":
        return keras.Sequential([_dense(HIDDEN, 0, "d0", "tanh"), _dense(OUTPUTS, 1, "d1")], name=name)
    if kind == "subclassed":
        return Net(name=name)
    if kind == "reordered":
        return ReorderedNet(name=name)
    raise ValueError(kind)


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, INPUTS)).astype("float32")
    y = rng.normal(size=(n, OUTPUTS)).astype("float32")
    return x, y


def by_layer(model):
    """``{layer name: [arrays]}`` for the layers that hold weights (syncs JAX state)."""
    return {layer.name: [np.array(w) for w in layer.get_weights()] for layer in model.layers if layer.weights}


def initial_by_layer():
    """The weights every kind starts from (the seeded initializers' values)."""
    return by_layer(make("functional"))


def optimizer_values(model):
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in model.optimizer.variables]


def snapshot(model):
    """Everything a failed call must leave as it was."""
    built = bool(model.built and model.weights)
    return {
        "weights": by_layer(model) if built else None,
        "optimizer": optimizer_values(model) if getattr(model, "optimizer", None) is not None else None,
        "iterations": int(model.optimizer.iterations) if getattr(model, "optimizer", None) is not None else None,
    }


def assert_same_snapshot(before, after, atol=0.0):
    assert after["iterations"] == before["iterations"], (before["iterations"], after["iterations"])
    if before["optimizer"] is not None:
        assert len(after["optimizer"]) == len(before["optimizer"]), (
            f"optimizer variables: {len(before['optimizer'])} before, {len(after['optimizer'])} after"
        )
        for a, b in zip(before["optimizer"], after["optimizer"]):
            np.testing.assert_allclose(b, a, atol=atol, rtol=0)
    if before["weights"] is not None:
        assert_same_layers(after["weights"], before["weights"], atol=atol)


def assert_same_layers(got, want, atol=1e-6):
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for name in want:
        assert len(got[name]) == len(want[name]), name
        for g, w in zip(got[name], want[name]):
            np.testing.assert_allclose(g, w, atol=atol, rtol=0, err_msg=f"layer {name}")


def normalize_logs(history):
    """History with keys such as ``grad_norm/net/d0`` reduced to ``grad_norm/d0`` (paths differ by kind)."""
    out = {}
    for key, values in history.items():
        if "/" in key:
            head, tail = key.split("/", 1)
            key = f"{head}/{tail.rsplit('/', 1)[-1]}"
        out[key] = np.asarray(values, "float64")
    return out


def assert_same_logs(got, want, atol=1e-6):
    got, want = normalize_logs(got), normalize_logs(want)
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=atol, rtol=0, err_msg=key)


def compile_(model, optimizer=None, loss="mse", **kwargs):
    model.compile(optimizer=optimizer or keras.optimizers.Adam(0.01), loss=loss, **kwargs)
    return model


FIT = dict(batch_size=8, epochs=2, shuffle=False, verbose=0)


def plain_fit_result(kind="functional", optimizer=None, **fit_kwargs):
    """Weights by layer after a plain fit of a fresh model (the 'untouched model' reference)."""
    model = compile_(make(kind), optimizer)
    x, y = data()
    history = model.fit(x, y, **{**FIT, **fit_kwargs})
    return by_layer(model), history.history


def kerascool_patches_of_keras():
    """``Class.attribute`` for every Keras class attribute whose code lives in kerascool (a class-level patch).

    Looks through every class defined in a loaded ``keras`` module, at plain
    functions, static/class methods and properties, unwrapping
    ``functools.wraps`` (which copies ``__module__`` but not the code).
    """
    import inspect
    import os
    import sys

    import kerascool

    root = os.path.dirname(os.path.abspath(kerascool.__file__))

    def from_kerascool(obj):
        for candidate in (obj, getattr(obj, "__func__", None), getattr(obj, "fget", None), getattr(obj, "__wrapped__", None)):
            code = getattr(candidate, "__code__", None)
            if code is not None and os.path.abspath(code.co_filename).startswith(root):
                return True
        return bool(getattr(obj, "_kerascool", False))

    found = set()
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "keras" or name.startswith("keras.")):
            continue
        for cls in list(vars(module).values()):
            if not inspect.isclass(cls) or not (cls.__module__ or "").startswith("keras"):
                continue
            for attr, value in list(vars(cls).items()):
                if from_kerascool(value):
                    found.add(f"{cls.__module__}.{cls.__qualname__}.{attr}")
    return sorted(found)


def known_issue(condition: bool, reason: str):
    """A strict xfail: a case issue 14 (still open) does not pass yet; it fails loudly once fixed."""
    return pytest.mark.xfail(condition, strict=True, reason=f"issue 14 open: {reason}")
