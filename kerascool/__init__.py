"""kerascool: make stock Keras 3 `model.fit` cooler from the outside.

Users keep their model, their `compile(...)` and their stock optimizer, and
add kerascool callbacks to `fit` (or decorate the model in one call).
"""

from kerascool.accumulation import GradientAccumulation
from kerascool.anneal import AnnealVariable
from kerascool.capture import Capture, capture
from kerascool.capture_callback import CaptureCallback
from kerascool.ema import EMA
from kerascool.gradient_transform import GradientTransform
from kerascool._core import installed, real_steps, uninstall
from kerascool.layer_rate_scheduler import LayerRateScheduler
from kerascool.layer_rates import current_layer_rates, layer_rate_table, layer_rates
from kerascool.lookahead import Lookahead
from kerascool.lr_finder import LRFinderResult, find_lr
from kerascool.mc_dropout import mc_dropout_predict
from kerascool.python_metric import PythonMetric
from kerascool.reparametrize import Reparametrize, ScaleReparametrization, WeightNormalization
from kerascool.scalars import ScalarMetric
from kerascool.schedules import LinearWarmup, OneCycle, PiecewiseLinear
from kerascool.surgery import split, submodel
from kerascool.swa import SWA, update_bn
from kerascool.swap import WeightSwap
from kerascool.transforms import (
    AdaptiveClip,
    ClipByGlobalNorm,
    ClipByLayerNorm,
    ClipByNorm,
    ClipByValue,
    GradientTransformation,
    Lambda,
    Scale,
    SkipNonFinite,
    chain,
    masked,
)
from kerascool.tied import TiedHead
from kerascool.two_step import heun, sam, stock_step

__version__ = "0.1.0"

__all__ = [
    # gradient transforms
    "GradientTransform",
    "GradientTransformation",
    "ClipByNorm",
    "ClipByLayerNorm",
    "ClipByGlobalNorm",
    "ClipByValue",
    "AdaptiveClip",
    "SkipNonFinite",
    "Scale",
    "Lambda",
    "chain",
    "masked",
    # gradient accumulation
    "GradientAccumulation",
    # two-gradient steps
    "sam",
    "heun",
    "stock_step",
    # layer-wise learning rates
    "layer_rates",
    "layer_rate_table",
    "current_layer_rates",
    "LayerRateScheduler",
    # capture of intermediate tensors
    "CaptureCallback",
    "Capture",
    "capture",
    # weight averages (one averaging hook, one swap mechanism)
    "EMA",
    "SWA",
    "update_bn",
    "Lookahead",
    "WeightSwap",
    # schedules and training utilities
    "LinearWarmup",
    "OneCycle",
    "PiecewiseLinear",
    "find_lr",
    "LRFinderResult",
    "AnnealVariable",
    "PythonMetric",
    "ScalarMetric",
    "mc_dropout_predict",
    # the installation on a model
    "installed",
    "uninstall",
    "real_steps",
    # model surgery and reparametrization
    "split",
    "submodel",
    "Reparametrize",
    "WeightNormalization",
    "ScaleReparametrization",
    "TiedHead",
]
