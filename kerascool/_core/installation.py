"""`Installation`: everything kerascool puts on one model, owned by one object.

Per model, one `Installation` holds:

- the features: decorations (``layer_rates``, ``sam``...: until `uninstall`),
  and the hooks of the callbacks of the running ``fit`` (transient);
- their state: optimizer variables (the only place the compiled JAX step
  threads through and checkpoints save), keyed by the hook's ``state_key``,
  so a new callback instance in every ``fit`` reuses the state of the one
  before instead of adding a copy; log slots (one variable per logged key);
- the instance attributes it shadows, each recorded with what it replaced:
  ``optimizer.apply`` (the hooks run inside it), ``train_step`` (train-step
  work and the logs' one way out of the step), ``make_train_function`` /
  ``make_test_function`` / ``make_predict_function`` (a ``fit`` starts at
  the first; the others end an ``evaluate``/``predict`` callback set-up),
  the train function's guard, and whatever a feature adds (swap guards of
  ``evaluate``/``predict``/``save``). No Keras class is ever patched.

Installation is transactional: hooks are checked before anything is
created, state is created eagerly when ``fit`` starts (or, for a model Keras
builds lazily, right before the first step, from the first batch's spec), and
an exception while installing or tracing the step removes what this ``fit``
created, writes JAX's in-flight state back into the variables and detaches
the callbacks' hooks. `uninstall` undoes everything.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import keras
from keras import ops

from kerascool import _keras, distribution
from kerascool._core.hook import STAGES, StateFactory, StepContext, StepHook

_MISSING = object()


@dataclass(frozen=True)
class Installed:
    """What kerascool has installed on a model (`kerascool.installed`).

    Attributes:
        features: active feature names, in the order their hooks run.
        hooks: ``(stage, feature)`` pairs in execution order.
        variables: names of the state variables kerascool added to the optimizer.
        patches: the instance attributes kerascool shadows (``owner.name``).
    """

    features: tuple = ()
    hooks: tuple = ()
    variables: tuple = ()
    patches: tuple = ()

    def __bool__(self) -> bool:
        return bool(self.features or self.variables or self.patches)

    def __str__(self) -> str:
        if not self:
            return "kerascool: nothing installed"
        lines = ["kerascool installation:"]
        lines.append("  hooks: " + (", ".join(f"{s}:{f}" for s, f in self.hooks) or "-"))
        lines.append(f"  state variables: {len(self.variables)}")
        lines.append("  patches: " + ", ".join(self.patches))
        return "\n".join(lines)


@dataclass
class _Slot:
    layout: tuple
    value: object
    variables: list


class Installation:
    """Everything kerascool installs on one model (see the module docstring)."""

    def __init__(self, model):
        self._model = weakref.ref(model)
        self.decorations: list[StepHook] = []
        self.transient: list[StepHook] = []
        self.pending: list = []  # callbacks given the model, awaiting fit's make_train_function
        self.optimizer = None
        self.steps: Optional[keras.Variable] = None
        self.states: dict[str, _Slot] = {}
        self._keys: dict = {}  # hook -> its state key on this model (held strongly: no recycled ids)
        self.log_slots: dict[str, keras.Variable] = {}
        self._variables: list = []  # every variable we added to `optimizer`, in creation order
        self._created_in_fit: list = []
        self._patches: list[tuple] = []  # (owner, name, previous instance attribute or _MISSING)
        self._uninstall_callbacks: list[Callable] = []
        self._traced_with: list = []
        self._proven: list = []  # decorations that completed a train step (kept after an error)
        self._needs_build = False
        self._after_build: list = []
        self._fit_iterations: Optional[int] = None
        self._local = threading.local()  # per thread: MirroredStrategy traces replicas in threads
        self.trace_count = 0
        self._shadow_model(model)

    @property
    def model(self):
        return self._model()

    # -- features --------------------------------------------------------------
    @property
    def hooks(self) -> list:
        """Active hooks in execution order (by stage, then installation order)."""
        hooks = list(self.decorations) + [h for h in self.transient if h not in self.decorations]
        return sorted(hooks, key=lambda h: STAGES.index(h.stage))

    def decorate(self, hook: StepHook) -> None:
        """Add a decoration (idempotent); the next fit retraces with it.

        On a model whose optimizer is built (a loaded model) the state is
        built now, so that a `load_weights` right after finds it.
        """
        if hook in self.decorations:
            return
        if getattr(self.model, "optimizer", None) is not None:
            distribution.check_supported(self.model)  # where stock fit fails: say so now
        self.decorations.append(hook)
        self.model.train_function = None
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and _keras.inner_optimizer(optimizer).built:
            self._created_in_fit = []
            try:
                self.prepare([hook])
            except BaseException:
                self.decorations.remove(hook)
                raise

    def undecorate(self, hook: StepHook) -> None:
        if hook in self.decorations:
            self.decorations.remove(hook)
            self.model.train_function = None

    def expect(self, callback) -> None:
        """A callback got the model: its hooks join the next fit (not evaluate/predict)."""
        if callback not in self.pending:
            self.pending.append(callback)

    def release(self, callback) -> None:
        """The callback's fit ended: its hooks leave (their state stays)."""
        hooks = callback.step_hooks()
        self.transient = [h for h in self.transient if h not in hooks]

    def when_built(self, fn: Callable) -> None:
        """Run ``fn()`` now, or right after this fit's state is built (a model Keras builds lazily)."""
        if self._needs_build:
            self._after_build.append(fn)
        else:
            fn()

    def key_of(self, hook: StepHook) -> str:
        """The state key of `hook` here: its own, numbered when another active hook has it."""
        key = self._keys.get(hook)
        if key is None:
            taken = {self._keys.get(h) for h in self.hooks if h is not hook}
            key, n = hook.state_key(), 1
            while key in taken:
                key, n = f"{hook.state_key()}_{n}", n + 1
            self._keys[hook] = key
        return key

    def state_of(self, hook: StepHook):
        """The state of `hook` on this model, or None before it was built."""
        slot = self.states.get(self.key_of(hook))
        return None if slot is None else slot.value

    def report(self) -> Installed:
        hooks = self.hooks
        return Installed(
            features=tuple(h.name for h in hooks),
            hooks=tuple((h.stage, h.name) for h in hooks),
            variables=tuple(v.name for v in self._variables),
            patches=tuple(f"{_owner_name(owner)}.{name}" for owner, name, _ in self._patches),
        )

    # -- state -----------------------------------------------------------------
    def add_variable(self, name, shape, dtype, initializer) -> keras.Variable:
        var = self.optimizer.add_variable(shape=tuple(shape), dtype=dtype, initializer=initializer, name=name)
        self._variables.append(var)
        self._created_in_fit.append(var)
        return var

    def log_slot(self, name: str) -> None:
        if name not in self.log_slots:
            self.log_slots[name] = self.add_variable(f"kerascool_log_{len(self.log_slots)}", (), "float32", "zeros")

    def write_log(self, name: str, value) -> None:
        slot = self.log_slots.get(name)
        if slot is None:
            raise RuntimeError(f"kerascool: the log key {name!r} was not declared with `state.log_slot` in `build`.")
        slot.assign(ops.cast(value, "float32"))
        logged = getattr(self._local, "logged", None)
        if logged is not None and name not in logged:
            logged.append(name)

    def remove_variables(self, variables: Sequence) -> None:
        if not variables or self.optimizer is None:
            return
        gone = {id(v) for v in variables}
        _keras.remove_optimizer_variables(self.optimizer, variables)
        self._variables = [v for v in self._variables if id(v) not in gone]
        self._created_in_fit = [v for v in self._created_in_fit if id(v) not in gone]
        self.log_slots = {k: v for k, v in self.log_slots.items() if id(v) not in gone}
        if self.steps is not None and id(self.steps) in gone:
            self.steps = None
        for key in [k for k, s in self.states.items() if any(id(v) in gone for v in s.variables)]:
            del self.states[key]

    def ready(self) -> bool:
        """Whether state can be created now (Keras has built, or can build, the optimizer)."""
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None:
            return False
        if _keras.inner_optimizer(optimizer).built:
            return True
        return all(layer.built for layer in _keras.flatten_layers(model)) and bool(model.trainable_variables)

    def prepare(self, hooks: Sequence[StepHook]) -> None:
        """Check `hooks`, build the optimizer and the hooks' state (reused by key). All or nothing."""
        model = self.model
        distribution.check_supported(model)
        optimizer = _keras.inner_optimizer(model.optimizer)
        if optimizer is not self.optimizer:
            self._adopt(optimizer)
        variables = _keras.trainable_variables_of(optimizer) if optimizer.built else list(model.trainable_variables)
        for hook in hooks:
            hook.check(model, variables)
        created, states = len(self._created_in_fit), dict(self.states)
        replaced = []
        try:
            with _keras.strategy_scope(model):
                if not optimizer.built:
                    model.optimizer.build(model.trainable_variables)
                variables = _keras.trainable_variables_of(optimizer)
                if self.steps is None:
                    self.steps = self.add_variable("kerascool_steps", (), "int32", "zeros")
                shapes = tuple((tuple(v.shape), str(v.dtype)) for v in variables)
                for hook in hooks:
                    key, layout = self.key_of(hook), (type(hook).__name__, hook.layout(model, variables), shapes)
                    slot = self.states.get(key)
                    if slot is None or slot.layout != layout:
                        first = len(self._variables)
                        value = hook.build(model, variables, StateFactory(self, f"kerascool_{key}"))
                        logs = {id(v) for v in self.log_slots.values()}
                        own = [v for v in self._variables[first:] if id(v) not in logs]
                        if slot is not None:
                            replaced.append(slot)
                        self.states[key] = slot = _Slot(layout, value, own)
                    hook.start(model, slot.value)
        except BaseException:
            self.states = states
            self.remove_variables(self._created_in_fit[created:])
            raise
        for old in replaced:
            self.remove_variables(old.variables)

    def _adopt(self, optimizer) -> None:
        """A new optimizer (a re-compile): state starts again on it."""
        self._patches = [p for p in self._patches if not _restore_if(p, lambda owner: owner is self.optimizer)]
        self.optimizer, self.steps = optimizer, None
        self.states, self.log_slots, self._variables, self._created_in_fit = {}, {}, [], []
        self.shadow(optimizer, "apply", _hooked_apply(self, optimizer, optimizer.apply))

    # -- shadows ---------------------------------------------------------------
    def shadow(self, owner, name: str, fn) -> None:
        """Shadow ``owner.name`` with `fn` (an instance attribute), undone by `uninstall`."""
        previous = owner.__dict__.get(name, _MISSING)
        object.__setattr__(owner, name, fn)
        self._patches.append((owner, name, previous))

    def on_uninstall(self, fn: Callable) -> None:
        self._uninstall_callbacks.append(fn)

    def _shadow_model(self, model) -> None:
        make_train, make_test, make_predict = (
            model.make_train_function,
            model.make_test_function,
            model.make_predict_function,
        )
        original_step = model.train_step

        def make_train_function(force=False):
            force = self._start_fit() or force
            made = make_train(force=force)
            self._guard_train_function()
            return made

        def make_test_function(force=False):
            self.pending = []  # evaluate's callbacks: none of them trains
            return make_test(force=force)

        def make_predict_function(force=False):
            self.pending = []
            return make_predict(force=force)

        self.shadow(model, "make_train_function", make_train_function)
        self.shadow(model, "make_test_function", make_test_function)
        self.shadow(model, "make_predict_function", make_predict_function)
        self._original_train_step = original_step
        self._set_train_step()

    def _set_train_step(self) -> None:
        # A new function object at every trace: jax.jit caches traces by the
        # function's identity, and would bring back a trace made with other hooks.
        installation = self

        def train_step(*args):
            return installation._train_step(args)

        model = self.model
        if any(owner is model and name == "train_step" for owner, name, _ in self._patches):
            object.__setattr__(model, "train_step", train_step)
        else:
            self.shadow(model, "train_step", train_step)

    # -- fit -------------------------------------------------------------------
    def _start_fit(self) -> bool:
        """At fit's make_train_function: install this fit's hooks. True: retrace."""
        model = self.model
        callbacks, self.pending = self.pending, []
        self.transient = []  # left by a fit that an exception ended before on_train_end
        self._created_in_fit, self._needs_build, self._after_build = [], False, []
        swaps = _model_swaps(model)
        if swaps is not None and swaps.active:
            raise RuntimeError(
                f"model.fit was called inside an open weight swap ({', '.join(s.name for s in swaps.active)} "
                "averages are in the model): training there would be discarded when the block ends. Leave the "
                "`with ...swapped():` block first, and train outside it."
            )
        hooks: list = []
        for callback in callbacks:
            callback._check_model(model)
            hooks += [h for h in callback.step_hooks() if h not in hooks]
        self.transient = hooks
        active = self.hooks
        self._keys = {h: k for h, k in self._keys.items() if h in self.decorations}
        for hook in active:
            self.key_of(hook)
        try:
            if active and self.ready():
                self.prepare(active)
            elif active:
                self._needs_build = True  # TF builds this model in the first trace: build before it
        except BaseException:
            self._roll_back()
            raise
        self._fit_iterations = self._iterations()
        changed = len(active) != len(self._traced_with) or any(a is not b for a, b in zip(active, self._traced_with))
        if changed or model.__dict__.get("train_function") is None:
            # Keras traces anew (other hooks, or a re-compile): a new train_step object, so that
            # jax.jit does not bring back a trace made for another optimizer or other hooks.
            self._traced_with = active
            self._set_train_step()
        return changed

    def _iterations(self) -> Optional[int]:
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None or not optimizer.built:
            return None
        return int(_keras.host_copy(optimizer.iterations))

    def _guard_train_function(self) -> None:
        model = self.model
        inner = model.__dict__.get("train_function")
        if inner is None or getattr(inner, "_kerascool_guard", False) or not self.hooks:
            return
        installation = self

        def train_function(*args):
            if installation._needs_build:
                installation._build_from(args)
            try:
                result = inner(*args)
            except BaseException:
                installation._recover(args)
                raise
            if len(installation._proven) != len(installation.decorations):
                installation._proven = list(installation.decorations)
            return result

        train_function._kerascool_guard = True
        model.train_function = train_function

    def _build_from(self, args) -> None:
        self._needs_build = False
        model = self.model
        try:
            if not self.ready():
                spec = _keras.first_batch_spec(args)
                if spec is None:
                    raise ValueError(
                        f"kerascool cannot build model {model.name!r} before its first step: the spec of the "
                        "training data is unknown. Build the model first, e.g. `model(x[:1])` or `keras.Input`."
                    )
                with _keras.strategy_scope(model):
                    _keras.symbolic_build(model, spec)
            self.prepare(self.hooks)
            self._fit_iterations = self._iterations()
            pending, self._after_build = self._after_build, []
            for fn in pending:
                fn()
        except BaseException:
            self._roll_back()
            model.train_function = None
            raise

    def _recover(self, args) -> None:
        """An exception in the train function: nothing is lost, and stock fit works after."""
        model = self.model
        if _keras.backend() == "jax" and args:
            _keras.restore_jax_state(model, args[0])
        started = self._fit_iterations
        self._traced_with = []
        model.train_function = None
        if started is None or self._iterations() == started:
            self.remove_variables(list(self._created_in_fit))  # no step ran: as before this fit
            self._roll_back()
        else:
            self.transient = []

    def _roll_back(self) -> None:
        """This fit's installation failed: its hooks go, so do decorations that never trained."""
        self.transient = []
        self.decorations = [d for d in self.decorations if d in self._proven]
        if not self.decorations and not self._variables:
            self.uninstall()  # nothing of kerascool is left: the model is as it was

    def _train_step(self, args):
        model = self.model
        hooks = self.hooks
        if not hooks:
            return self._original_train_step(*args)
        data, step_state = _keras.train_step_data(args)
        self._local.logged = []
        before = [h for h in hooks if h.before_step is not None]
        after = [h for h in hooks if h.after_step is not None]
        if before:
            step_state = _keras.run_on_state(
                model, step_state, [lambda m, h=h: h.before_step(m, self.state_of(h)) for h in before]
            )
        with contextlib.ExitStack() as stack:
            for h in hooks:
                if h.around_step is not None:
                    stack.enter_context(h.around_step(model, data, step_state, self.state_of(h)))
            if step_state is None:
                logs = self._original_train_step(data)
            else:
                logs, step_state = self._original_train_step(step_state, data)
        if after:
            step_state = _keras.run_on_state(
                model, step_state, [lambda m, h=h: h.after_step(m, self.state_of(h)) for h in after]
            )
        logs = self._with_logs(logs, step_state)
        return logs if step_state is None else (logs, step_state)

    def _with_logs(self, logs, step_state):
        """The one way out of the step for logged values: read from their slots after the step.

        Read after the whole step (outside LossScaleOptimizer's branch, where
        they were written): TF reads the variables, JAX the step's new state.
        """
        names, self._local.logged = list(getattr(self._local, "logged", None) or []), None
        if not names or not isinstance(logs, dict):
            return logs
        logs = dict(logs)
        if step_state is None:
            for name in names:
                logs[name] = _keras.snapshot(self.log_slots[name].value)  # a tensor, not the variable (eager TF)
            return logs
        index = {id(v): i for i, v in enumerate(self.model.optimizer.variables)}
        for name in names:
            logs[name] = step_state[2][index[id(self.log_slots[name])]]
        return logs

    # -- removal ---------------------------------------------------------------
    def uninstall(self) -> None:
        model = self.model
        for fn in reversed(self._uninstall_callbacks):
            fn()
        self._uninstall_callbacks = []
        if self.optimizer is not None:
            _keras.remove_optimizer_variables(self.optimizer, self._variables)
        for patch in reversed(self._patches):
            _restore(patch)
        self._patches = []
        self.decorations, self.transient, self.pending = [], [], []
        self.states, self.log_slots, self._variables = {}, {}, []
        self.steps, self.optimizer = None, None
        if model is not None:
            model.train_function = None
            _INSTALLATIONS.pop(model, None)


