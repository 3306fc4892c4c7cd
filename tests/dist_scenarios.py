"""Distributed training scenarios, one engine per process (run by tests/test_distribution.py).

Devices must be configured before TensorFlow or JAX initialise, so every
engine runs in a fresh process, started with its own KERAS_BACKEND:

    python tests/dist_scenarios.py tf-mirrored clip ema    # MirroredStrategy, 2 logical CPU devices
    python tests/dist_scenarios.py jax-dp clip             # DataParallel, 2 forced host devices
    python tests/dist_scenarios.py jax-mp clip --process-id 0 --addresses 127.0.0.1:P0,127.0.0.1:P1
                                                           # one per process (process 0 coordinates)
    python tests/dist_scenarios.py tf-multiworker multiworker --process-id 0 --addresses ...  # the same

Each scenario trains the same tiny model twice in that process, once on one
device and once distributed with the same global batches, and reports the
numbers the tests check: differences between the two runs (weights, every
optimizer variable, hook state included, logs), the spread between the
replicas' copies of every variable, and a digest of the final state (equal in
every process of a multi-process run). The process prints one line
``DIST_RESULT <json>`` mapping each scenario to its numbers, or to
``{"error": <traceback>}``.

Scenarios: one per feature (`FEATURES`), plus ``skip_nonfinite``,
``clipnorm`` (Keras's own `clipnorm` against kerascool's), ``checkpoint_all``
(`BackupAndRestore` across engines), ``unsupported`` and ``multiworker``
(where stock fit fails), and ``crash``/``hang`` (for the launcher's tests).

`launch_processes` starts these processes from the tests, bounded in time;
when one process of a multi-process run dies, the others are killed and the
launch fails instead of hanging.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

MARKER = "DIST_RESULT "
ENGINES = ("tf-mirrored", "tf-multiworker", "jax-dp", "jax-mp")
BACKEND_OF = {"tf-mirrored": "tensorflow", "tf-multiworker": "tensorflow", "jax-dp": "jax", "jax-mp": "jax"}
HERE = os.path.dirname(os.path.abspath(__file__))

# One global batch of 8 rows, 4 steps per epoch; in a multi-process run each
# process feeds its half of every global batch.
ROWS, INPUTS, OUTPUTS, BATCH = 32, 4, 2, 8


# -- launching (runs in the test process: no TF/JAX imports here) -----------------------


class ScenarioError(RuntimeError):
    """A scenario process failed, died or ran past its time limit."""

    def __init__(self, message: str, processes: list):
        super().__init__(message)
        self.processes = processes  # the Popen objects, all ended


def _child_env(engine: str, workdir: str = "") -> dict:
    env = dict(os.environ)
    env["KERAS_BACKEND"] = BACKEND_OF[engine]
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONUNBUFFERED"] = "1"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if engine == "jax-dp":
        flags.append("--xla_force_host_platform_device_count=2")
    env["XLA_FLAGS"] = " ".join(flags)
    if engine.startswith("jax"):
        env["JAX_PLATFORMS"] = "cpu"
        if workdir:
            # Every fit builds a new model, hence a new jitted step: with a compilation
            # cache shared by the launch's processes, identical steps compile once.
            env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(workdir, "jax_cache")
            env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
            env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, chars: int = 4000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def _result_of(path: str) -> dict:
    with open(path, errors="replace") as f:
        lines = [line for line in f if line.startswith(MARKER)]
    if not lines:
        raise ValueError("no result line")
    return json.loads(lines[-1][len(MARKER):])


def _kill(processes: list) -> None:
    """End the processes we started (each leads its own process group), then reap them."""
    for p in processes:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    for p in processes:
        p.wait()


def launch_processes(engine: str, scenarios, timeout: float, num_processes: int = 1, stop=None) -> list:
    """Run `scenarios` on `engine` in `num_processes` processes; one result dict per process.

    Raises ScenarioError when a process exits with an error (the others are
    killed at once), when all have not finished within `timeout` seconds (all
    killed), when `stop` (a `threading.Event`) is set, or when a process
    prints no result. Logs and temporary files are removed in every case.
    """
    workdir = tempfile.mkdtemp(prefix="kerascool_dist_")
    processes, logs = [], []
    try:
        extra = []
        if num_processes > 1:
            addresses = ",".join(f"127.0.0.1:{free_port()}" for _ in range(num_processes))
            extra = ["--addresses", addresses]
        for i in range(num_processes):
            log = os.path.join(workdir, f"process{i}.log")
            logs.append(log)
            cmd = [sys.executable, os.path.join(HERE, "dist_scenarios.py"), engine, *scenarios, *extra,
                   "--process-id", str(i), "--workdir", workdir]
            with open(log, "w") as out:
                processes.append(subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, env=_child_env(engine, workdir), cwd=workdir,
                    start_new_session=True,
                ))
        deadline = time.monotonic() + timeout
        while True:
            codes = [p.poll() for p in processes]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                _kill(processes)
                i = failed[0]
                raise ScenarioError(
                    f"{engine}: process {i} of {num_processes} exited with code {codes[i]}; "
                    f"the others were stopped.\n--- process {i} log ---\n{_tail(logs[i])}",
                    processes,
                )
            if all(c == 0 for c in codes):
                break
            if stop is not None and stop.is_set():
                _kill(processes)
                raise ScenarioError(f"{engine}: stopped by the caller.", processes)
            if time.monotonic() > deadline:
                _kill(processes)
                raise ScenarioError(
                    f"{engine}: still running after {timeout:.0f} s, stopped.\n"
                    + "\n".join(f"--- process {i} log ---\n{_tail(log)}" for i, log in enumerate(logs)),
                    processes,
                )
            time.sleep(0.2)
        results = []
        for i, log in enumerate(logs):
            try:
                results.append(_result_of(log))
            except ValueError:
                raise ScenarioError(f"{engine}: process {i} printed no result.\n{_tail(log)}", processes)
        return results
    finally:
        _kill(processes)
        shutil.rmtree(workdir, ignore_errors=True)


# -- engines (in the scenario process) -------------------------------------------------


class Engine:
    """How to train distributed on one engine, and how to look inside its variables."""

    name = ""
    replicas = 1
    process_id = 0
    num_processes = 1

    def scope(self):
        """Context for creating, compiling and fitting the distributed model."""
        raise NotImplementedError

    def local(self, array, batch: int):
        """What this process feeds for global `array` in global batches of `batch` rows."""
        return array, batch

    def replica_values(self, variable) -> list:
        """This process's copies of `variable`, one per device."""
        raise NotImplementedError


