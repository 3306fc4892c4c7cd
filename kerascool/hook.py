"""The step hook: the one mechanism that puts per-step work into `fit`'s compiled step.

Every kerascool feature is a `StepHook`. The hooks of a model live in one
`HookRegistry`, which wraps `apply` on the model's optimizer INSTANCE (the
inner one under mixed precision). `apply` is the one method that every
backend's compiled train step reaches (TF `apply_gradients`, JAX
`stateless_apply`), so the wrapper runs once per trace and its work is part
of the compiled step: no Python runs per batch.

Order within one step:

1. ``before_update`` of each hook, by ascending ``order``: gradient work
   (accumulation, transforms, clipping). A hook may veto the update with
   ``ctx.skip_unless(pred)``.
2. the user's stock optimizer (`apply`), applied only where no hook vetoed it:
   on a vetoed step, weights and optimizer state keep their old values exactly.
   The veto is a real branch (`jax.lax.cond`, `tf.cond`): a vetoed step skips
   the optimizer's work (under a TF distribution strategy, whose update is a
   `merge_call`, the update is computed and discarded instead);
3. the shared counter of real updates, ``registry.steps``, moves by one
   (only on real updates);
4. ``after_update`` of each hook, by ascending ``order``: work on the updated
   variables (layer rates rescale the update, then averages such as the EMA).

State lives in optimizer variables (``HookState.variable``): the JAX trainer
threads them through its compiled step, and checkpoints and
`BackupAndRestore` save and restore them with the optimizer.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Optional, Sequence

import keras
from keras import ops

from kerascool import _keras, distribution

# Conventional orders; hooks run by ascending order in each phase.
ACCUMULATE = 10  # before: gradient accumulation collects micro-batches first
TRANSFORM = 50  # before: gradient transforms
RESCALE = 10  # after: layer-rate multipliers rescale the optimizer's update
AVERAGE = 50  # after: EMA, SWA, Lookahead read the final weights


class StepContext:
    """What a hook sees during one (traced) train step."""

    def __init__(self, registry: "HookRegistry", variables: list):
        self.registry = registry
        self.variables = variables
        self.step = _keras.snapshot(registry.steps.value)  # real updates so far
        self.applied = None  # None: always applied; else a bool tensor
        self.old_values: Optional[list] = None  # weights before the update

    def skip_unless(self, pred) -> None:
        """Apply the optimizer update only where `pred` (a bool tensor) holds."""
        pred = ops.cast(pred, "bool")
        self.applied = pred if self.applied is None else ops.logical_and(self.applied, pred)

    def where_applied(self, new, old):
        """`new` on a real update, `old` on a skipped one."""
        if self.applied is None:
            return new
        return ops.where(self.applied, new, old)

    def log(self, name: str, value) -> None:
        """Show `value` under `name` in this step's logs (progress bar, History)."""
        self.registry._pending.logs[name] = value


class HookState:
    """Creates a hook's state as variables of the model's optimizer."""

    def __init__(self, registry: "HookRegistry", prefix: str):
        self._registry = registry
        self._prefix = prefix

    def variable(self, name: str, shape=(), dtype=None, initializer="zeros") -> keras.Variable:
        return self._registry._add_variable(f"{self._prefix}_{name}", shape, dtype, initializer)

    def like(self, reference: keras.Variable, name: str) -> keras.Variable:
        """A new variable shaped and typed like `reference`, holding a copy of it."""
        var = self._registry._add_variable(
            f"{self._prefix}_{name}", reference.shape, reference.dtype, "zeros"
        )
        var.assign(_keras.snapshot(reference.value))
        return var


class StepHook:
    """Per-step work inside the compiled train step. Subclass and override.

    ``build`` runs eagerly once per optimizer to create state through
    ``state``; the other two run at trace time and must use `keras.ops` only.
    """

    order: int = TRANSFORM
    needs_old_values: bool = False  # ask for ctx.old_values (costs a copy of the weights)
    name: str = "hook"

    def check(self, model, variables: list) -> None:
        """Raise on bad input before anything is created (model left untouched)."""

    def build(self, model, variables: list, state: HookState) -> None:
        """Create state. `variables` are the trainable variables in gradient order."""

    def before_update(self, grads: list, variables: list, ctx: StepContext) -> list:
        return grads

    def after_update(self, variables: list, ctx: StepContext) -> None:
        pass