def _hooked_apply(installation: Installation, optimizer, original: Callable) -> Callable:
    def apply(grads, trainable_variables=None):
        hooks = installation.hooks
        if not hooks:
            return original(grads, trainable_variables)
        states = {}
        for hook in hooks:
            if installation.key_of(hook) not in installation.states:
                raise RuntimeError(
                    f"kerascool: the state of {hook.name!r} was not built before the step was traced "
                    "(the optimizer was called outside fit). Use fit, or `kerascool.uninstall(model)`."
                )
            states[id(hook)] = installation.state_of(hook)
        installation.trace_count += 1
        variables = list(trainable_variables) if trainable_variables is not None else _keras.trainable_variables_of(optimizer)
        grads = [_keras.densify(g) for g in grads]
        ctx = StepContext(installation, variables, optimizer)

        # A static loss_scale_factor is removed inside `apply`; hooks see true gradients.
        scale = optimizer.loss_scale_factor
        if scale is not None:
            grads = [None if g is None else g / scale for g in grads]
        replicas = _keras.replica_count()
        if replicas > 1:
            grads = _keras.all_reduce_sum(grads)
        for hook in hooks:
            grads = hook.before_update(grads, variables, states[id(hook)], ctx)
        if replicas > 1:
            grads = [None if g is None else g / replicas for g in grads]
        if scale is not None:
            grads = [None if g is None else g * scale for g in grads]

        if any(h.needs_old_values for h in hooks):
            ctx.old_values = [_keras.snapshot(v.value) for v in variables]
        # Keras's own gradient_accumulation_steps: only every k-th apply updates.
        keras_update = _keras.accumulation_update_flag(optimizer)
        result = None
        if ctx.applied is None:
            result = original(grads, trainable_variables)
        else:
            # Vetoed step: weights and optimizer state keep their exact old values.
            ours = {id(v) for v in installation._variables}
            own = [v for v in optimizer.variables if id(v) not in ours]
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
        installation.steps.assign_add(1 if ctx.applied is None else ops.cast(ctx.applied, "int32"))

        for hook in hooks:
            hook.after_update(variables, states[id(hook)], ctx)
        return result

    apply._kerascool = True
    return apply