class TFMirrored(Engine):
    name = "tf-mirrored"

    def __init__(self):
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        self.strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        self.replicas = self.strategy.num_replicas_in_sync

    def scope(self):
        return self.strategy.scope()

    def replica_values(self, variable):
        import numpy as np

        value = variable.value
        parts = getattr(value, "values", None) or (value,)
        return [np.array(p.numpy()) for p in parts]


class JAXDataParallel(Engine):
    name = "jax-dp"

    def __init__(self):
        import jax
        import keras

        self.distribution = keras.distribution.DataParallel(devices=jax.devices())
        self.replicas = len(jax.devices())

    def scope(self):
        return self.distribution.scope()

    def replica_values(self, variable):
        import numpy as np

        return [np.array(s.data) for s in variable.value.addressable_shards]


class JAXMultiProcess(JAXDataParallel):
    name = "jax-mp"

    def __init__(self, addresses: list, process_id: int):
        import jax

        num_processes = len(addresses)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=addresses[0], num_processes=num_processes, process_id=process_id,
            initialization_timeout=60,
        )
        super().__init__()
        # NumPy input: each process feeds its own part of every global batch.
        self.distribution.auto_shard_dataset = False
        self.process_id, self.num_processes = process_id, num_processes

    def replica_values(self, variable):
        import numpy as np

        # One device per process here; the digest compares the processes. (`addressable_shards`
        # fails on a value that an eager `assign` put on the mesh from a jax array, jax 0.10.2,
        # although computing with it and reading it work.)
        return [np.array(variable.value)]

    def local(self, array, batch):
        n = self.num_processes
        part = batch // n
        steps = len(array) // batch
        shaped = array[: steps * batch].reshape((steps, n, part) + array.shape[1:])
        return shaped[:, self.process_id].reshape((steps * part,) + array.shape[1:]), part


