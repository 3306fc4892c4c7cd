"""Layer call paths and MultiHeadAttention's private score step (capture).

Private Keras accesses checked against keras 3.15.1.
"""

from __future__ import annotations


def current_path() -> str:
    """The name-scope path of the layer being called, e.g. ``"model/block_0"``."""
    # Private in Keras 3.15: Layer.__call__ opens this scope around `call`.
    from keras.src.backend.common import name_scope

    return name_scope.current_path() or ""


# MultiHeadAttention's private step that forms the attention scores and hands
# them to `call` (Keras 3.15; keras-hub's CachedMultiHeadAttention calls it too,
# without asking for the scores, so wrapping `call` alone would not reach them).
ATTENTION_METHOD = "_compute_attention"


def can_return_attention_scores(layer) -> bool:
    import inspect

    method = getattr(layer, ATTENTION_METHOD, None)
    return method is not None and "return_attention_scores" in inspect.signature(method).parameters


def uses_flash_attention(layer) -> bool:
    """True when a MultiHeadAttention layer runs flash attention (no scores)."""
    return bool(getattr(layer, "_flash_attention", False))