class HookRegistry:
    """All hooks of one model, and the wrapper that runs them in `apply`."""

    def __init__(self, model):
        self._model_ref = weakref.ref(model)
        self.hooks: list[StepHook] = []
        self._transient: set[int] = set()
        self.optimizer = None
        self.steps: Optional[keras.Variable] = None
        self._built: set[int] = set()
        self._state_ids: set[int] = set()
        # Per thread: MirroredStrategy traces each replica's step in its own thread.
        self._pending = threading.local()
        self.trace_count = 0
        self._retracing = False
        self._patch_model(model)

    # -- installation ---------------------------------------------------------
    @property
    def model(self):
        return self._model_ref()

    def attach(self, hook: StepHook, transient: bool = False) -> None:
        """Add `hook` (idempotent). Transient hooks belong to one `fit` call."""
        if hook not in self.hooks:
            self.hooks.append(hook)
        if transient:
            self._transient.add(id(hook))
        # An uncompiled model has no `optimizer` attribute yet (decoration before compile).
        if getattr(self.model, "optimizer", None) is not None and getattr(self.model, "compiled", False):
            self.prepare([hook])

    def detach(self, hook: StepHook) -> None:
        """Remove `hook` (idempotent); its state stays in the optimizer."""
        if hook in self.hooks:
            self.hooks.remove(hook)
            self.model.train_function = None  # the next fit retraces without it
        self._transient.discard(id(hook))

    def retrace(self) -> None:
        """Make fit use a newly traced train function (after attaching hooks)."""
        self._retracing = True
        try:
            self.model.make_train_function(force=True)
        finally:
            self._retracing = False

    def detach_transient(self) -> bool:
        stale = [h for h in self.hooks if id(h) in self._transient]
        for hook in stale:
            self.detach(hook)
        return bool(stale)

    def prepare(self, hooks: Sequence[StepHook]) -> None:
        """Wrap the current optimizer's `apply` and build the state of `hooks`.

        Idempotent; a new optimizer (after a re-compile) gets fresh state.
        """
        model = self.model
        # Engines where stock fit fails raise here, before anything is created.
        distribution.check_supported(model)
        optimizer = _keras.inner_optimizer(model.optimizer)
        variables = list(model.trainable_variables)
        for hook in hooks:
            hook.check(model, variables)
        if optimizer is not self.optimizer:
            self.optimizer, self.steps = optimizer, None
            self._built, self._state_ids = set(), set()
        with _keras.strategy_scope(model):
            if not optimizer.built:
                model.optimizer.build(model.trainable_variables)
            if self.steps is None:
                self.steps = self._add_variable("kerascool_steps", (), "int32", "zeros")
            if not getattr(optimizer.apply, "_kerascool", False):
                optimizer.apply = _make_hooked_apply(self, optimizer.apply)
            variables = _keras.trainable_variables_of(optimizer)
            for hook in hooks:
                if id(hook) not in self._built:
                    hook.build(model, variables, HookState(self, f"kerascool_{hook.name}"))
                    self._built.add(id(hook))

    def _add_variable(self, name, shape, dtype, initializer) -> keras.Variable:
        var = self.optimizer.add_variable(
            shape=tuple(shape), dtype=dtype, initializer=initializer, name=name
        )
        self._state_ids.add(id(var))
        return var

    def _patch_model(self, model) -> None:
        original_make = model.make_train_function
        original_metrics = model.compute_metrics
        registry = self

        def make_train_function(force=False):
            # A new `fit` starts here (before any on_train_begin): hooks that a
            # fit interrupted by an exception left behind are dropped.
            if not registry._retracing and registry.detach_transient():
                force = True
            if registry.hooks and getattr(model, "optimizer", None) is not None:
                registry.prepare(registry.hooks)
            if force or model.train_function is None:
                # JAX caches traces by function identity: a persistent train_step
                # wrapper (`_keras.add_step_work`) would bring back an older trace.
                _keras.fresh_train_step(model)
            return original_make(force=force)

        def compute_metrics(*args, **kwargs):
            logs = original_metrics(*args, **kwargs)
            pending = getattr(registry._pending, "logs", None)
            if pending:  # filled at trace time by ctx.log in this train step
                logs = dict(logs)
                logs.update(pending)
                registry._pending.logs = {}
            return logs

        # Instance attributes shadow the class methods; Keras's trainers call
        # both through `self`, so this reaches every backend's fit.
        object.__setattr__(model, "make_train_function", make_train_function)
        object.__setattr__(model, "compute_metrics", compute_metrics)


