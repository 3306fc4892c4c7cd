"""`TiedHead`: an output projection with an embedding's matrix transposed, ``logits = x @ E.T + b``.

Weight tying (Press & Wolf 2017, as in GPT-2 and BERT's masked-LM head):
the head holds no copy of ``E``; it reads the embedding layer's own
variable at every call. There is one variable in ``model.weights``, and the
gradients of both uses add up in it. Because it is one variable, everything
keyed on variables sees it once: `kerascool.layer_rates` gives it ONE
multiplier, that of the group it belongs to (the embedding's: its path is
``"<embedding>/embeddings"``, and depth groups give it to the first layer in
``model.layers`` that holds it, the embedding in a functional model), and
`kerascool.EMA` averages it once. The head owns only its bias ``b`` (of
shape ``(vocabulary,)``, ``use_bias=False`` for none).

Saving: the head refers to the embedding LAYER and serializes it in its
config. Inside ``model.save`` / ``keras.saving.load_model`` Keras shares
objects that are serialized twice (``ObjectSharingScope``), so a head and
an embedding of the same functional or Sequential model come back as one
embedding and one variable, and the weights file holds ``E`` once. Outside
that scope (``Model.from_config(model.get_config())``, ``clone_model``) the
head gets its own copy of the embedding: tie again by building a new
``TiedHead(embedding)``. A subclassed model ties in its ``__init__``
(``self.head = TiedHead(self.embed)``) and so after loading too.

Compared with keras-hub's ``ReversibleEmbedding`` (one layer, called with
``reverse=True`` for the logits): the same product ``x @ E.T``, but a
`TiedHead` ties to any existing embedding layer (a stock
``keras.layers.Embedding``, keras-hub's own, a pretrained backbone's
``token_embedding``) without changing its class, is a layer of its own (its
own name in the model, a group for layer rates, a target for capture), and
adds the output bias ``b`` (``ReversibleEmbedding`` has none; it offers
``tie_weights=False`` and a logit soft cap instead). A keras-hub backbone
rebuilds its layers from hyper-parameters when it loads, so a head tied to
``backbone.token_embedding`` loses the tie in a ``.keras`` round trip;
there, use ``backbone.token_embedding(x, reverse=True)`` (plus a bias layer)
or re-create the head after loading.
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kerascool")
class TiedHead(keras.layers.Layer):
    """Logits ``x @ E.T + b`` with the matrix ``E`` of an embedding layer (the same variable).

    Args:
        embedding: the embedding layer to tie to (a ``keras.layers.Embedding``
            or any layer with a 2-D weight of shape ``(vocabulary, dim)``).
        weight: the name of that weight (``"embeddings"`` for Keras's and
            keras-hub's embeddings).
        use_bias: add a bias of shape ``(vocabulary,)``.
        bias_initializer: its initializer.
        **kwargs: the Layer keywords (``name``, ``dtype``...).

    Input shape ``(..., dim)``; output ``(..., vocabulary)``.

    Example:

    >>> import numpy as np, keras, kerascool
    >>> tokens = keras.Input((5,), dtype="int32")
    >>> embed = keras.layers.Embedding(10, 4, name="embed")
    >>> logits = kerascool.TiedHead(embed, name="head")(keras.layers.Dense(4)(embed(tokens)))
    >>> model = keras.Model(tokens, logits)
    >>> [w.path for w in model.weights if w.path.endswith("embeddings")]  # one variable, used twice
    ['embed/embeddings']
    >>> model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> _ = model.fit(np.zeros((4, 5), "int32"), np.ones((4, 5), "int32"), verbose=0)
    >>> model.output_shape
    (None, 5, 10)
    """

    def __init__(
        self, embedding, *, weight: str = "embeddings", use_bias: bool = True, bias_initializer="zeros", **kwargs
    ):
        if not isinstance(embedding, keras.layers.Layer):
            raise ValueError(
                f"Invalid value for argument `embedding`. Expected an embedding layer (such as "
                f"keras.layers.Embedding). Received: embedding={embedding!r}"
            )
        if not isinstance(weight, str) or not weight:
            raise ValueError(
                f'Invalid value for argument `weight`. Expected the name of the embedding\'s matrix, such as '
                f'"embeddings". Received: weight={weight!r}'
            )
        if not isinstance(use_bias, bool):
            raise ValueError(f"Invalid value for argument `use_bias`. Expected a bool. Received: use_bias={use_bias!r}")
        super().__init__(**kwargs)
        # A tracked sub-layer: the head's weights include E, and Keras
        # deduplicates it in the model's weights and in the saved file.
        self.embedding = embedding
        self.weight = weight
        self.use_bias = use_bias
        self.bias_initializer = keras.initializers.get(bias_initializer)
        if embedding.built:
            self._check_matrix()

    def _check_matrix(self):
        matrix = getattr(self.embedding, self.weight, None)
        shape = getattr(matrix, "shape", None)
        if shape is None or len(shape) != 2:
            raise ValueError(
                f"Invalid value for argument `weight`. Expected the name of a 2-D weight (vocabulary, dim) of layer "
                f"{self.embedding.name!r}. Received: weight={self.weight!r}"
                + ("" if shape is None else f" of shape {tuple(shape)}")
            )
        return tuple(shape)

    @property
    def matrix(self):
        """The embedding matrix ``E`` (vocabulary, dim), read from the embedding layer."""
        return getattr(self.embedding, self.weight)

    def build(self, input_shape):
        if not self.embedding.built:
            self.embedding.build()
        vocabulary, dim = self._check_matrix()
        if input_shape[-1] is not None and input_shape[-1] != dim:
            raise ValueError(
                f"TiedHead {self.name!r} projects with the matrix of {self.embedding.name!r}, of shape "
                f"{(vocabulary, dim)}: its inputs need a last axis of {dim}. Received: input_shape={input_shape}"
            )
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(vocabulary,), initializer=self.bias_initializer)
        self.built = True

    def call(self, inputs):
        matrix = ops.cast(self.matrix, self.compute_dtype)  # the variable's value, in the compute dtype
        logits = ops.matmul(inputs, ops.transpose(matrix))
        if self.use_bias:
            logits = ops.add(logits, ops.cast(self.bias, self.compute_dtype))
        return logits

    def compute_output_shape(self, input_shape):
        vocabulary = getattr(self.embedding, "input_dim", None)
        if self.embedding.built:
            vocabulary = self._check_matrix()[0]
        return tuple(input_shape[:-1]) + (vocabulary,)

    def get_config(self):
        config = super().get_config()
        config.update(
            embedding=keras.saving.serialize_keras_object(self.embedding),
            weight=self.weight,
            use_bias=self.use_bias,
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        # Inside load_model this returns the model's own embedding (Keras's object sharing).
        config["embedding"] = keras.saving.deserialize_keras_object(config["embedding"], custom_objects=custom_objects)
        return cls(**config)