def _owner_name(owner) -> str:
    if isinstance(owner, keras.optimizers.Optimizer):
        return "optimizer"
    return "model"


def _restore(patch) -> None:
    owner, name, previous = patch
    if previous is _MISSING:
        owner.__dict__.pop(name, None)
    else:
        object.__setattr__(owner, name, previous)


def _restore_if(patch, predicate) -> bool:
    if predicate(patch[0]):
        _restore(patch)
        return True
    return False


def _model_swaps(model):
    from kerascool import swap

    return swap.swaps_if_any(model)


_INSTALLATIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def installation_of(model, create: bool = True) -> Optional[Installation]:
    """The model's installation, created on first use (or None with ``create=False``)."""
    installation = _INSTALLATIONS.get(model)
    if installation is None and create:
        if not isinstance(model, keras.Model):
            raise TypeError(f"Expected a keras.Model. Received: model={model!r}")
        installation = _INSTALLATIONS[model] = Installation(model)
    return installation


def installed(model) -> Installed:
    """What kerascool has installed on `model`: features, hooks in order, state, patches.

    >>> import keras, kerascool
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> bool(kerascool.installed(model))
    False
    >>> kerascool.installed(kerascool.sam(model)).hooks
    (('gradient', 'two_step'),)
    """
    installation = _INSTALLATIONS.get(model)
    return Installed() if installation is None else installation.report()


def uninstall(model) -> None:
    """Remove everything kerascool installed on `model`; idempotent.

    Decorations, callback hooks, state variables (removed from the
    optimizer), swap guards and shadowed methods all go: a later ``fit``
    behaves as on a model kerascool never touched.
    """
    installation = _INSTALLATIONS.get(model)
    if installation is not None:
        installation.uninstall()


def real_steps(model) -> int:
    """Number of real optimizer updates made under kerascool hooks."""
    installation = _INSTALLATIONS.get(model)
    if installation is None or installation.steps is None:
        return 0
    _keras.sync_state(model)
    return int(_keras.host_copy(installation.steps))
