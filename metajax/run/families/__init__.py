"""Task families, one module each, found by name: family ``"omniglot"`` is
``metajax.run.families.omniglot``, which declares ``FAMILY``, a
:class:`~metajax.run.setup.Family`; nothing registers itself on import.
"""

from __future__ import annotations

import importlib
import pkgutil

from metajax._extras import require
from metajax.run.config import ConfigError, suggest
from metajax.run.setup import Family


def names() -> list[str]:
    """The built-in families: the modules of this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load(name: str) -> Family:
    """Family ``name``, its required packages checked.

    Raises:
      ConfigError: no such family, or its module declares no ``FAMILY``.
      metajax._extras.MissingExtraError: a package in its ``requires`` is not installed.
    """
    if name not in names():
        raise ConfigError(
            f"unknown task family {name!r}{suggest(name, names())}; known: {', '.join(names())}."
        )
    module = importlib.import_module(f"{__name__}.{name}")
    family = getattr(module, "FAMILY", None)
    if not isinstance(family, Family):
        raise ConfigError(f"task family module {module.__name__} declares no FAMILY.")
    require(family.requires, f"task family {name}")
    return family
