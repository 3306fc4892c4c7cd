"""Read the graph of a functional model (checked against keras 3.15.1).

Keras keeps a functional model's graph in private attributes: the nodes by
depth (``_nodes_by_depth``; deeper = closer to the inputs), each node with
its ``operation``, its symbolic ``arguments`` (``fill_in`` substitutes
tensors for the node's KerasTensors, as Keras's own ``_run_through_graph``
does), ``input_tensors`` and ``outputs``; the user's input and output
structures (``_inputs_struct``, ``_outputs_struct``). A Sequential model
built with known input shapes holds a functional twin in ``_functional``.
Everything else in kerascool's model surgery goes through these helpers.
"""

from __future__ import annotations

import keras


def functional_of(model):
    """The functional graph owner of `model` (itself, a Sequential's twin), or None."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if isinstance(model, keras.Model) and hasattr(model, "_nodes_by_depth") and getattr(model, "inputs", None):
        return model
    return None


def nodes_in_order(functional) -> list:
    """The graph's nodes from the inputs to the outputs (inputs' own nodes excluded)."""
    nodes = []
    for depth in sorted(functional._nodes_by_depth, reverse=True):
        nodes += [n for n in functional._nodes_by_depth[depth] if n.operation is not None and not n.is_input]
    return nodes


def inputs_struct(functional):
    struct = getattr(functional, "_inputs_struct", None)
    return struct if struct is not None else functional.inputs


def outputs_struct(functional):
    struct = getattr(functional, "_outputs_struct", None)
    return struct if struct is not None else functional.outputs


def parts(node) -> tuple:
    """``(operation, input KerasTensors, output KerasTensors)`` of a node."""
    return node.operation, list(node.input_tensors), list(node.outputs)


def call(node, tensors: dict):
    """Call the node's operation again, its KerasTensors replaced: ``tensors[id(old)] = new``."""
    args, kwargs = node.arguments.fill_in(tensors)
    return node.operation(*args, **kwargs)


def first_argument_tensors(node):
    """The KerasTensors of the node's first positional argument, flattened (or None)."""
    args = node.arguments.args
    if not args:
        return None
    return [t for t in keras.tree.flatten(args[0]) if isinstance(t, keras.KerasTensor)]