class TFMultiWorker(Engine):
    """TF MultiWorkerMirroredStrategy over processes on loopback: only to show where fit fails."""

    name = "tf-multiworker"

    def __init__(self, addresses: list, process_id: int):
        os.environ["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": process_id}}
        )
        import tensorflow as tf

        self.strategy = tf.distribute.MultiWorkerMirroredStrategy()
        self.replicas = self.strategy.num_replicas_in_sync
        self.process_id, self.num_processes = process_id, len(addresses)

    def scope(self):
        return self.strategy.scope()


# -- training helpers -------------------------------------------------------------------


def data():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, INPUTS)).astype("float32")
    y = (x @ rng.normal(size=(INPUTS, OUTPUTS)) + 0.3 * rng.normal(size=(ROWS, OUTPUTS))).astype("float32")
    return x, y


def build_model():
    """A tiny MLP whose initial weights come from NumPy, identical in every process."""
    import keras
    import numpy as np

    model = keras.Sequential(
        [
            keras.Input((INPUTS,)),
            # Zeros, then NumPy values: random initial values would differ between processes.
            keras.layers.Dense(5, activation="tanh", kernel_initializer="zeros", name="hidden"),
            keras.layers.Dense(OUTPUTS, kernel_initializer="zeros", name="out"),
        ],
        name="mlp",
    )
    rng = np.random.default_rng(3)
    model.set_weights([rng.normal(scale=0.5, size=w.shape).astype("float32") for w in model.get_weights()])
    return model


class Run:
    """The outcome of one `fit`: final weights, optimizer variables, logs, and the model."""

    def __init__(self, model, history, engine, distributed, callbacks=()):
        import kerascool
        import numpy as np
        from keras import ops

        self.model = model
        self.callbacks = list(callbacks)
        self.weights = [np.array(w) for w in model.get_weights()]
        variables = model.optimizer.variables
        # Names without the optimizer's own (counted) prefix: "adam_1/kerascool_steps" -> "kerascool_steps".
        self.state_names = [v.name for v in variables]
        # Read through the Keras variable (runs in the strategy's scope: see _keras.host_copy).
        self.state = [np.array(ops.convert_to_numpy(v)) for v in variables]
        self.real_steps = kerascool.real_steps(model)
        self.history = {k: [float(x) for x in v] for k, v in history.history.items()} if history else {}
        self.spread = 0.0
        self.copies = 1
        if distributed:
            self.copies = min(len(engine.replica_values(v)) for v in model.weights)
            for v in list(model.weights) + list(variables):
                copies = engine.replica_values(v)
                self.spread = max([self.spread] + [_abs_diff(c, copies[0]) for c in copies])


def train(engine, distributed, callbacks=lambda: [], epochs=2, optimizer=None, decorate=None,
          x=None, y=None, batch=BATCH, validation=False) -> Run:
    """Fit a fresh tiny model on one device or distributed, with the same global batches.

    `callbacks` and `optimizer` are factories (fresh objects per run);
    `decorate(model)` runs after `compile`; with `validation` the training
    data is the validation data too.
    """
    import keras

    if x is None:
        x, y = data()
    scope = engine.scope() if distributed else contextlib.nullcontext()
    with scope:
        model = build_model()
        model.compile(optimizer=optimizer() if optimizer else keras.optimizers.Adam(0.05), loss="mse")
        if decorate is not None:
            model = decorate(model) or model
        if distributed:
            (x, _), (y, batch) = engine.local(x, batch), engine.local(y, batch)
        made = callbacks()
        history = model.fit(
            x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0, callbacks=made,
            validation_data=(x, y) if validation else None, validation_batch_size=batch,
        )
        # Still in the scope: users call fit (and read results) inside it too.
        return Run(model, history, engine, distributed, made)


def _abs_diff(a, b):
    """|a - b| with NaN == NaN (a step skipped in both runs) and NaN != number (inf)."""
    import numpy as np

    a, b = np.atleast_1d(np.asarray(a, "float64")), np.atleast_1d(np.asarray(b, "float64"))
    d = np.abs(a - b)
    d[np.isnan(a) & np.isnan(b)] = 0.0
    d[np.isnan(d)] = np.inf
    return float(np.max(d, initial=0.0))


def max_diff(a: list, b: list) -> float:
    if len(a) != len(b):
        return float("inf")
    return max([0.0] + [_abs_diff(p, q) for p, q in zip(a, b)])


