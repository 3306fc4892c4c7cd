"""Which distribution engines kerascool trains under, checked before training.

kerascool runs on the distribution engines Keras 3 already uses; its hooks
see the globally reduced gradient on each of them (under MirroredStrategy the
step hook all-reduces the replicas' gradients itself, see `kerascool._core`):

- TensorFlow, one process, several devices: ``tf.distribute.MirroredStrategy``;
- JAX, one process, several devices: ``keras.distribution.DataParallel``;
- JAX, several processes or machines: ``jax.distributed.initialize(...)`` in
  each process, then ``keras.distribution.DataParallel(devices=jax.devices())``.

Where stock Keras 3.15 `fit` itself fails, `check_supported` raises a clear
error before anything is created, instead of an obscure one mid-trace:

- ``tf.distribute.MultiWorkerMirroredStrategy`` (keras-team/keras#20585):
  the error points to the JAX multi-process path;
- ``MirroredStrategy`` over several replicas with ``steps_per_execution > 1``
  (keras-team/keras#19246) or ``jit_compile=True``.

Every kerascool hook runs this check when it is installed.

>>> import keras
>>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
>>> model.compile(optimizer="sgd", loss="mse")
>>> check_supported(model)  # one device: nothing to say
"""

from __future__ import annotations

from kerascool import _keras

_JAX_PATH = (
    "To train on several processes or machines, use the JAX backend: in each process call "
    "`jax.distributed.initialize(coordinator_address=..., num_processes=..., process_id=...)`, then "
    "`keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))`"
)


def check_supported(model) -> None:
    """Raise ValueError when `model` trains under an engine where `fit` fails.

    Args:
        model: a compiled Keras model.

    Raises:
        ValueError: under TF ``MultiWorkerMirroredStrategy``; under
            ``MirroredStrategy`` with several replicas and
            ``steps_per_execution > 1`` or ``jit_compile=True``.
    """
    kind, replicas = _keras.tf_strategy_kind(model)
    if kind == "multi_worker":
        raise ValueError(
            "kerascool cannot train under tf.distribute.MultiWorkerMirroredStrategy: Keras 3 `fit` itself "
            "fails there (keras-team/keras#20585). "
            f"{_JAX_PATH}. For several devices in one process, tf.distribute.MirroredStrategy works."
        )
    if kind != "mirrored" or replicas < 2:
        return
    where = (
        f"under tf.distribute.MirroredStrategy with {replicas} replicas, where Keras 3 `fit` itself fails"
    )
    steps = getattr(model, "steps_per_execution", 1) or 1
    if steps > 1:
        raise ValueError(
            f"Invalid value for argument `steps_per_execution`. Expected 1 {where} "
            "(keras-team/keras#19246); compile with steps_per_execution=1, or use the JAX backend with "
            f"keras.distribution.DataParallel. Received: steps_per_execution={steps}"
        )
    if getattr(model, "jit_compile", False) is True:
        raise ValueError(
            f"Invalid value for argument `jit_compile`. Expected False {where}; compile with "
            "jit_compile=False (what 'auto' picks under a strategy), or use the JAX backend with "
            "keras.distribution.DataParallel. Received: jit_compile=True"
        )
