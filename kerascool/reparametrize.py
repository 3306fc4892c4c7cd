"""Pre-hoc reparametrization: a layer's weight computed from raw parameters in the forward pass.

`Reparametrize(layer, fn)` wraps a Keras layer; at every call the wrapped
layer's weight (``weight="kernel"`` by default) is ``fn(raw)``, where ``raw``
is the variable the layer created for it. The raw parameters are the
variables: the optimizer, gradient transforms, `kerascool.EMA` and
`kerascool.layer_rates` act on them (their paths stay under the wrapper's
name, ``"wn/dense/kernel"``, ``"wn/g"``), and the computed weight exists
only inside the forward pass, so gradients reach the raw parameters through
``fn`` on every backend.

Two reparametrizations are built in:

- `WeightNormalization` (Salimans & Kingma 2016): ``w = g * v / ||v||`` per
  output unit (the norm over every axis of the kernel but the last, the
  output units of Dense and the convolutions), ``g`` a new variable that
  starts at ``||v||`` so that the wrapped layer starts as it was (as
  PyTorch's ``weight_norm`` does); the paper's data-dependent
  initialization is one optional call,
  `WeightNormalization.initialize_from_data`.
- `ScaleReparametrization`: ``theta = scale * phi`` with ``phi`` starting at
  ``theta_0 / scale``: the same function at the start, but a gradient step
  of rate ``lr`` on ``phi`` moves ``theta`` by ``scale**2 * lr`` times the
  gradient for SGD (about ``scale * lr`` for Adam): a per-layer learning rate
  that lives in the model, not in the optimizer.

How: the wrapped layer keeps its weight in an instance attribute (all Keras
layers do: ``_kernel`` behind Dense's ``kernel`` property); for the duration
of the wrapped call that attribute holds the computed tensor. This is plain
Python, so it is differentiable and traceable the same way on TensorFlow,
JAX and torch, and it leaves Keras's `StatelessScope` (JAX's `fit` state)
untouched. A layer that reads its weight some other way (not from an
attribute) is refused when the wrapper is built.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from kerascool import _keras
from kerascool._keras import weights as _keras_weights


@keras.saving.register_keras_serializable(package="kerascool")
class Reparametrize(keras.layers.Wrapper):
    """Wrap `layer` so that its weight `weight` is ``fn(raw)`` in every call.

    ``raw`` is the variable `layer` created for that weight (its initializer,
    regularizer and constraint act on the raw value). Subclasses add their own
    parameters in `build_parameters` and override `compute_weight`.

    Args:
        layer: a Keras layer (built or not).
        fn: ``fn(raw) -> weight`` of the same shape, written with `keras.ops`;
            for a `.keras` round trip, a function registered with
            `keras.saving.register_keras_serializable` (a lambda needs
            ``safe_mode=False`` to load).
        weight: the name of the weight of `layer` to reparametrize
            (``"kernel"``, ``"embeddings"``, ``"bias"``...).
        **kwargs: the Layer keywords (``name``...).

    Example:

    >>> import numpy as np, keras, kerascool
    >>> wrapped = kerascool.Reparametrize(keras.layers.Dense(2, use_bias=False), keras.ops.abs)
    >>> y = wrapped(np.array([[1.0, -1.0, 2.0]], "float32"))  # builds: raw = the Dense's kernel
    >>> raw = keras.ops.convert_to_numpy(wrapped.layer.kernel)
    >>> np.allclose(keras.ops.convert_to_numpy(y), np.array([[1.0, -1.0, 2.0]]) @ np.abs(raw))
    True
    """

    def __init__(self, layer, fn=None, *, weight: str = "kernel", **kwargs):
        if not isinstance(layer, keras.layers.Layer):
            raise ValueError(
                f"Invalid value for argument `layer`. Expected a Keras layer. Received: layer={layer!r}"
            )
        if not isinstance(weight, str) or not weight:
            raise ValueError(
                f"Invalid value for argument `weight`. Expected the name of a weight of the layer, such as "
                f'"kernel". Received: weight={weight!r}'
            )
        if fn is not None and not callable(fn):
            raise TypeError(f"Invalid value for argument `fn`. Expected a callable raw -> weight. Received: fn={fn!r}")
        if fn is None and type(self).compute_weight is Reparametrize.compute_weight:
            raise TypeError(
                "Invalid value for argument `fn`. Expected a callable raw -> weight (or a subclass that overrides "
                "`compute_weight`). Received: fn=None"
            )
        super().__init__(layer, **kwargs)
        self.fn = fn
        self.weight = weight
        self._attributes: list[str] = []
        if layer.built:
            self._find_raw()

    # -- the raw parameter -------------------------------------------------------
    def _find_raw(self):
        raw = _keras_weights.find_weight(self.layer, self.weight)
        attributes = [] if raw is None else _keras_weights.weight_attributes(self.layer, raw)
        if not attributes:
            names = sorted({w.name for w in self.layer.weights})
            raise ValueError(
                f"Invalid value for argument `weight`. Expected a weight that layer {self.layer.name!r} keeps in an "
                f"attribute and reads in `call` (one of {names}). Received: weight={self.weight!r}"
            )
        if not keras.backend.is_float_dtype(raw.dtype):
            raise ValueError(
                f"Invalid value for argument `weight`. Expected a floating weight; {raw.path!r} has dtype "
                f"{raw.dtype}. Received: weight={self.weight!r}"
            )
        self._attributes = attributes
        return raw

    @property
    def raw(self):
        """The raw parameter: the variable the wrapped layer created for `weight`."""
        if not self._attributes:
            raise ValueError(f"Layer {self.name!r} is not built yet: it has no raw parameter.")
        return _keras_weights.attribute(self.layer, self._attributes[0])

    def build(self, input_shape=None):
        if not self.layer.built:
            self._build_layer(input_shape)
        raw = self._find_raw()
        self.build_parameters(raw)
        self.built = True

    def _build_layer(self, input_shape):
        # Under the wrapper's name, also when Keras builds it from a config
        # (`build_from_config` opens no scope): paths stay "<wrapper>/<layer>/...".
        with keras.name_scope(self.name, caller=self):
            self.layer.build(input_shape)
        self.layer.built = True

    def build_parameters(self, raw) -> None:
        """Create the wrapper's own parameters (none here); `raw` is the raw variable."""

    def compute_weight(self, raw):
        """The weight the wrapped layer uses, from the raw variable."""
        return self.fn(raw)

    def reparametrized_weight(self):
        """The weight the wrapped layer computes with now, as a tensor."""
        return self._weight_for_call()

    def _weight_for_call(self):
        weight = self.compute_weight(self.raw)
        dtype = self.layer.compute_dtype
        if keras.backend.standardize_dtype(weight.dtype) != dtype:  # mixed precision: as a variable read would cast
            weight = ops.cast(weight, dtype)
        return weight

    def call(self, inputs, *args, **kwargs):
        # `training` reaches the wrapped layer through Keras's call context.
        return self._call_with(self._weight_for_call(), inputs, args, kwargs)

    def _call_with(self, weight, inputs, args, kwargs, **others):
        replacements = {name: weight for name in self._attributes}
        replacements.update(others)
        with _keras_weights.substituted(self.layer, replacements):
            return self.layer(inputs, *args, **kwargs)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    # -- serialization -----------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config["weight"] = self.weight
        if self.fn is not None:
            config["fn"] = keras.saving.serialize_keras_object(self.fn)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        # The wrapper builds the layer (in its own build, under its name), not the layer's config.
        layer_config = {k: v for k, v in config["layer"].items() if k != "build_config"}
        config["layer"] = keras.saving.deserialize_keras_object(layer_config, custom_objects=custom_objects)
        if config.get("fn") is not None:
            config["fn"] = keras.saving.deserialize_keras_object(config["fn"], custom_objects=custom_objects)
        return cls(**config)


