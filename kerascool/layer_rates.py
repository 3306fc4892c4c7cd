"""`layer_rates`: decorate a model with per-group learning-rate multipliers.

The multiplier scales the UPDATE after the user's stock optimizer has made
it: ``new = old + m * (optimizer_new - old)``. The update of Adam, AdamW, Lion
and friends is linear in the learning rate (decoupled weight decay included,
as in PyTorch's per-group rates), so this equals training the group at
``learning_rate * m``, while the optimizer itself stays untouched: Keras's own
learning-rate schedules and callbacks keep working and combine
multiplicatively. ``m == 0`` keeps the group's weights bit-identical and
``m == 1`` gives the optimizer's result exactly.

Groups, ordered from the bottom (inputs) to the top (outputs):

- ``rules={pattern: m, ...}``: each rule is a group with multiplier ``m``; a
  variable belongs to the FIRST rule that matches it (put specific patterns
  first); variables no rule matches keep multiplier 1. The last rule counts
  as the top for order-dependent schedules.
- depth groups (default, or ``groups=None``): one group per top-level layer
  that has trainable variables, in the order of ``model.layers``. For a
  Sequential model that is the stacking order; for a functional model the
  layers at the same Keras depth (longest path to the outputs) share one
  group, so parallel branches are one group; for a subclassed model it is the
  order in which ``__init__`` assigns the layers (name the groups yourself if
  that is not the forward order). A nested model (a pretrained backbone) is
  one layer and so one group; split it with ``groups=``.
- ``groups=[pattern, ...]``: explicit groups, bottom first, first match wins;
  a pattern with a capturing group such as ``r"block_(\\d+)"`` gives one group
  per captured value, in numeric order. Variables in no group keep
  multiplier 1.

Depth groups or explicit groups get multipliers from ``decay`` (the top group
gets 1, each group below ``decay`` times the one above: layer-wise rate decay)
or ``spread=(lo, hi)`` (geometric from ``lo`` at the bottom to ``hi`` at the
top, as fastai's ``slice(lo, hi)``), or 1 when neither is given (for example
to be scheduled by `LayerRateScheduler`). Patterns are those of
`kerascool.selection`: regular expressions matching whole segments of a
variable path, which holds the names of all enclosing layers.

The multipliers are a variable of the optimizer: JAX threads it through the
compiled step, checkpoints keep it, and changing it (`LayerRateScheduler`)
does not retrace. A re-compile with a new optimizer starts again from the
decorated values, as its learning rate does. Saved as ``.keras``, loading
needs one line to re-decorate (Keras skips the optimizer state on load because
it has more variables than a fresh optimizer; ``load_weights`` reads it back
once the decoration has created them)::

    model = keras.saving.load_model("model.keras")
    kerascool.layer_rates(model, decay=0.8).load_weights("model.keras")

Not with the optimizer's built-in ``use_ema=True``: it averages the weights
before the multipliers apply (an error says so).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from keras import ops

from kerascool import _core, _keras
from kerascool.selection import Selection, describe, segment_patterns, select_variables

Rules = Union[Mapping, Sequence]


def _check_multiplier(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"Invalid value for argument `{name}`. Expected a number >= 0. Received: {name}={value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a finite number >= 0. Received: {name}={value!r}"
        )
    return float(value)


def _check_decay(decay) -> float:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not math.isfinite(decay) or not 0 < decay <= 1:
        raise ValueError(f"Invalid value for argument `decay`. Expected a value in (0, 1]. Received: decay={decay!r}")
    return float(decay)


def _check_spread(spread) -> tuple:
    ok = isinstance(spread, (tuple, list)) and len(spread) == 2
    ok = ok and all(
        not isinstance(s, bool) and isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in spread
    )
    if not ok:
        raise ValueError(
            f"Invalid value for argument `spread`. Expected a pair (lo, hi) of finite numbers > 0. "
            f"Received: spread={spread!r}"
        )
    return float(spread[0]), float(spread[1])


def _rule_items(rules) -> list:
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    if not items or not all(isinstance(i, (tuple, list)) and len(i) == 2 for i in items):
        raise TypeError(
            "Invalid value for argument `rules`. Expected a non-empty dict {pattern: multiplier} or a list of "
            f"(pattern, multiplier) pairs. Received: rules={rules!r}"
        )
    return [(p, _check_multiplier(f"rules[{p!r}]", m)) for p, m in items]


def _natural_key(key: tuple) -> tuple:
    return tuple((0, int(k), "") if k is not None and k.isdigit() else (1, 0, k or "") for k in key)


def _selection_groups(variables: list, selections: Sequence, what: str) -> list:
    """Candidate groups from patterns, in order; capturing patterns expand."""
    groups = []
    for i, sel in enumerate(selections):
        label = f"{what}[{i}]" if what == "groups" else f"{what}[{sel!r}]"
        mask = select_variables(variables, sel, label)  # raises on no match
        regex = segment_patterns([sel], label)[0] if isinstance(sel, str) and what == "groups" else None
        if regex is None or regex.groups == 0:  # rules never expand: one multiplier per rule
            groups.append((describe(sel) if not isinstance(sel, str) else sel, mask))
            continue
        expanded: dict = {}
        for j, (v, chosen) in enumerate(zip(variables, mask)):
            if chosen:
                match = regex.search(v.path)
                key = match.groups()
                # Named up to the last capture: r"block_(\d+)_.*" gives "block_0" for block_0_attn and block_0_ffn.
                end = max([match.end(k) for k in range(1, regex.groups + 1)] + [match.start(0) + 1])
                name = v.path[match.start(0) : end].strip("/")
                expanded.setdefault(key, (name, [False] * len(variables)))[1][j] = True
        for key in sorted(expanded, key=_natural_key):
            groups.append(expanded[key])
    return groups


def _depth_groups(model, variables: list) -> list:
    """One group per top-level layer (or per Keras depth in a functional model)."""
    index = {id(v): j for j, v in enumerate(variables)}
    depths = _keras.layer_depths(model)
    groups: list = []
    slot_of_depth: dict = {}
    taken: set = set()
    # Subclassed models: bottom first in the order `call` uses the layers, not `__init__`'s.
    for layer in _keras.call_order(model) or model.layers:
        own = [index[id(v)] for v in layer.trainable_weights if id(v) in index and id(v) not in taken]
        if not own:
            continue
        taken.update(id(variables[j]) for j in own)
        depth = None if depths is None else depths.get(id(layer))
        if depth is not None and depth in slot_of_depth:
            name, mask = groups[slot_of_depth[depth]]
            groups[slot_of_depth[depth]] = (f"{name}+{layer.name}", mask)
        else:
            mask = [False] * len(variables)
            groups.append((layer.name, mask))
            if depth is not None:
                slot_of_depth[depth] = len(groups) - 1
        for j in own:
            groups[-1 if depth is None else slot_of_depth[depth]][1][j] = True
    if not groups:
        raise ValueError(
            f"Model {model.name!r} has no top-level layer with trainable variables to group by depth. "
            "Pass `groups=[pattern, ...]` or `rules={pattern: multiplier}`."
        )
    return groups


class LayerRates(_core.StepHook):
    """The decoration's step hook: the resolved groups and their multipliers.

    Created by `layer_rates`; users read it through `layer_rate_table` and
    `current_layer_rates` and change it through `LayerRateScheduler`.
    """

    stage = "rescale"
    needs_old_values = True
    name = "layer_rates"

    def __init__(self, rules=None, groups=None, decay=None, spread=None):
        self.rules = rules
        self.groups_spec = groups
        self.decay = decay
        self.spread = spread
        self._resolved_for: Optional[tuple] = None
        self.group_names: list[str] = []
        self.base: list[float] = []
        self.slot_of: dict[int, int] = {}  # id(variable) -> group index
        self.paths: list[tuple] = []  # (path, shape, group index or None) for the table

    # -- resolution (pure Python, before anything is created) ----------------
    def resolve(self, model, variables: list) -> None:
        key = tuple(id(v) for v in variables)
        if key == self._resolved_for:
            return
        if self.rules is not None:
            candidates = _selection_groups(variables, [p for p, _ in self.rules], "rules")
            what = "rules"
        elif self.groups_spec is not None:
            spec = self.groups_spec
            if isinstance(spec, str) or callable(spec):  # one entry (a capturing pattern, typically)
                spec = [spec]
            candidates = _selection_groups(variables, list(spec), "groups")
            what = "groups"
        else:
            candidates = _depth_groups(model, variables)
            what = "groups"
        slot_of: dict[int, int] = {}
        names = []
        for name, mask in candidates:  # first match wins
            own = [j for j, chosen in enumerate(mask) if chosen and id(variables[j]) not in slot_of]
            if not own:
                raise ValueError(
                    f"`{what}` entry {name!r} matches only variables that an earlier entry already took "
                    "(the first matching entry wins). Put the more specific pattern first, or remove it."
                )
            for j in own:
                slot_of[id(variables[j])] = len(names)
            names.append(name)
        n = len(names)
        if self.rules is not None:
            base = [m for _, m in self.rules]
        elif self.decay is not None:
            base = [self.decay ** (n - 1 - i) for i in range(n)]
        elif self.spread is not None:
            lo, hi = self.spread
            base = [hi if n == 1 else lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
        else:
            base = [1.0] * n
        self.group_names, self.base, self.slot_of = names, [float(b) for b in base], slot_of
        self.paths = [(v.path, tuple(v.shape), slot_of.get(id(v))) for v in variables]
        self._resolved_for = key

    # -- StepHook ---------------------------------------------------------------
    def check(self, model, variables):
        optimizer = _keras.inner_optimizer(model.optimizer)
        if getattr(optimizer, "use_ema", False):
            raise ValueError(
                "kerascool.layer_rates cannot be used with an optimizer built with `use_ema=True`: the optimizer "
                "averages the weights before the multipliers rescale the update, so frozen groups would move. "
                "Compile without `use_ema`."
            )
        self.resolve(model, variables)

    def layout(self, model, variables):
        self.resolve(model, variables)
        return (tuple(self.group_names), tuple(self.base))

    def build(self, model, variables, state):
        self.resolve(model, variables)
        multipliers = state.variable("multipliers", (len(self.base),), "float32")
        multipliers.assign(np.asarray(self.base, "float32"))
        return {"multipliers": multipliers}

    def after_update(self, variables, state, ctx):
        mult = state["multipliers"].value
        factors: dict = {}
        for v, old in zip(variables, ctx.old_values):
            g = self.slot_of.get(id(v))
            if g is None:
                continue
            new = v.value
            if (g, new.dtype) not in factors:
                m = ops.cast(mult[g], new.dtype)
                factors[(g, new.dtype)] = (m, ops.subtract(ops.cast(1, new.dtype), m))
            m, rest = factors[(g, new.dtype)]
            # m * new + (1 - m) * old: exactly `old` for m = 0 and exactly `new` for
            # m = 1 (finite values), with no per-element select (slow on TF's CPU executor).
            v.assign(ops.add(ops.multiply(m, new), ops.multiply(rest, old)))


def layer_rates(
    model,
    rules: Optional[Rules] = None,
    *,
    groups: Union[None, Selection, Sequence[Selection]] = None,
    decay: Optional[float] = None,
    spread: Optional[tuple] = None,
    verbose: bool = True,
):
    """Decorate `model` with learning-rate multipliers per group; returns `model`.

    Call it before or after `compile`. Calling it again replaces the previous
    decoration. See the module docstring for groups, order and patterns.

    Args:
        model: a Keras model.
        rules: ``{pattern: multiplier}`` (or a list of pairs); first match wins.
        groups: explicit groups bottom first (patterns, callables, or one
            pattern with a capturing group); default: depth groups.
        decay: layer-wise decay in (0, 1]: top group 1, each group below
            ``decay`` times the one above.
        spread: ``(lo, hi)``: geometric from ``lo`` (bottom) to ``hi`` (top).
        verbose: print the table of resolved multipliers (when the model is
            built; otherwise they resolve when `fit` starts).

    Returns:
        The same model, decorated.

    Example:

    >>> import numpy as np, keras, kerascool
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="body"),
    ...                           keras.layers.Dense(1, name="head")])
    >>> model = kerascool.layer_rates(model, decay=0.5, verbose=False)
    >>> kerascool.current_layer_rates(model)
    {'body': 0.5, 'head': 1.0}
    >>> model.compile(optimizer="adam", loss="mse")
    >>> _ = model.fit(np.ones((8, 4)), np.ones((8, 1)), verbose=0)
    """
    if rules is not None and (groups is not None or decay is not None or spread is not None):
        raise ValueError(
            "Pass either `rules` (a multiplier per pattern) or the group form (`groups`, `decay`, `spread`), "
            f"not both. Received: rules={rules!r}, groups={groups!r}, decay={decay!r}, spread={spread!r}"
        )
    if decay is not None and spread is not None:
        raise ValueError(f"Pass `decay` or `spread`, not both. Received: decay={decay!r}, spread={spread!r}")
    rule_items = None if rules is None else _rule_items(rules)
    decay = None if decay is None else _check_decay(decay)
    spread = None if spread is None else _check_spread(spread)
    hook = LayerRates(rule_items, groups, decay, spread)
    variables = list(model.trainable_variables)
    if variables:  # built: resolve now, so that bad patterns fail here with the model untouched
        if getattr(model, "optimizer", None) is not None:
            hook.check(model, variables)
        else:
            hook.resolve(model, variables)

    installation = _core.installation_of(model)
    for old in [h for h in installation.decorations if isinstance(h, LayerRates)]:
        installation.undecorate(old)
    installation.decorate(hook)
    if verbose:
        if variables:
            print(layer_rate_table(model))
        else:
            print(f"layer_rates: model {model.name!r} is not built yet; groups resolve when `fit` starts "
                  "(see kerascool.layer_rate_table(model)).")
    return model


def layer_rates_of(model) -> LayerRates:
    """The `LayerRates` hook of a decorated model; ValueError if there is none."""
    installation = _core.installation_of(model, create=False)
    found = [h for h in (installation.decorations if installation else []) if isinstance(h, LayerRates)]
    if not found:
        raise ValueError(
            f"Model {getattr(model, 'name', model)!r} has no layer rates. Decorate it first: "
            "`kerascool.layer_rates(model, ...)`."
        )
    hook = found[0]
    if hook._resolved_for is None:
        variables = list(model.trainable_variables)
        if not variables:
            raise ValueError(f"Model {model.name!r} is not built yet: its layer-rate groups are not known.")
        hook.resolve(model, variables)
    return hook


def multipliers_of(model, hook: LayerRates):
    """The multipliers variable of `hook` on `model`'s current optimizer, or None."""
    installation = _core.installation_of(model, create=False)
    state = None if installation is None else installation.state_of(hook)
    optimizer = getattr(model, "optimizer", None)
    if state is None or optimizer is None or installation.optimizer is not _keras.inner_optimizer(optimizer):
        return None
    return state["multipliers"]


def current_layer_rates(model) -> dict:
    """``{group name: multiplier in force}``, bottom group first."""
    hook = layer_rates_of(model)
    multipliers = multipliers_of(model, hook)
    if multipliers is None:  # not built yet, or re-compiled: the next fit starts from the decorated values
        return dict(zip(hook.group_names, hook.base))
    _keras.sync_state(model)
    values = ops.convert_to_numpy(multipliers.value).tolist()
    return dict(zip(hook.group_names, [float(v) for v in values]))


def layer_rate_table(model) -> str:
    """The resolved multiplier of every trainable variable, as a text table."""
    hook = layer_rates_of(model)
    values = list(current_layer_rates(model).values())
    n = len(hook.group_names)
    rows = [("variable", "shape", "group", "depth", "multiplier")]
    for path, shape, g in hook.paths:
        if g is None:
            rows.append((path, str(shape), "-", "-", "1 (no group)"))
        else:
            rows.append((path, str(shape), hook.group_names[g], str(n - 1 - g), f"{values[g]:.6g}"))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    title = f"Layer rates of {model.name!r}: {n} group(s), depth 0 = top"
    return "\n".join([title] + lines)