def history_diff(a: dict, b: dict) -> float:
    if set(a) != set(b):
        return float("inf")
    return max([0.0] + [_abs_diff(a[k], b[k]) for k in a])


def digest(run: Run) -> str:
    h = hashlib.sha256()
    for array in run.weights + run.state:
        h.update(array.tobytes())
    return h.hexdigest()


def compare(ref: Run, dist: Run) -> dict:
    """The numbers every parity test checks."""
    return {
        "weights_diff": max_diff(ref.weights, dist.weights),
        "state_diff": max_diff(ref.state, dist.state) if ref.state_names == dist.state_names else float("inf"),
        "history_diff": history_diff(ref.history, dist.history),
        "replica_spread": dist.spread,
        "real_steps": [ref.real_steps, dist.real_steps],
        "moved": max_diff(ref.weights, build_model().get_weights()) > 1e-3,  # training did something
        "copies": dist.copies,  # per process: 2 devices in one process, 1 per process in jax-mp
        "state_names": [n for n in dist.state_names if "kerascool" in n],
        "final_logs": {k: v[-1] for k, v in dist.history.items()},
        "digest": digest(dist),
    }


def parity(engine, extract=None, **kwargs) -> dict:
    """Single-device run vs distributed run with the same global batches.

    `extract(run)` -> arrays a feature exposes besides weights and optimizer
    state (averages swapped in, captures, multipliers), compared as well.
    """
    ref, dist = train(engine, False, **kwargs), train(engine, True, **kwargs)
    out = compare(ref, dist)
    if extract is not None:
        mine, theirs = extract(dist), extract(ref)
        out["extract_diff"] = max_diff(theirs, mine)
        out["extract_size"] = len(mine)
    return out


def checkpoint_round_trip(engine, workdir: str, **kwargs) -> dict:
    """`BackupAndRestore` from a distributed run into a single-device one, and back.

    Each resumed run (2 epochs, interrupted, then resumed to 4) must end where
    an uninterrupted single-device 4-epoch run ends.
    """
    import keras

    callbacks = kwargs.pop("callbacks", lambda: [])
    kwargs.pop("extract", None)
    whole = train(engine, False, callbacks=callbacks, epochs=4, **kwargs)
    out = {}
    for first, second in ((True, False), (False, True)):
        label = ("dist" if first else "single") + "_to_" + ("dist" if second else "single")
        backup = os.path.join(workdir, f"backup_{label}_{engine.process_id}")

        def with_backup(backup=backup):
            return callbacks() + [keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False)]

        train(engine, first, callbacks=with_backup, epochs=2, **kwargs)
        resumed = train(engine, second, callbacks=with_backup, epochs=4, **kwargs)
        out[label] = {
            "weights_diff": max_diff(whole.weights, resumed.weights),
            "state_diff": max_diff(whole.state, resumed.state) if whole.state_names == resumed.state_names
            else float("inf"),
            "epochs_after_resume": len(resumed.history.get("loss", [])),
        }
    return out


# -- scenarios ---------------------------------------------------------------------------


def _clip_callbacks():
    import kerascool

    return [
        kerascool.GradientTransform(
            kerascool.SkipNonFinite(),
            kerascool.masked(kerascool.ClipByLayerNorm(0.1), "hidden"),
            kerascool.ClipByNorm(0.2),
            kerascool.AdaptiveClip(0.05),
            log_norms="layer",
        )
    ]


def _averages(run):
    """The averages (EMA, SWA) as the model sees them when swapped in."""
    with run.callbacks[0].swapped():
        return [w.copy() for w in run.model.get_weights()]


