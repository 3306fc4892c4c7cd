"""`find_lr`: the learning-rate range test (Smith 2015; fastai's ``lr_find``).

The rate grows exponentially from `start_lr` to `end_lr` over `num_steps`
updates of the user's own model, optimizer and loss, one batch each; the
sweep stops early when the smoothed loss exceeds `diverge_threshold` times
its minimum (or is not finite). Afterwards the model's variables (weights,
BatchNorm statistics, dropout seeds), the optimizer's variables (moments,
step counters, kerascool state) and the metrics are put back bit for bit,
also after an exception or a KeyboardInterrupt, and the next ``fit`` traces
its step anew with the optimizer's own rate.

Each update is one "epoch" of a ``fit`` with ``steps_per_epoch=1``: Keras
resets its loss tracker at each epoch, so the logged loss is exactly that
batch's loss, and the rate comes from a schedule inside the compiled step.

Smoothing as fastai: ``avg <- beta * avg + (1 - beta) * loss``, reported as
``avg / (1 - beta ** (i + 1))`` (debiased). Suggestions, on the smoothed loss:

- ``"valley"`` (fastai's default since 2021): the longest stretch over which
  the loss keeps falling (a longest decreasing subsequence), and the rate
  half-way into its middle third: robust to the noise of the first steps;
- ``"steepest"``: the rate where the loss falls fastest against
  ``log(rate)``, ignoring the first tenth and the last twentieth of the points;
- ``"minimum"``: a tenth of the rate with the lowest loss.

The plot needs matplotlib: ``pip install kerascool[plot]``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import keras
import numpy as np
from keras import ops

from kerascool import _keras

_SUGGEST = ("valley", "steepest", "minimum")
DEFAULT_PLOT = os.path.join("kerascool_out", "lr_finder.png")


@dataclasses.dataclass
class LRFinderResult:
    """What `find_lr` measured.

    Attributes:
        rates: the learning rate of each update.
        losses: the loss of each update's batch (before that update).
        smoothed_losses: the debiased exponential moving average of `losses`.
        suggested_lr: the suggested rate (None when too few points).
        diverged: whether the sweep stopped on divergence.
        plot_path: the PNG written, or None.
    """

    rates: np.ndarray
    losses: np.ndarray
    smoothed_losses: np.ndarray
    suggested_lr: Optional[float]
    diverged: bool
    plot_path: Optional[str] = None

    def plot(self, path: str) -> str:
        """Write the loss-against-rate plot to `path` (PNG); returns the path."""
        plt_figure, canvas_cls = _matplotlib()
        figure = plt_figure(figsize=(6.4, 4.2), dpi=100)
        canvas_cls(figure)
        axes = figure.add_subplot(1, 1, 1)
        axes.plot(self.rates, self.losses, color="0.75", linewidth=1, label="loss")
        axes.plot(self.rates, self.smoothed_losses, color="C0", linewidth=2, label="smoothed loss")
        if self.suggested_lr is not None:
            axes.axvline(self.suggested_lr, color="C3", linestyle="--", label=f"suggested {self.suggested_lr:.2e}")
        axes.set_xscale("log")
        axes.set_xlabel("learning rate (log scale)")
        axes.set_ylabel("loss")
        finite = self.smoothed_losses[np.isfinite(self.smoothed_losses)]
        if finite.size:
            # Up to a little above the starting loss: the divergence would squash the rest.
            low, first = float(finite.min()), float(finite[0])
            top = first + 0.5 * (first - low) if first > low else low + 1.0
            axes.set_ylim(low - 0.05 * (top - low), top)
        axes.set_title("learning-rate range test" + (" (stopped on divergence)" if self.diverged else ""))
        axes.legend(loc="best")
        axes.grid(True, which="both", alpha=0.3)
        figure.tight_layout()
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        figure.savefig(path, format="png")
        return path


def _matplotlib():
    """matplotlib's Figure and Agg canvas, imported lazily (no pyplot, no global state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "The learning-rate plot needs matplotlib: `pip install kerascool[plot]` "
            "(or `pip install matplotlib`), or pass `plot=None` to find_lr."
        ) from None
    return Figure, FigureCanvasAgg


class _ExponentialSweep(keras.optimizers.schedules.LearningRateSchedule):
    """``start * (end / start) ** (i / (n - 1))`` with ``i`` updates into the sweep."""

    def __init__(self, start: float, end: float, num_steps: int, offset: int, every: int = 1):
        self.start, self.end, self.num_steps, self.offset, self.every = start, end, num_steps, offset, every

    def rate(self, i: int) -> float:
        return self.start * (self.end / self.start) ** (i / (self.num_steps - 1))

    def __call__(self, step):
        i = ops.floor((ops.cast(step, "float32") - self.offset) / self.every)
        i = ops.clip(i, 0.0, float(self.num_steps - 1))
        return self.start * ops.exp(i / (self.num_steps - 1) * math.log(self.end / self.start))

    def get_config(self):
        return {"start": self.start, "end": self.end, "num_steps": self.num_steps, "offset": self.offset, "every": self.every}


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Invalid value for argument `{name}`. Expected a finite number > 0. Received: {name}={value!r}")
    return float(value)


