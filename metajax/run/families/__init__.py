"""Task families, one module each, found by name: family ``"omniglot"`` is
``metajax.run.families.omniglot``. A family module defines ``TaskConfig`` (a frozen
dataclass, the config's ``task``) and ``build(config) -> metajax.run.setup.Setup``, and may
list in ``REQUIRES`` the optional packages it needs; nothing registers itself on import.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from metajax._extras import require
from metajax.run.config import ConfigError, suggest


def names() -> list[str]:
    """The built-in families: the modules of this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load(name: str) -> ModuleType:
    """The module of family ``name``, checked to define ``TaskConfig`` and ``build``.

    Raises:
      ConfigError: no such family, or its module lacks ``TaskConfig`` or ``build``.
      metajax._extras.MissingExtraError: a package in its ``REQUIRES`` is not installed.
    """
    if name not in names():
        raise ConfigError(
            f"unknown task family {name!r}{suggest(name, names())}; known: {', '.join(names())}."
        )
    module = importlib.import_module(f"{__name__}.{name}")
    for attr in ("TaskConfig", "build"):
        if not hasattr(module, attr):
            raise ConfigError(f"task family module {module.__name__} defines no {attr}.")
    require(getattr(module, "REQUIRES", ()), f"task family {name}")
    return module
