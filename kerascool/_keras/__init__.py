"""Everything kerascool knows about Keras internals and the backends, split by concern.

- `model`: layers, symbolic inputs, compiled inference, state sync, copies;
- `optimizer`: the updating optimizer, its variables, a branch around its update;
- `trainer`: `fit`'s train step and train function, their arguments and state;
- `attention`: layer call paths and MultiHeadAttention's score step;
- `distribute`: TF distribution strategies;
- `graph`: a functional model's nodes (model surgery), imported as a submodule;
- `weights`: a layer's weight attributes (reparametrization), imported as a submodule.

Each private access is marked with the Keras version it was checked against
(3.15.1 unless said otherwise). The rest of kerascool uses these helpers,
`keras.ops` and `keras.Variable` only.
"""

from kerascool._keras.attention import *  # noqa: F401,F403
from kerascool._keras.distribute import *  # noqa: F401,F403
from kerascool._keras.model import *  # noqa: F401,F403
from kerascool._keras.optimizer import *  # noqa: F401,F403
from kerascool._keras.trainer import *  # noqa: F401,F403