def _features() -> dict:
    """Each feature's setup: keyword arguments of `train` (+ `extract` for `parity`)."""
    import keras
    import kerascool

    x, _ = data()
    return {
        # nonlinear gradient transforms (clip by layer, variable and unit), with logged norms
        "clip": dict(callbacks=_clip_callbacks),
        # validation sees the average ("both": training weights too); the averages themselves
        "ema": dict(
            callbacks=lambda: [kerascool.EMA(decay=0.8, warmup="timm", validation="both")],
            validation=True, extract=_averages,
        ),
        "swa": dict(
            callbacks=lambda: [kerascool.SWA(start=2, every=2, unit="step", validation="both")],
            validation=True, extract=lambda run: _averages(run) + [run.callbacks[0].averaged_count()],
        ),
        # the default unit: the weights at each epoch end, averaged eagerly between steps
        "swa_epoch": dict(
            callbacks=lambda: [kerascool.SWA(start=1)], epochs=3,
            extract=lambda run: _averages(run) + [run.callbacks[0].averaged_count()],
        ),
        "lookahead": dict(callbacks=lambda: [kerascool.Lookahead(k=3, alpha=0.5)]),
        # 3 micro-batches per update: the partial sums cross epoch ends
        "accumulation": dict(
            callbacks=lambda: [kerascool.GradientAccumulation(steps=3),
                               kerascool.GradientTransform(kerascool.ClipByGlobalNorm(0.5))],
            epochs=3,
        ),
        "layer_rates": dict(
            decorate=lambda m: kerascool.layer_rates(m, decay=0.5, verbose=False),
            callbacks=lambda: [kerascool.LayerRateScheduler.warmup(5, per="step", log=True)],
            extract=lambda run: list(kerascool.current_layer_rates(run.model).values()),
        ),
        "sam": dict(decorate=lambda m: kerascool.sam(m, rho=0.1)),
        "asam": dict(decorate=lambda m: kerascool.sam(m, rho=0.5, adaptive=True)),
        "heun": dict(decorate=kerascool.heun, optimizer=lambda: keras.optimizers.SGD(0.1)),
        # captures on a probe after each epoch: the arrays themselves
        "capture": dict(
            callbacks=lambda: [kerascool.CaptureCallback(layers="hidden", probe=x[:4], plots=False)],
            extract=lambda run: [a for epoch in sorted(run.callbacks[0].captures)
                                 for _, a in sorted(run.callbacks[0].captures[epoch].items())],
        ),
    }


FEATURES = (
    "clip", "ema", "swa", "swa_epoch", "lookahead", "accumulation", "layer_rates", "sam", "asam", "heun", "capture",
)


def _feature_scenario(name):
    def run(engine, workdir):
        return parity(engine, **_features()[name])

    run.__name__ = f"scenario_{name}"
    run.__doc__ = f"Parity of the {name} feature: one device vs distributed."
    return run


def scenario_skip_nonfinite(engine, workdir):
    """A NaN in one row of the second batch: one replica sees it, every replica must skip that step."""
    import kerascool
    import numpy as np

    x, y = data()
    y = y.copy()
    y[BATCH + 1, 0] = np.nan

    def callbacks():
        return [kerascool.GradientTransform(kerascool.SkipNonFinite())]

    out = parity(engine, callbacks=callbacks, x=x, y=y, epochs=1)
    return out


def scenario_clipnorm(engine, workdir):
    """One SGD(1) step: the update is the gradient the optimizer used, clipped per variable at 0.05.

    Keras's own `clipnorm` against kerascool's ClipByNorm, each single-device vs distributed.
    """
    import keras
    import kerascool
    import numpy as np

    x, y = data()
    x, y = x[:BATCH], y[:BATCH]
    out = {}
    for label, optimizer, callbacks in (
        ("keras", lambda: keras.optimizers.SGD(1.0, clipnorm=0.05), lambda: []),
        ("kerascool", lambda: keras.optimizers.SGD(1.0),
         lambda: [kerascool.GradientTransform(kerascool.ClipByNorm(0.05))]),
    ):
        runs = {}
        for distributed in (False, True):
            before = build_model().get_weights()
            run = train(engine, distributed, callbacks=callbacks, optimizer=optimizer, epochs=1, x=x, y=y)
            runs[distributed] = [b - a for a, b in zip(run.weights, before)]
        out[label] = {
            "update_diff": max_diff(runs[False], runs[True]),
            "single_norms": [float(np.linalg.norm(u)) for u in runs[False]],
            "dist_norms": [float(np.linalg.norm(u)) for u in runs[True]],
        }
    return out


