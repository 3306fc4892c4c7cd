"""Model surgery on functional models: `split` a model in two, take `submodel`s of intermediate outputs.

Both rebuild the requested part of the model's graph by calling the SAME
layer objects again on new symbolic inputs, so the new models share every
layer (and weight) with the original: training one trains the others,
nothing is copied, and each is an ordinary functional model that fits,
predicts and saves. The layers' own calls are replayed with their
recorded arguments (masks, ``training=`` constants), so ``top(bottom(x))``
computes exactly what ``model(x)`` computes.

Layers are named by name (``"block_2"``), or by path into nested
functional or Sequential sub-models (``"encoder/block_2"``; a plain name
that is not a top-level layer is also looked up in the sub-models, when
one layer has it). A nested sub-model on the way to a named layer is
inlined (its layers join the new models' graph); other sub-models stay one
layer.

Subclassed models have no graph to cut: to read their intermediate
tensors, use `kerascool.Capture` (one call) or `kerascool.CaptureCallback`
(during `fit`).
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import keras

from kerascool._keras import graph as _keras_graph

Names = Union[str, Sequence[str]]


class _Step:
    """One node of the flattened graph: a layer call, its tensors as keys."""

    def __init__(self, node, operation, inputs: list, path: str, in_keys: list, out_keys: list):
        self.node, self.operation, self.inputs = node, operation, inputs
        self.path, self.in_keys, self.out_keys = path, in_keys, out_keys


class _Graph:
    """A functional model's graph with chosen nested sub-models inlined."""

    def __init__(self, model, inline: set):
        self.model = _keras_graph.functional_of(model)
        self.steps: list[_Step] = []
        self.tensor: dict = {}  # key -> original KerasTensor (shape, dtype)
        self.label: dict = {}  # key -> "output of layer 'x'" / "input 'x'"
        struct = _keras_graph.inputs_struct(self.model)
        self.input_keys = []
        for t in self.model.inputs:
            key = ("", id(t))
            self.input_keys.append(key)
            self.tensor[key], self.label[key] = t, f"input {t.name!r}"
        self.input_struct = struct
        self.output_keys = self._flatten(self.model, dict(zip(map(id, self.model.inputs), self.input_keys)), "", inline)
        self.output_struct = _keras_graph.outputs_struct(self.model)

    def _flatten(self, functional, keymap: dict, prefix: str, inline: set) -> list:
        for node in _keras_graph.nodes_in_order(functional):
            op, node_inputs, node_outputs = _keras_graph.parts(node)
            in_keys = [keymap[id(t)] for t in node_inputs]
            inner = _keras_graph.functional_of(op) if id(op) in inline else None
            if inner is not None:
                given = _keras_graph.first_argument_tensors(node)
                if given is None or len(given) != len(node_inputs) or len(given) != len(inner.inputs):
                    raise ValueError(
                        f"Cannot reach into sub-model {prefix + op.name!r}: it is called with tensors other than "
                        "its inputs (a mask, for instance). Name a layer outside it."
                    )
                inner_map = {id(x): keymap[id(t)] for x, t in zip(inner.inputs, given)}
                out = self._flatten(inner, inner_map, prefix + op.name + "/", inline)
                for t, key in zip(node_outputs, out):
                    keymap[id(t)] = key
                continue
            path = prefix + op.name
            out_keys = []
            for i, t in enumerate(node_outputs):
                key = (path, id(t))
                keymap[id(t)] = key
                self.tensor[key] = t
                self.label[key] = f"output of layer {path!r}" + (f" [{i}]" if len(node_outputs) > 1 else "")
                out_keys.append(key)
            self.steps.append(_Step(node, op, node_inputs, path, in_keys, out_keys))
        return [keymap[id(t)] for t in functional.outputs]

    def keys_of(self, path: str) -> list:
        """The tensor keys of the layer at `path` (a top-level input too)."""
        steps = [s for s in self.steps if s.path == path]
        if not steps:
            inputs = [k for k in self.input_keys if self.tensor[k].name == path]
            if inputs:
                return inputs
            raise ValueError(f"No layer at {path!r} in model {self.model.name!r}.")
        if len(steps) > 1:
            raise ValueError(
                f"Layer {path!r} is called {len(steps)} times in model {self.model.name!r}: its output is not one "
                "tensor. Name a layer that is called once."
            )
        return steps[0].out_keys

    def ancestors(self, keys, stop=()) -> set:
        """Indices of the steps needed to compute `keys` from the model's inputs (or from `stop`)."""
        producer = {k: i for i, s in enumerate(self.steps) for k in s.out_keys}
        needed, todo = set(), [k for k in keys if k not in stop]
        while todo:
            key = todo.pop()
            i = None if key in stop else producer.get(key)
            if i is not None and i not in needed:
                needed.add(i)
                todo += self.steps[i].in_keys
        return needed

    def run(self, seed: dict, only: set) -> dict:
        """Call the steps in `only` (indices), in order, from the new tensors in `seed` (key -> tensor)."""
        values = dict(seed)
        for i, step in enumerate(self.steps):
            if i not in only:
                continue
            given = {id(t): values[k] for t, k in zip(step.inputs, step.in_keys)}
            outputs = keras.tree.flatten(_keras_graph.call(step.node, given))
            values.update(zip(step.out_keys, outputs))
        return values

    def fresh_inputs(self):
        new = {k: _fresh_input(self.tensor[k], self.tensor[k].name) for k in self.input_keys}
        struct = keras.tree.map_structure(lambda t: new[("", id(t))], self.input_struct)
        return new, struct


