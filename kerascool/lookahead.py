"""`Lookahead`: slow weights that the fast (trained) weights return to every k steps.

Zhang et al. 2019, "Lookahead Optimizer: k steps forward, 1 step back", with
any stock optimizer as the inner ("fast") one. The slow weights start as a
copy of the weights when the callback gets its model; after every `k` real
updates (micro-steps of gradient accumulation and vetoed steps do not count):

    slow <- slow + alpha * (fast - slow);   fast <- slow

The optimizer's own state (momenta) carries on, as in the paper and optax.
Built on the averaging hook shared with `EMA` and `SWA` (``keep = 1 -
alpha``, then written back), and ordered before them in the step so that an
EMA or SWA averages the weights after the synchronisation.
"""

from __future__ import annotations

from keras import ops

from kerascool import _core, averaging


class Lookahead(_core.HookCallback):
    """Lookahead around the model's stock optimizer.

    Between synchronisations the model holds the fast weights, and so do
    validation and checkpoints. The slow weights are optimizer variables:
    ``BackupAndRestore`` keeps them, with the step counter.

    Args:
        k: real updates between synchronisations (an integer >= 1).
        alpha: step of the slow weights towards the fast ones, in (0, 1].

    Example:

    >>> import numpy as np, keras, kerascool
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="adam", loss="mse")
    >>> lookahead = kerascool.Lookahead(k=2, alpha=0.5)
    >>> _ = model.fit(np.ones((8, 4)), np.ones((8, 1)), batch_size=2, verbose=0, callbacks=[lookahead])
    >>> kerascool.real_steps(model)
    4
    """

    def __init__(self, k: int = 5, alpha: float = 0.5):
        super().__init__()
        averaging.check_int("k", k, 1)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
            raise ValueError(
                f"Invalid value for argument `alpha`. Expected a value in (0, 1]. Received: alpha={alpha!r}"
            )
        self.k = k
        self.alpha = float(alpha)
        self._hook = _LookaheadHook(self)

    def step_hooks(self):
        return [self._hook]

    def get_config(self) -> dict:
        return {"k": self.k, "alpha": self.alpha}


class _LookaheadHook(averaging.AveragingHook):
    name = "lookahead"
    stage = "lookahead"  # before EMA/SWA: they average the synchronised weights
    write_back = True

    def __init__(self, lookahead: Lookahead):
        super().__init__()
        self.lookahead = lookahead

    def layout(self, model, variables):
        return ()

    def schedule(self, n, averages):
        la = self.lookahead
        keep = 1.0 - la.alpha
        if la.k == 1:
            return True, keep
        return ops.equal(n % la.k, 0), keep
