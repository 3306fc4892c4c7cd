"""Capture intermediate tensors of a model: layer outputs, attention scores, explicit capture points.

`Capture` overrides methods of the chosen layer INSTANCES (an instance
attribute shadows the class method) for as long as it is installed, and
records what they return: `call` for layer outputs; for attention scores,
MultiHeadAttention's `_compute_attention`, forced to form the scores (the
layer's caller still gets only the output unless it asked for the scores).
It is a context manager; `remove()` restores every patched method, is
idempotent, and also runs when the body raises. Nothing else of the model
changes, and a compiled function traced while no capture is installed never
contains any of this. Install it around eager calls (``model(x)``): around
`fit` or `predict` it would record their traced, symbolic tensors.
`CaptureCallback` compiles its own probe pass instead.

Keys of the recorded values:

- ``"<layer path>"``: the output of a layer chosen with `layers` (a layer
  returning a tuple/dict gives ``"<layer path>/<index or key>"``);
- ``"<layer path>/attention_scores"``: the attention probabilities of a
  `keras.layers.MultiHeadAttention` (or subclass, such as keras-hub's
  `CachedMultiHeadAttention`) chosen with `attention`, shaped
  ``(batch, heads, query positions, key positions)``; masked positions are 0;
- ``"<path of the calling layer>/<name>"``: an explicit capture point,
  ``kerascool.capture(name, tensor)`` inside a layer's `call`;
- a second call of the same layer in one pass appends ``"#1"``, ``"#2"``, ...

The layer path is `layer.path` (the string that selection patterns match),
or the layer's name for layers that have no path.

Example:

>>> import numpy as np, keras, kerascool
>>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="hidden")], name="net")
>>> with kerascool.Capture(model, layers="hidden") as cap:
...     _ = model(np.ones((4, 3)))
>>> {k: v.shape for k, v in cap.values.items()}
{'net/hidden': (4, 2)}
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Union

import keras
import numpy as np
from keras import ops

from kerascool import _keras
from kerascool.selection import Selection, find_layers

_ACTIVE: list = []  # installed captures that record capture points, innermost last
_MISSING = object()


def capture(name: str, tensor: Any) -> Any:
    """Mark `tensor` as a capture point; return it unchanged.

    Call it inside a layer's `call`: ``x = kerascool.capture("gate", x)``.
    While a `Capture` (or a `CaptureCallback` probe pass) is installed the
    tensor is recorded under ``"<path of the calling layer>/<name>"``;
    otherwise this is one list check, at trace time in compiled functions,
    so it costs nothing in training.

    >>> import kerascool
    >>> kerascool.capture("anything", 3.0)
    3.0
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"Invalid value for argument `name`. Expected a non-empty string. Received: name={name!r}")
    if _ACTIVE:
        scope = _keras.current_path()
        _ACTIVE[-1]._record(f"{scope}/{name}" if scope else name, tensor)
    return tensor


def layer_path(layer) -> str:
    """The key under which a layer's captures are stored."""
    return getattr(layer, "path", None) or layer.name