def _fresh_input(tensor, name: str):
    return keras.Input(batch_shape=tuple(tensor.shape), dtype=tensor.dtype, sparse=tensor.sparse, name=name)


def _functional_or_raise(model, what: str):
    functional = _keras_graph.functional_of(model) if isinstance(model, keras.Model) else None
    if functional is None:
        if isinstance(model, keras.Sequential):
            raise ValueError(
                f"Invalid value for argument `model`. Expected a built model; Sequential model {model.name!r} has no "
                "input shape yet. Build it first (keras.Input as its first layer, or `model.build(shape)`). "
                f"Received: model={model.name!r}"
            )
        raise TypeError(
            f"Invalid value for argument `model`. Expected a functional or Sequential model: {what} needs a graph "
            f"of layers. For a subclassed model, read intermediate tensors with kerascool.Capture(model, layers=...) "
            f"or, during fit, kerascool.CaptureCallback(layers=...). Received: model={getattr(model, 'name', model)!r}"
        )
    return functional


def _resolve(functional, name, what: str) -> tuple:
    """(path, set of ids of the sub-models to inline) for a layer name or path."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"Invalid value for argument `{what}`. Expected layer names. Received: {what}={name!r}")
    parts = name.split("/")
    owner, inline, path = functional, set(), []
    for i, part in enumerate(parts):
        layers = {layer.name: layer for layer in owner.layers}
        if part not in layers:
            raise ValueError(
                f"Invalid value for argument `{what}`. Expected names of layers of {owner.name!r} (one of "
                f"{sorted(layers)}). Received: {what}={name!r}"
            )
        layer = layers[part]
        path.append(part)
        if i < len(parts) - 1:
            inner = _keras_graph.functional_of(layer)
            if inner is None:
                raise ValueError(
                    f"Invalid value for argument `{what}`. {'/'.join(path)!r} is not a functional or Sequential "
                    f"sub-model to reach into. Received: {what}={name!r}"
                )
            inline.add(id(layer))
            owner = inner
    return "/".join(path), inline


def _find(functional, name: str, what: str) -> tuple:
    """As `_resolve`, and a plain name that is not top-level is searched in nested sub-models."""
    if "/" in name or name in {layer.name for layer in functional.layers}:
        return _resolve(functional, name, what)
    found = []

    def search(owner, prefix):
        for layer in owner.layers:
            inner = _keras_graph.functional_of(layer)
            if inner is not None:
                if name in {sub.name for sub in inner.layers}:
                    found.append(prefix + layer.name + "/" + name)
                search(inner, prefix + layer.name + "/")

    search(functional, "")
    if len(found) != 1:
        raise ValueError(
            f"Invalid value for argument `{what}`. Expected the name of a layer of {functional.name!r} (or a path "
            f'"sub_model/layer"); {name!r} is ' + ("in no layer or sub-model" if not found else f"at {found}")
            + f". Received: {what}={name!r}"
        )
    return _resolve(functional, found[0], what)


def split(model, at: Names, *, names: Sequence[str] = None):
    """Split a functional model in two at the output of a layer: ``top(bottom(x)) == model(x)``.

    ``bottom`` maps the model's inputs to the output of the layer `at`;
    ``top`` maps that tensor to the model's outputs. Both share the model's
    layers (weights tied, not copied). A clean cut needs every tensor that
    flows from below the cut to above it to be named: a cut that another
    tensor crosses (a skip connection, a mask, a second input joining above
    the cut) is refused, naming the crossing tensors; name them too
    (``at=["block_2", "padding_mask"]``) and ``top`` takes one input per
    named tensor, in order.

    Args:
        model: a functional or Sequential model (nested sub-models and several
            inputs welcome).
        at: a layer name or path (``"encoder/block_2"``), or a list of them
            (a model input's name too); the cut is at their outputs.
        names: the names of the two new models (default
            ``<model>_bottom``, ``<model>_top``).

    Returns:
        ``(bottom, top)``, two functional models.

    Example:

    >>> import numpy as np, keras, kerascool
    >>> inputs = keras.Input((4,))
    >>> h = keras.layers.Dense(8, activation="relu", name="block_1")(inputs)
    >>> h = keras.layers.Dense(8, activation="relu", name="block_2")(h)
    >>> model = keras.Model(inputs, keras.layers.Dense(1, name="head")(h))
    >>> bottom, top = kerascool.split(model, at="block_2")
    >>> x = np.ones((2, 4), "float32")
    >>> bool(np.array_equal(top(bottom(x)), model(x)))
    True
    >>> top.get_layer("head") is model.get_layer("head")  # shared, not copied
    True
    """
    functional = _functional_or_raise(model, "split")
    cuts = [at] if isinstance(at, str) else list(at) if isinstance(at, (list, tuple)) else None
    if not cuts:
        raise ValueError(
            f"Invalid value for argument `at`. Expected a layer name or a non-empty list of layer names. "
            f"Received: at={at!r}"
        )
    resolved = [_find(functional, name, "at") for name in cuts]
    graph = _Graph(model, set().union(*(inline for _, inline in resolved)))
    cut_keys = []
    for path, _ in resolved:
        cut_keys += [k for k in graph.keys_of(path) if k not in cut_keys]

    # The top: the steps that compute the outputs from the cut, i.e. that read a tensor computed
    # from a cut tensor and that the outputs need (walking back from them, stopping at the cut).
    # Any other tensor such a step reads, or a model output not computed from the cut, crosses it.
    above, top_steps = set(cut_keys), set()
    for i, step in enumerate(graph.steps):
        if any(k in above for k in step.in_keys):
            top_steps.add(i)
            above.update(step.out_keys)
    top_steps &= graph.ancestors(graph.output_keys, stop=set(cut_keys))
    crossing = []
    for i in sorted(top_steps):
        crossing += [k for k in graph.steps[i].in_keys if k not in above and k not in crossing]
    crossing += [k for k in graph.output_keys if k not in above and k not in crossing]
    if crossing:
        labels = [graph.label[k] for k in crossing]
        raise ValueError(
            f"Invalid value for argument `at`. Expected a clean cut of model {model.name!r}: besides {cuts}, these "
            f"tensors cross it: {labels}. Add their layers to `at` (the top model then takes them as inputs too), "
            f"or cut elsewhere. Received: at={at!r}"
        )

    if names is not None and (not isinstance(names, (list, tuple)) or len(names) != 2):
        raise ValueError(f"Invalid value for argument `names`. Expected two model names. Received: names={names!r}")
    bottom_name, top_name = names or (f"{model.name}_bottom", f"{model.name}_top")
    new, inputs = graph.fresh_inputs()
    values = graph.run(new, graph.ancestors(cut_keys))
    cut_values = [values[k] for k in cut_keys]
    bottom = keras.Model(inputs, cut_values[0] if len(cut_keys) == 1 else cut_values, name=bottom_name)

    # One input per cut tensor, named after its layer's path ("encoder_block_2") or model input.
    taken = {graph.steps[i].operation.name for i in top_steps}
    top_inputs = {k: _fresh_input(graph.tensor[k], _input_name(graph, k, cut_keys, taken)) for k in cut_keys}
    values = graph.run(top_inputs, top_steps)
    outputs = keras.tree.pack_sequence_as(graph.output_struct, [values[k] for k in graph.output_keys])
    top_in = [top_inputs[k] for k in cut_keys]
    top = keras.Model(top_in[0] if len(top_in) == 1 else top_in, outputs, name=top_name)
    return bottom, top


def _input_name(graph, key, cut_keys, taken: set) -> str:
    if key in graph.input_keys:
        name = graph.tensor[key].name
    else:
        name = key[0].replace("/", "_")
        same = [k for k in cut_keys if k[0] == key[0]]
        name = name if len(same) == 1 else f"{name}_{same.index(key)}"
    return name if name not in taken else f"{name}_input"  # names are unique in a model


def submodel(model, outputs: Union[str, Sequence[str], Mapping[str, str]], *, name: str = None):
    """A model from the inputs of `model` to the outputs of named layers inside it.

    The new model shares the layers of `model` (weights tied). Its outputs
    follow `outputs`: one tensor for a name, a list for a list, a dict for a
    dict ``{key: layer name}``. For subclassed models, use
    `kerascool.Capture` / `kerascool.CaptureCallback` instead.

    Args:
        model: a functional or Sequential model.
        outputs: layer names or paths into nested sub-models
            (``"encoder/block_1"``).
        name: the new model's name (default ``<model>_submodel``).

    Example:

    >>> import numpy as np, keras, kerascool
    >>> inputs = keras.Input((4,))
    >>> h = keras.layers.Dense(8, name="block_1")(inputs)
    >>> model = keras.Model(inputs, keras.layers.Dense(1, name="head")(h))
    >>> features = kerascool.submodel(model, outputs=["block_1", "head"])
    >>> [tuple(y.shape) for y in features(np.ones((2, 4), "float32"))]
    [(2, 8), (2, 1)]
    """
    functional = _functional_or_raise(model, "submodel")
    if isinstance(outputs, str):
        struct = outputs
    elif isinstance(outputs, Mapping):
        struct = dict(outputs)
    elif isinstance(outputs, (list, tuple)):
        struct = list(outputs)
    else:
        struct = None
    flat = keras.tree.flatten(struct) if struct is not None else []
    if not flat or not all(isinstance(n, str) for n in flat):
        raise ValueError(
            "Invalid value for argument `outputs`. Expected a layer name, a non-empty list of them or a dict "
            f"{{key: layer name}}. Received: outputs={outputs!r}"
        )
    resolved = [_find(functional, n, "outputs") for n in flat]
    graph = _Graph(model, set().union(*(inline for _, inline in resolved)))
    keys = {n: graph.keys_of(path) for n, (path, _) in zip(flat, resolved)}
    new, inputs = graph.fresh_inputs()
    values = graph.run(new, graph.ancestors([k for found in keys.values() for k in found]))

    def output_of(n):  # a layer with several outputs gives a list
        found = [values[k] for k in keys[n]]
        return found[0] if len(found) == 1 else found

    result = output_of(struct) if isinstance(struct, str) else keras.tree.map_structure(output_of, struct)
    return keras.Model(inputs, result, name=name or f"{model.name}_submodel")
