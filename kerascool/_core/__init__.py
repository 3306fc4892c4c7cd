"""The spine: one `Installation` per model owns everything kerascool puts on it.

- `hook`: what a feature is (`StepHook` in a named stage, its state, `StepContext`);
- `installation`: the per-model object (features, state, shadows, install/uninstall);
- `callback`: `HookCallback`, the base of callbacks whose work is a set of hooks.
"""

from kerascool._core.callback import HookCallback
from kerascool._core.hook import STAGES, StateFactory, StepContext, StepHook
from kerascool._core.installation import Installed, installation_of, installed, real_steps, uninstall

__all__ = [
    "STAGES",
    "HookCallback",
    "Installed",
    "StateFactory",
    "StepContext",
    "StepHook",
    "installation_of",
    "installed",
    "real_steps",
    "uninstall",
]
