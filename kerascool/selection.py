"""Choosing variables and layers by pattern or predicate, in one place.

Every kerascool feature that acts on "some layers" (scoped gradient
transforms, layer-wise rates, capture) resolves its choice here, so they all
read patterns the same way:

- a string is a regular expression that must match whole segments of a
  variable's path, such as ``"sequential/block_0/dense/kernel"``: ``"dense"``
  selects the variables of every layer named dense (not ``"dense_1"``),
  ``"dense.*"`` those of dense_1 too, ``"block_0/dense"`` a nested one,
  ``"kernel"`` every kernel. Since the path holds the names of all enclosing
  layers, a layer name selects all its variables;
- a list of strings selects what any of them selects;
- a callable is a predicate ``fn(variable) -> bool``;
- ``None`` selects everything.

A choice that selects nothing is an error: it is almost always a typo.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence, Union

from kerascool import _keras

Selection = Union[None, str, Sequence[str], Callable]


def _matcher(selection: Selection, what: str) -> Callable[[object], bool]:
    if selection is None:
        return lambda v: True
    if isinstance(selection, str):
        selection = [selection]
    if callable(selection):
        return lambda v: bool(selection(v))
    if isinstance(selection, (list, tuple)) and all(isinstance(s, str) for s in selection):
        regexes = segment_patterns(selection, what)
        return lambda v: any(r.search(v.path) for r in regexes)
    raise TypeError(
        f"Invalid value for argument `{what}`. Expected a regular expression string, "
        f"a list of them, a callable `fn(variable) -> bool`, or None. Received: "
        f"{what}={selection!r}"
    )


def segment_patterns(patterns: Sequence[str], what: str) -> list:
    """Compile patterns so that each matches whole '/'-separated path segments."""
    try:
        return [re.compile(f"(?:^|/)(?:{p})(?:/|$)") for p in patterns]
    except re.error as e:
        raise ValueError(f"Invalid regular expression in `{what}`: {e}. Received: {what}={patterns!r}") from None


def describe(selection: Selection) -> str:
    if selection is None:
        return "all variables"
    if callable(selection) and not isinstance(selection, str):
        return getattr(selection, "__name__", repr(selection))
    return repr(selection)


def select_variables(variables: Sequence, selection: Selection, what: str = "include") -> list[bool]:
    """A mask over `variables`: True where `selection` chooses the variable.

    >>> import keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="head")])
    >>> select_variables(model.weights, "head/kernel")
    [True, False]
    """
    match = _matcher(selection, what)
    mask = [match(v) for v in variables]
    if variables and not any(mask):
        sample = ", ".join(v.path for v in list(variables)[:6])
        raise ValueError(
            f"`{what}`={describe(selection)} matches no variable. Patterns are regular "
            f"expressions searched in variable paths; this model has paths such as: "
            f"{sample}{', ...' if len(variables) > 6 else ''}"
        )
    return mask


def owner_layers(model) -> dict[int, object]:
    """id(variable) -> the innermost layer that owns it."""
    owners: dict[int, object] = {}
    sizes: dict[int, int] = {}
    for layer in _keras.flatten_layers(model):
        n = len(layer.weights)
        for v in layer.weights:
            if id(v) not in sizes or n < sizes[id(v)]:
                owners[id(v)], sizes[id(v)] = layer, n
    return owners


def find_layers(model, selection: Selection, what: str = "layers") -> list:
    """Layers of `model` (nested included) whose name or path matches.

    Strings are regular expressions matching whole segments of the layer's
    path (e.g. ``"model/encoder/block_0/attention"``), as for variables; a
    callable is ``fn(layer) -> bool``.
    """
    layers = _keras.flatten_layers(model)
    if selection is None:
        return layers
    if isinstance(selection, str):
        selection = [selection]
    if callable(selection):
        chosen = [layer for layer in layers if selection(layer)]
    else:
        regexes = segment_patterns(selection, what)
        chosen = [layer for layer in layers if any(r.search(_layer_path(layer)) for r in regexes)]
    if not chosen:
        names = ", ".join(layer.name for layer in layers[:8])
        raise ValueError(
            f"`{what}`={describe(selection)} matches no layer of model {model.name!r}. "
            f"Its layers include: {names}{', ...' if len(layers) > 8 else ''}"
        )
    return chosen


def _layer_path(layer) -> str:
    return getattr(layer, "path", None) or layer.name