def _smooth(losses, beta: float) -> np.ndarray:
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1.0 - beta) * loss
        out.append(avg / (1.0 - beta ** (i + 1)))
    return np.asarray(out, dtype="float64")


def suggest_lr(rates, smoothed_losses, method: str = "valley") -> Optional[float]:
    """The suggested rate from a sweep (see the module docstring); None with < 3 points.

    >>> rates = np.logspace(-4, 0, 50)
    >>> losses = 1.0 / (1.0 + np.exp(4.0 * (np.log10(rates) + 2.0)))  # falls fastest at 1e-2
    >>> round(float(np.log10(suggest_lr(rates, losses, "steepest"))), 1)
    -2.0
    """
    rates, losses = np.asarray(rates, "float64"), np.asarray(smoothed_losses, "float64")
    keep = np.isfinite(losses)
    rates, losses = rates[keep], losses[keep]
    if rates.size < 3:
        return None
    if method == "minimum":
        return float(rates[int(np.argmin(losses))] / 10.0)
    if method == "valley":
        # Longest decreasing subsequence ending at each point (O(n^2), n is small).
        length = np.ones(rates.size, dtype=int)
        best_end = 0
        for i in range(1, rates.size):
            earlier = np.nonzero(losses[:i] > losses[i])[0]
            if earlier.size:
                length[i] = 1 + int(length[earlier].max())
            if length[i] > length[best_end]:
                best_end = i
        start = best_end - length[best_end]
        third = (best_end - start) / 3
        return float(rates[max(0, start + int(third) + int(third / 2))])
    skip_start, skip_end = rates.size // 10, rates.size // 20
    stop = rates.size - skip_end
    if stop - skip_start < 3:
        skip_start, stop = 0, rates.size
    slopes = np.gradient(losses, np.log(rates))
    return float(rates[skip_start + int(np.argmin(slopes[skip_start:stop]))])


class _Sweep(keras.callbacks.Callback):
    """Snapshots the state, swaps the rate in, records each step's loss."""

    def __init__(self, start_lr, end_lr, num_steps, smoothing, diverge_threshold):
        super().__init__()
        self.start_lr, self.end_lr, self.num_steps = start_lr, end_lr, num_steps
        self.smoothing, self.diverge_threshold = smoothing, diverge_threshold
        self.rates, self.losses, self.smoothed = [], [], []
        self.diverged = False
        self.snapshot = None
        self.schedule = None
        self.previous_rate = None
        self._avg = 0.0

    def on_train_begin(self, logs=None):
        # Here fit has built the model and the optimizer, and not yet traced the step.
        model = self.model
        self.snapshot = [(v, _keras.host_copy(v)) for v in _state_variables(model)]
        optimizer = _keras.inner_optimizer(model.optimizer)
        every = getattr(optimizer, "gradient_accumulation_steps", None) or 1
        self.schedule = _ExponentialSweep(
            self.start_lr, self.end_lr, self.num_steps, _keras.raw_iterations(optimizer), every
        )
        self.previous_rate = _keras.swap_learning_rate(optimizer, self.schedule)

    def on_epoch_end(self, epoch, logs=None):
        loss = float((logs or {}).get("loss", float("nan")))
        if not math.isfinite(loss):
            self.diverged = True
            self.model.stop_training = True
            return
        self.rates.append(self.schedule.rate(epoch))
        self.losses.append(loss)
        beta = self.smoothing
        self._avg = beta * self._avg + (1.0 - beta) * loss
        smoothed = self._avg / (1.0 - beta ** len(self.losses))
        self.smoothed.append(smoothed)
        if smoothed > self.diverge_threshold * min(self.smoothed):
            self.diverged = True
            self.model.stop_training = True

    def restore(self):
        model = self.model
        if self.previous_rate is not None:
            _keras.swap_learning_rate(_keras.inner_optimizer(model.optimizer), self.previous_rate)
        if self.snapshot is not None:
            for variable, value in self.snapshot:
                variable.assign(value)


def _build_before_sweep(model, fit_args: dict) -> None:
    """Build a model Keras would build lazily (TF, no `keras.Input`), so the sweep can restore it.

    From the spec of arrays or a `tf.data.Dataset`; a Python generator is
    not touched (a batch taken from it would be lost to the sweep).
    """
    if all(layer.built for layer in _keras.flatten_layers(model)) and model.built:
        return
    x = fit_args["x"]
    if hasattr(x, "element_spec"):
        batch = x.element_spec
    elif hasattr(x, "shape") and hasattr(x, "dtype"):
        batch = (x[:1],) if fit_args.get("y") is None else (x[:1], fit_args["y"][:1])
    else:
        return
    with _keras.strategy_scope(model):
        _keras.symbolic_build(model, batch)