def _unit_norm(v, axis: int):
    """``||v||`` over every axis but `axis`, kept as a broadcastable shape."""
    axes = [a for a in range(len(v.shape)) if a != axis % len(v.shape)]
    # The floor only guards an all-zero unit (PyTorch has none; 1e-30 changes no other value).
    return ops.sqrt(ops.maximum(ops.sum(ops.square(v), axis=axes, keepdims=True), 1e-30))


@keras.saving.register_keras_serializable(package="kerascool")
class WeightNormalization(Reparametrize):
    """Weight normalization: ``w = g * v / ||v||`` per output unit (Salimans & Kingma, 2016).

    ``v`` is the wrapped layer's own kernel variable, ``g`` a new variable
    (``"<wrapper>/g"``, one value per output unit) that starts at ``||v||``,
    so that the wrapped layer starts as it was. Gradients, the optimizer,
    EMA and layer rates act on ``v`` and ``g``. Matches PyTorch's
    ``torch.nn.utils.parametrizations.weight_norm`` (``dim=0`` for
    ``nn.Linear``, whose weight is the transpose of a Keras Dense kernel).

    Args:
        layer: a layer with a kernel whose axis `axis` indexes the output
            units: Dense, EinsumDense, Conv1D/2D/3D (channels last).
        axis: the axis of the kernel that indexes the output units (the norm
            runs over all the others).
        weight: the weight to normalize.
        **kwargs: the Layer keywords.

    The paper's data-dependent initialization is one call before `fit`:
    `WeightNormalization.initialize_from_data(model, x_batch)`.

    Example:

    >>> import numpy as np, keras, kerascool
    >>> inputs = keras.Input((3,))
    >>> wn = kerascool.WeightNormalization(keras.layers.Dense(2), name="wn")
    >>> model = keras.Model(inputs, wn(inputs))
    >>> sorted(w.path for w in model.trainable_weights)  # the raw parameters v (the kernel), g, and the bias
    ['wn/dense/bias', 'wn/dense/kernel', 'wn/g']
    >>> v, g = keras.ops.convert_to_numpy(wn.raw), keras.ops.convert_to_numpy(wn.g)
    >>> np.allclose(g, np.linalg.norm(v, axis=0))  # starts as the plain Dense
    True
    """

    def __init__(self, layer, *, axis: int = -1, weight: str = "kernel", **kwargs):
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"Invalid value for argument `axis`. Expected an integer. Received: axis={axis!r}")
        self.axis = axis
        super().__init__(layer, weight=weight, **kwargs)

    def _find_raw(self):
        raw = super()._find_raw()
        if not -len(raw.shape) <= self.axis < len(raw.shape):
            raise ValueError(
                f"Invalid value for argument `axis`. Expected an axis of {raw.path!r}, of shape {tuple(raw.shape)}. "
                f"Received: axis={self.axis}"
            )
        return raw

    def build_parameters(self, raw):
        shape = [1] * len(raw.shape)
        shape[self.axis] = raw.shape[self.axis]
        axis = self.axis
        # An initializer, not an assign: Keras may build inside a symbolic scope,
        # where assigns are dropped; initializers run when the variables get values.
        self.g = self.add_weight(
            name="g",
            shape=tuple(shape),
            initializer=lambda shape, dtype=None: ops.cast(_unit_norm(raw.value, axis), dtype or raw.dtype),
            dtype=raw.dtype,
        )

    def compute_weight(self, raw):
        return ops.multiply(self.g, ops.divide(raw, _unit_norm(raw, self.axis)))

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}

    @staticmethod
    def initialize_from_data(model, x, epsilon: float = 1e-10):
        """Salimans & Kingma's data-dependent initialization of every WeightNormalization in `model`.

        One forward pass over the batch `x` (in inference mode, eagerly, layers
        in forward order): each wrapper computes its pre-activations
        ``t = (v / ||v||) . x`` (bias 0, no activation), then sets
        ``g = 1 / sqrt(var[t] + epsilon)`` and ``bias = -mean[t] * g`` (when the
        layer has a bias), the moments per output unit over the batch (and any
        spatial axes), so that its pre-activations have mean 0 and variance 1
        on `x`; the layers above see the initialized outputs. Weights change,
        nothing else; returns `model`.
        """
        wrappers = [layer for layer in _keras.flatten_layers(model) if isinstance(layer, WeightNormalization)]
        if isinstance(model, WeightNormalization):
            wrappers.insert(0, model)
        if not wrappers:
            raise ValueError(
                f"Invalid value for argument `model`. Expected a model with WeightNormalization layers. "
                f"Received: model={getattr(model, 'name', model)!r}"
            )
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon >= 0:
            raise ValueError(
                f"Invalid value for argument `epsilon`. Expected a number >= 0. Received: epsilon={epsilon!r}"
            )
        for wrapper in wrappers:
            wrapper._data_init_epsilon = float(epsilon)
        try:
            model(x, training=False)
        finally:
            for wrapper in wrappers:
                wrapper._data_init_epsilon = None
        return model

    _data_init_epsilon = None

    def call(self, inputs, *args, **kwargs):
        if self._data_init_epsilon is not None:
            self._initialize_from(inputs, args, kwargs)
        return super().call(inputs, *args, **kwargs)

    def _initialize_from(self, inputs, args, kwargs):
        if self.axis % len(self.raw.shape) != len(self.raw.shape) - 1:
            raise ValueError(
                f"WeightNormalization.initialize_from_data needs the output units on the last axis of the kernel "
                f"(axis=-1); layer {self.name!r} has axis={self.axis}."
            )
        bias = getattr(self.layer, "bias", None)
        bias = bias if isinstance(bias, keras.Variable) else None
        others = {}
        if bias is not None:
            zeros = ops.zeros_like(bias.value)
            others.update({name: zeros for name in _keras_weights.weight_attributes(self.layer, bias)})
        if getattr(self.layer, "activation", None) is not None:
            others["activation"] = keras.activations.linear
        direction = ops.divide(self.raw.value, _unit_norm(self.raw.value, self.axis))
        t = self._call_with(ops.cast(direction, self.layer.compute_dtype), inputs, args, kwargs, **others)
        t = ops.cast(t, self.raw.dtype)
        axes = list(range(len(t.shape) - 1))
        mean, variance = ops.mean(t, axis=axes), ops.var(t, axis=axes)
        scale = ops.divide(1.0, ops.sqrt(variance + self._data_init_epsilon))
        self.g.assign(ops.reshape(scale, self.g.shape))
        if bias is not None:
            bias.assign(ops.reshape(-mean * scale, bias.shape))