class Capture:
    """Record chosen layer outputs, attention scores and capture points of `model`.

    Args:
        model: a built Keras model (functional, Sequential or subclassed).
        layers: layers whose outputs to record: a regular expression matched
            against layer paths as in `kerascool.selection` (``"dense"``,
            ``"block_.*/ffn"``), a list of them, a predicate
            ``fn(layer) -> bool``, or None for none. Layers inside a layer that
            a string pattern chose are left out (the block, not its parts).
        attention: `MultiHeadAttention` layers whose scores to record: True for
            all of them (none is fine), False for none, or a selection as for
            `layers` (which must choose attention layers).
        points: record `kerascool.capture` points while installed.

    Raises:
        ValueError: a pattern that matches no layer, an `attention` choice
            without attention layers, or attention with flash attention on.
    """

    def __init__(
        self,
        model,
        layers: Selection = None,
        attention: Union[bool, Selection] = True,
        points: bool = True,
    ):
        self.model = model
        self.output_layers = _choose(model, layers, "layers") if layers is not None else []
        self.attention_layers = _choose_attention(model, attention)
        self.points = bool(points)
        self.symbolic = False  # True: record keys only (shape checks on placeholders)
        self._tensors: dict = {}
        self._values: Optional[dict] = None
        self._called: set = set()
        self._patched: list = []  # (layer, method name, previous instance attribute or _MISSING)

    # -- installation ----------------------------------------------------------
    def __enter__(self) -> "Capture":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @property
    def installed(self) -> bool:
        return bool(self._patched) or self in _ACTIVE

    def install(self) -> None:
        """Patch the chosen layers (idempotent)."""
        if self.installed:
            return
        try:
            for layer in self.output_layers:
                self._patch(layer, "call", self._wrap_call)
            for layer in self.attention_layers:
                self._patch(layer, _keras.ATTENTION_METHOD, self._wrap_attention)
            if self.points:
                _ACTIVE.append(self)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Restore every patched method (idempotent; safe after exceptions)."""
        while self._patched:
            layer, name, previous = self._patched.pop()
            if previous is _MISSING:
                layer.__dict__.pop(name, None)
            else:
                object.__setattr__(layer, name, previous)
        while self in _ACTIVE:
            _ACTIVE.remove(self)

    # -- recording ---------------------------------------------------------------
    def clear(self) -> None:
        """Forget what was recorded (keep the patches)."""
        self._tensors, self._values, self._called = {}, None, set()

    def pop_tensors(self) -> dict:
        """Recorded tensors as they are (call order), forgotten here; `not_called` still holds."""
        tensors, self._tensors, self._values = self._tensors, {}, None
        return tensors

    @property
    def keys(self) -> list:
        """Keys recorded so far, in call order."""
        return list(self._tensors)

    @property
    def values(self) -> dict:
        """Recorded tensors as NumPy arrays, by key (converted once)."""
        if self._values is None:
            self._values = {key: to_numpy(t) for key, t in self._tensors.items()}
        return dict(self._values)

    def not_called(self) -> list:
        """Chosen layers that no forward pass reached since the last `clear`."""
        return [layer for layer in self.output_layers + self.attention_layers if id(layer) not in self._called]

    def _record(self, key: str, tensor) -> None:
        unique, n = key, 0
        while unique in self._tensors:
            n += 1
            unique = f"{key}#{n}"
        self._tensors[unique] = None if self.symbolic else tensor
        self._values = None

    def _record_structure(self, key: str, output) -> None:
        if keras.tree.is_nested(output):
            for path, tensor in keras.tree.flatten_with_path(output):
                self._record("/".join([key] + [str(p) for p in path]), tensor)
        else:
            self._record(key, output)

    def _patch(self, layer, name: str, wrap) -> None:
        # An instance attribute shadows the class method for this layer only.
        previous = layer.__dict__.get(name, _MISSING)
        wrapper = wrap(layer, getattr(layer, name))
        self._patched.append((layer, name, previous))
        object.__setattr__(layer, name, wrapper)  # bypass Keras attribute tracking

    def _wrap_call(self, layer, original):
        key = layer_path(layer)

        def call(*args, **kwargs):
            self._called.add(id(layer))
            output = original(*args, **kwargs)
            self._record_structure(key, output)
            return output

        return call

    def _wrap_attention(self, layer, original):
        # `_compute_attention(query, key, value, attention_mask, training,
        # return_attention_scores)` returns (output, scores) to `call`, which
        # passes the scores on only if its caller asked for them. Forcing
        # the flag leaves the fused kernel for the explicit softmax path; the
        # layer's output stays the same (up to float rounding).
        key = f"{layer_path(layer)}/attention_scores"
        signature = inspect.signature(original)

        def compute_attention(*args, **kwargs):
            self._called.add(id(layer))
            bound = signature.bind(*args, **kwargs)
            bound.arguments["return_attention_scores"] = True
            output, scores = original(*bound.args, **bound.kwargs)
            self._record(key, scores)
            return output, scores

        return compute_attention


def _choose(model, selection: Selection, what: str) -> list:
    chosen = [
        layer
        for layer in find_layers(model, selection, what)
        if not isinstance(layer, keras.layers.InputLayer)  # never called in a forward pass
    ]
    if not callable(selection):
        # A string pattern also matches a chosen layer's sublayers (their paths
        # contain its path): keep the outermost ones.
        inner = {id(sub) for layer in chosen for sub in _keras.flatten_layers(layer)}
        chosen = [layer for layer in chosen if id(layer) not in inner]
    if not chosen:
        raise ValueError(f"`{what}`={selection!r} matches only input layers of model {model.name!r}.")
    return chosen


def _choose_attention(model, attention) -> list:
    if attention is False or attention is None:
        return []
    if attention is True:
        candidates = _keras.flatten_layers(model)
    else:
        # No outermost filter here: "block_0" means the attention layers inside block_0.
        candidates = find_layers(model, attention, "attention")
    chosen = [layer for layer in candidates if isinstance(layer, keras.layers.MultiHeadAttention)]
    if attention is not True and not chosen:
        raise ValueError(
            f"`attention`={attention!r} matches no keras.layers.MultiHeadAttention layer of model "
            f"{model.name!r}. Choose attention layers, or record other layers' outputs with `layers`."
        )
    for layer in chosen:
        if not _keras.can_return_attention_scores(layer):
            raise ValueError(
                f"Cannot capture attention scores of layer {layer_path(layer)!r}: its `_compute_attention` has no "
                f"`return_attention_scores` argument. Leave it out with `attention=<pattern>` or attention=False."
            )
        if _keras.uses_flash_attention(layer):
            raise ValueError(
                f"Cannot capture attention scores of layer {layer_path(layer)!r}: it uses flash attention, "
                f"which never forms the scores. Build it with `flash_attention=False` or leave it out of `attention`."
            )
    return chosen


def to_numpy(tensor) -> np.ndarray:
    array = np.asarray(ops.convert_to_numpy(tensor))
    if array.dtype.kind not in "biufc":  # bfloat16 and friends: np.savez cannot read them back
        array = array.astype("float32")
    return array