def _make_hooked_apply(registry: HookRegistry, original: Callable) -> Callable:
    optimizer = registry.optimizer

    def apply(grads, trainable_variables=None):
        hooks = sorted(registry.hooks, key=lambda h: h.order)
        if not hooks:
            return original(grads, trainable_variables)
        registry.trace_count += 1
        variables = (
            list(trainable_variables)
            if trainable_variables is not None
            else _keras.trainable_variables_of(optimizer)
        )
        grads = [_keras.densify(g) for g in grads]
        registry._pending.logs = {}
        ctx = StepContext(registry, variables)

        # A static loss_scale_factor is removed inside `apply`; hooks see true gradients.
        scale = optimizer.loss_scale_factor
        if scale is not None:
            grads = [None if g is None else g / scale for g in grads]
        replicas = _keras.replica_count()
        if replicas > 1:
            grads = _keras.all_reduce_sum(grads)
        for hook in hooks:
            grads = hook.before_update(grads, variables, ctx)
        if replicas > 1:
            grads = [None if g is None else g / replicas for g in grads]
        if scale is not None:
            grads = [None if g is None else g * scale for g in grads]

        if any(h.needs_old_values for h in hooks):
            ctx.old_values = [_keras.snapshot(v.value) for v in variables]
        # Keras's own gradient_accumulation_steps: only every k-th apply updates.
        keras_update = _keras.accumulation_update_flag(optimizer)
        if ctx.applied is None:
            result = original(grads, trainable_variables)
        else:
            # Vetoed step: weights and optimizer state keep their exact old values.
            own = [v for v in optimizer.variables if id(v) not in registry._state_ids]
            result = None
            # A real branch where possible: a vetoed step (accumulation micro-step) then costs nothing.
            if not _keras.apply_if(ctx.applied, lambda: original(grads, trainable_variables), list(variables) + own):
                if ctx.old_values is None:
                    ctx.old_values = [_keras.snapshot(v.value) for v in variables]
                old_own = [_keras.snapshot(v.value) for v in own]
                result = original(grads, trainable_variables)
                for v, old in zip(list(variables) + own, ctx.old_values + old_own):
                    v.assign(ops.where(ctx.applied, v.value, old))
        if keras_update is not None:
            # Not a veto (Keras's accumulators must keep this micro-step): only what counts as real.
            ctx.applied = keras_update if ctx.applied is None else ops.logical_and(ctx.applied, keras_update)
        if ctx.applied is not None:
            registry.steps.assign_add(ops.cast(ctx.applied, "int32"))
        else:
            registry.steps.assign_add(1)

        for hook in hooks:
            hook.after_update(variables, ctx)
        return result

    apply._kerascool = True
    return apply


_REGISTRIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def registry_for(model) -> HookRegistry:
    """The model's hook registry, created on first use."""
    registry = _REGISTRIES.get(model)
    if registry is None:
        registry = _REGISTRIES[model] = HookRegistry(model)
    return registry


def real_steps(model) -> int:
    """Number of real optimizer updates made under kerascool hooks."""
    registry = _REGISTRIES.get(model)
    if registry is None or registry.steps is None:
        return 0
    _keras.sync_state(model)
    return int(_keras.host_copy(registry.steps))


class HookCallback(keras.callbacks.Callback):
    """Base for callbacks whose work is a set of `StepHook`s during `fit`.

    State is built in `set_model` (before any `on_train_begin`, so that a
    `BackupAndRestore` listed anywhere restores it); hooks are attached for
    the duration of one `fit` and the train function is retraced then.
    """

    def step_hooks(self) -> Sequence[StepHook]:
        raise NotImplementedError

    def _check_model(self, model) -> None:
        """Raise before training starts when the model cannot take the hooks."""
        if not getattr(model, "compiled", False) or model.optimizer is None:
            raise ValueError(
                f"{type(self).__name__} needs a compiled model with an optimizer. "
                "Call `model.compile(optimizer=..., loss=...)` before `fit`."
            )

    def set_model(self, model) -> None:
        super().set_model(model)
        registry = registry_for(model)
        if getattr(model, "compiled", False) and model.optimizer is not None:
            # Build state now (attach happens at on_train_begin): BackupAndRestore
            # may load the optimizer in its on_train_begin, before ours.
            registry.prepare(self.step_hooks())

    def on_train_begin(self, logs=None) -> None:
        self._check_model(self.model)
        registry = registry_for(self.model)
        for hook in self.step_hooks():
            registry.attach(hook, transient=True)
        registry.retrace()

    def on_train_end(self, logs=None) -> None:
        registry = registry_for(self.model)
        for hook in self.step_hooks():
            registry.detach(hook)