def scenario_unsupported(engine, workdir):
    """Engines where stock fit fails: a clear ValueError before anything is created."""
    import keras
    import kerascool
    import tensorflow as tf

    out = {}
    cases = {
        "steps_per_execution": (engine.strategy, {"steps_per_execution": 2}),
        "jit_compile": (engine.strategy, {"jit_compile": True}),
        "multi_worker": (tf.distribute.MultiWorkerMirroredStrategy(), {}),
    }
    x, y = data()
    for label, (strategy, compile_kwargs) in cases.items():
        with strategy.scope():
            model = build_model()
            model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse", **compile_kwargs)
        before = model.get_weights()
        try:
            model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
                      callbacks=[kerascool.GradientTransform(kerascool.ClipByNorm(1.0))])
            out[label] = {"raised": None}
        except Exception as e:  # the test checks the type and the message
            out[label] = {"raised": type(e).__name__, "message": str(e)}
        out[label]["weights_unchanged"] = max_diff(before, model.get_weights()) == 0.0
        out[label]["kerascool_state"] = [v.name for v in model.optimizer.variables if "kerascool" in v.name]
    return out


def scenario_crash(engine, workdir):
    """Process 1 dies in the middle of a distributed fit; process 0 then waits on it forever."""
    import keras

    class Die(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if engine.process_id == 1 and batch == 1:
                os._exit(17)

    train(engine, True, callbacks=lambda: [Die()], epochs=50)
    return {"survived": True}


def scenario_multiworker(engine, workdir):
    """Stock fit under MultiWorkerMirroredStrategy (fails in Keras 3.15), then fit with a kerascool callback."""
    import keras
    import kerascool

    x, y = data()
    out = {"replicas": engine.replicas}
    for label in ("stock", "kerascool", "decorated"):
        with engine.scope():
            model = build_model()
            model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
        callbacks = [kerascool.GradientTransform(kerascool.ClipByNorm(1.0))] if label == "kerascool" else []
        try:
            if label == "decorated":  # kerascool gets the model before fit: its own error
                kerascool.layer_rates(model, decay=0.5, verbose=False)
            model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=callbacks)
            out[label] = {"raised": None}
        except Exception as e:  # the test checks the type and the message
            out[label] = {"raised": type(e).__name__, "message": str(e)[:2000]}
    return out


def scenario_hang(engine, workdir):
    """Process 1 stops answering (sleeps); process 0 waits on it in a distributed fit."""
    if engine.process_id == 1:
        time.sleep(3600)
    train(engine, True, epochs=50)
    return {"survived": True}


def scenario_checkpoint_all(engine, workdir):
    """Every stateful feature at once: their state survives a switch of engine."""
    import kerascool

    def callbacks():
        return [
            kerascool.GradientAccumulation(steps=3),
            kerascool.GradientTransform(kerascool.ClipByLayerNorm(0.5), log_norms="global"),
            kerascool.Lookahead(k=2, alpha=0.5),
            kerascool.EMA(decay=0.8),
            kerascool.LayerRateScheduler.warmup(5, per="step"),
        ]

    return checkpoint_round_trip(
        engine, workdir, callbacks=callbacks, decorate=lambda m: kerascool.layer_rates(m, decay=0.5, verbose=False)
    )


SCENARIOS = {
    **{name: _feature_scenario(name) for name in FEATURES},
    "checkpoint_all": scenario_checkpoint_all,
    "hang": scenario_hang,
    "multiworker": scenario_multiworker,
    "skip_nonfinite": scenario_skip_nonfinite,
    "clipnorm": scenario_clipnorm,
    "unsupported": scenario_unsupported,
    "crash": scenario_crash,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", choices=ENGINES)
    parser.add_argument("scenarios", nargs="+", choices=sorted(SCENARIOS))
    parser.add_argument("--addresses", default=None, help="host:port of every process, comma-separated")
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    os.environ.update(_child_env(args.engine))  # before TF/JAX import; also when run by hand
    if args.engine == "tf-mirrored":
        engine = TFMirrored()
    elif args.engine == "jax-dp":
        engine = JAXDataParallel()
    elif args.engine == "tf-multiworker":
        engine = TFMultiWorker(args.addresses.split(","), args.process_id)
    else:
        engine = JAXMultiProcess(args.addresses.split(","), args.process_id)
    results = {}
    with contextlib.ExitStack() as stack:
        # Run by hand: a temporary folder of our own; launched: the launcher's (it removes it).
        workdir = args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="kerascool_dist_"))
        for name in args.scenarios:
            start = time.monotonic()
            try:
                results[name] = SCENARIOS[name](engine, workdir)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
            results[name]["seconds"] = round(time.monotonic() - start, 2)
    print(MARKER + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