@keras.saving.register_keras_serializable(package="kerascool")
class ScaleReparametrization(Reparametrize):
    """``theta = scale * phi``: a fixed per-layer scale on a weight, as a per-layer rate.

    ``phi`` (the wrapped layer's own variable) starts at ``theta_0 / scale``,
    so the function is unchanged at the start; training ``phi`` with rate
    ``lr`` moves ``theta`` like training ``theta`` with ``scale**2 * lr`` (SGD),
    or about ``scale * lr`` (Adam, whose steps do not scale with the
    gradient). Unlike `kerascool.layer_rates`, the rate travels with the
    model, and it also scales weight decay and regularizers of ``phi``.

    Args:
        layer: a Keras layer.
        scale: the fixed factor, a finite number > 0.
        weight: the weight to scale.
        **kwargs: the Layer keywords.

    Example:

    >>> import numpy as np, keras, kerascool
    >>> plain = keras.layers.Dense(2, kernel_initializer="ones")
    >>> scaled = kerascool.ScaleReparametrization(keras.layers.Dense(2, kernel_initializer="ones"), scale=10.0)
    >>> x = np.ones((1, 3), "float32")
    >>> np.allclose(keras.ops.convert_to_numpy(scaled(x)), keras.ops.convert_to_numpy(plain(x)))  # same start
    True
    >>> keras.ops.convert_to_numpy(scaled.raw)[0]  # phi = theta / scale
    array([0.1, 0.1], dtype=float32)
    """

    def __init__(self, layer, scale: float = 1.0, *, weight: str = "kernel", **kwargs):
        ok = not isinstance(scale, bool) and isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0
        if not ok:
            raise ValueError(
                f"Invalid value for argument `scale`. Expected a finite number > 0. Received: scale={scale!r}"
            )
        self.scale = float(scale)
        super().__init__(layer, weight=weight, **kwargs)
        if layer.built:  # built by the user (eagerly): start phi at theta / scale now
            self.raw.assign(ops.divide(self.raw.value, self.scale))

    def _build_layer(self, input_shape):
        # phi must start at theta_0 / scale: scale the layer's initializer while
        # it builds (Keras may create the variable in a symbolic scope, where an
        # assign would be dropped).
        attribute = f"{self.weight}_initializer"
        initializer = getattr(self.layer, attribute, None)
        if initializer is None:
            raise ValueError(
                f"ScaleReparametrization needs layer {self.layer.name!r} to have `{attribute}`, or to be built "
                "before it is wrapped."
            )
        scale = self.scale

        def scaled(shape, dtype=None):
            return ops.divide(initializer(shape, dtype=dtype), scale)

        setattr(self.layer, attribute, scaled)
        try:
            super()._build_layer(input_shape)
        finally:
            setattr(self.layer, attribute, initializer)

    def compute_weight(self, raw):
        return ops.multiply(ops.cast(self.scale, raw.dtype), raw)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}