def _state_variables(model) -> list:
    seen, out = set(), []
    for v in list(model.variables) + list(model.optimizer.variables) + list(model.metrics_variables):
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def find_lr(
    model,
    data,
    *,
    batch_size: Optional[int] = None,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    smoothing: float = 0.98,
    diverge_threshold: float = 4.0,
    suggest: str = "valley",
    plot: Optional[str] = DEFAULT_PLOT,
) -> LRFinderResult:
    """Sweep the learning rate exponentially on `model`, then restore it exactly.

    Args:
        model: a compiled Keras model (its optimizer, loss and metrics are used).
        data: ``(x, y)`` or ``(x, y, sample_weight)`` arrays, or anything
            ``model.fit`` takes as ``x`` (a `tf.data.Dataset`, a
            `keras.utils.PyDataset`, a generator) yielding ``(x, y)`` batches.
            Finite data is cycled over.
        batch_size: for arrays, as in ``fit``.
        start_lr, end_lr: the range (``0 < start_lr < end_lr``).
        num_steps: updates in the sweep (>= 5).
        smoothing: ``beta`` of the loss average, in [0, 1).
        diverge_threshold: stop when the smoothed loss exceeds this many times
            its minimum (> 1).
        suggest: ``"valley"``, ``"steepest"`` or ``"minimum"`` (see the module docstring).
        plot: the PNG to write (its folder is created), or None. Needs
            matplotlib (``pip install kerascool[plot]``).

    Returns:
        A `LRFinderResult` (rates, losses, smoothed losses, suggested rate).

    >>> import numpy as np, keras, kerascool
    >>> x = np.random.default_rng(0).normal(size=(64, 2)).astype("float32")
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> result = kerascool.find_lr(model, (x, x[:, :1]), batch_size=16, num_steps=20, plot=None)
    >>> len(result.rates) <= 20
    True
    """
    if not getattr(model, "compiled", False) or getattr(model, "optimizer", None) is None:
        raise ValueError(
            "find_lr needs a compiled model with an optimizer. Call `model.compile(optimizer=..., loss=...)` first."
        )
    start_lr = _check_positive("start_lr", start_lr)
    end_lr = _check_positive("end_lr", end_lr)
    if end_lr <= start_lr:
        raise ValueError(
            f"Invalid value for argument `end_lr`. Expected a value > start_lr={start_lr}. Received: end_lr={end_lr}"
        )
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 5:
        raise ValueError(f"Invalid value for argument `num_steps`. Expected an integer >= 5. Received: num_steps={num_steps!r}")
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing < 1:
        raise ValueError(f"Invalid value for argument `smoothing`. Expected a value in [0, 1). Received: smoothing={smoothing!r}")
    if isinstance(diverge_threshold, bool) or not isinstance(diverge_threshold, (int, float)) or not diverge_threshold > 1:
        raise ValueError(
            "Invalid value for argument `diverge_threshold`. Expected a number > 1. "
            f"Received: diverge_threshold={diverge_threshold!r}"
        )
    if suggest not in _SUGGEST:
        raise ValueError(f"Invalid value for argument `suggest`. Expected one of {_SUGGEST}. Received: suggest={suggest!r}")
    if plot is not None:
        if not isinstance(plot, (str, os.PathLike)) or not str(plot).lower().endswith(".png"):
            raise ValueError(f"Invalid value for argument `plot`. Expected a path ending in .png, or None. Received: plot={plot!r}")
        _matplotlib()  # fail now, with the install hint, before anything changes
    if isinstance(data, (tuple, list)):
        if len(data) not in (2, 3):
            raise ValueError(
                "Invalid value for argument `data`. Expected (x, y), (x, y, sample_weight) or a dataset. "
                f"Received: a {type(data).__name__} of length {len(data)}"
            )
        fit_args = {"x": data[0], "y": data[1], "sample_weight": data[2] if len(data) == 3 else None, "batch_size": batch_size}
    else:
        fit_args = {"x": data}

    sweep = _Sweep(start_lr, end_lr, num_steps, float(smoothing), float(diverge_threshold))
    previous_history = getattr(model, "history", None)
    previous_stop = getattr(model, "stop_training", False)
    model.train_function = None  # trace with the sweep's rate
    try:
        _build_before_sweep(model, fit_args)
        model.fit(**fit_args, epochs=num_steps, steps_per_epoch=1, verbose=0, callbacks=[sweep])
    finally:
        sweep.restore()
        model.train_function = None  # the next fit traces with the optimizer's own rate
        model.stop_training = previous_stop
        model.history = previous_history

    rates = np.asarray(sweep.rates, "float64")
    result = LRFinderResult(
        rates=rates,
        losses=np.asarray(sweep.losses, "float64"),
        smoothed_losses=np.asarray(sweep.smoothed, "float64"),
        suggested_lr=suggest_lr(rates, sweep.smoothed, suggest),
        diverged=sweep.diverged,
    )
    if plot is not None:
        result.plot_path = result.plot(str(plot))
    return result
