"""kerascool on several devices or processes, checked against one device.

    python examples/distributed.py [--quick] [--out DIR]
        TensorFlow: tf.distribute.MirroredStrategy on 2 logical CPU devices;
        JAX: keras.distribution.DataParallel on 2 host devices (XLA_FLAGS).
    KERAS_BACKEND=jax python examples/distributed.py --processes 2
        JAX multi-process: 2 processes on 127.0.0.1 joined by jax.distributed
        (gloo CPU collectives), each feeding its half of every global batch.

The same model trains twice with the same global batches, on one device and
distributed, with per-layer gradient clipping, gradient accumulation and an
EMA of the weights; the script prints (and writes to --out) the largest
difference between the two runs. Devices must be configured before TensorFlow
or JAX start, hence the environment set-up at the top.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
BACKEND = os.environ["KERAS_BACKEND"]


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short epoch (a few seconds)")
    parser.add_argument("--out", default=os.path.join("kerascool_out", "distributed"), help="output directory")
    parser.add_argument("--processes", type=int, default=1, help="JAX only: processes on 127.0.0.1")
    parser.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def launch(args, argv) -> int:
    """Start one copy of this script per process; stop them all if one fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    procs = [
        subprocess.Popen([sys.executable, __file__, *argv, "--process-id", str(i), "--coordinator", coordinator])
        for i in range(args.processes)
    ]
    deadline = time.monotonic() + 600
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                print("a process failed or timed out: stopping the others", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return max(p.returncode for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def distribution(args):
    """A context manager factory for the distributed run (after configuring devices)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope
    import jax

    if args.process_id is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator, num_processes=args.processes, process_id=args.process_id
        )
    import keras

    data_parallel = keras.distribution.DataParallel(devices=jax.devices())
    if args.process_id is not None:
        data_parallel.auto_shard_dataset = False  # NumPy input: each process feeds its own rows
    return data_parallel.scope


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.processes > 1 and BACKEND != "jax":
        print("--processes needs KERAS_BACKEND=jax (see the README, 'Scaling out')", file=sys.stderr)
        return 2
    if args.processes > 1 and args.process_id is None:
        return launch(args, argv)
    if BACKEND == "jax" and args.process_id is None:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    scope = distribution(args)

    import contextlib

    import keras
    import numpy as np

    import kerascool

    rng = np.random.default_rng(0)
    n, batch = (64 if args.quick else 1024), 16
    x = rng.normal(size=(n, 8)).astype("float32")
    y = (np.tanh(x @ rng.normal(size=(8, 1))) + 0.1 * rng.normal(size=(n, 1))).astype("float32")
    def run(distributed: bool):
        # The same seed everywhere: every process (and both runs) start from the same weights.
        keras.utils.set_random_seed(0)
        with scope() if distributed else contextlib.nullcontext():
            model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, activation="relu"),
                                      keras.layers.Dense(1)])
            model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
            xs, ys, bs = x, y, batch
            if distributed and args.process_id is not None:
                # Process i feeds its part of every global batch.
                part, k = batch // args.processes, args.process_id
                rows = np.arange(n).reshape(-1, args.processes, part)[:, k].ravel()
                xs, ys, bs = x[rows], y[rows], part
            ema = kerascool.EMA(decay=0.9)
            callbacks = [
                kerascool.GradientAccumulation(steps=2),
                kerascool.GradientTransform(kerascool.ClipByLayerNorm(0.5)),
                ema,
            ]
            model.fit(xs, ys, batch_size=bs, epochs=1 if args.quick else 5, shuffle=False, verbose=0,
                      callbacks=callbacks)
            with ema.swapped():
                averaged = model.get_weights()
        return model.get_weights(), averaged

    single, dist = run(False), run(True)
    diff = max(float(np.max(np.abs(a - b))) for s, d in zip(single, dist) for a, b in zip(s, d))
    where = {"tensorflow": "MirroredStrategy, 2 devices", "jax": "DataParallel, 2 devices"}[BACKEND]
    if args.process_id is not None:
        where = f"JAX multi-process, process {args.process_id} of {args.processes}"
    print(f"{where}: largest difference to one device (weights and EMA) = {diff:.2e}")
    if args.process_id in (None, 0):
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "distributed.json"), "w") as f:
            json.dump({"engine": where, "max_abs_diff": diff}, f, indent=1)
    return 0 if diff <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
