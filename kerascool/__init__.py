"""kerascool: make stock Keras 3 `model.fit` cooler from the outside.

Users keep their model, their `compile(...)` and their stock optimizer, and
add kerascool callbacks to `fit` (or decorate the model in one call).
"""

from kerascool.gradient_transform import GradientTransform
from kerascool.hook import real_steps
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
    # the step hook
    "real_steps",
]
