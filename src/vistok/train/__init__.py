"""Training: configs and recipes, data, the DDP trainer, export.

`vistok.train` is this package and also callable: `vistok.train(recipe_or_config, out=..., ...)` runs a
training and returns its summary (`vistok.train.api.train`, documented there and in docs/training.md).
The package stays light: calling it imports the trainer.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    """Python docs, "Customizing module attribute access": a module's __class__ may be a ModuleType
    subclass. `vistok.train` must be both this package (vistok.train.trainer, ...) and the function."""

    def __call__(self, *args, **kwargs):
        from .api import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
