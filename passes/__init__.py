"""fxopt's built-in passes: one rewrite per module; importing this package registers them all.

Modules are found, not listed, so a new pass needs no edit here.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
