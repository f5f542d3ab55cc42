"""Finding and loading config files: ``NAME[:VARIANT]`` or ``path/to/file.py[:VARIANT]``.

A config file defines ``get_config(variant: str = "") -> Config`` and may list its variants
in ``VARIANTS`` (shown by ``metajax list``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from metajax.run.config import Config, ConfigError, apply_overrides, suggest


def search_path() -> list[Path]:
    """Where config names are looked up, first match wins.

    ``$METAJAX_EXPERIMENTS`` (folders separated by ``os.pathsep``), then ``./experiments``
    (a user's own configs, next to where they run), then the configs metajax ships
    (``metajax/configs``), so a user's file of the same name overrides a packaged one.
    """
    extra = [Path(p) for p in os.environ.get("METAJAX_EXPERIMENTS", "").split(os.pathsep) if p]
    packaged = Path(__file__).resolve().parents[1] / "configs"
    return extra + [Path.cwd() / "experiments", packaged]


def experiment_names() -> list[str]:
    names = set()
    for d in search_path():
        if d.is_dir():
            names |= {
                p.stem
                for p in d.glob("*.py")
                if not p.stem.startswith("_") and "def get_config" in p.read_text()
            }
    return sorted(names)


def load_config(spec: str, overrides: Sequence[str] = ()) -> Config:
    """Loads ``NAME``, ``NAME:VARIANT`` or ``path/to/file.py[:VARIANT]`` and applies overrides.

    Args:
      spec: an experiment name (a file in :func:`search_path`) or a path,
        optionally followed by ``:variant`` (e.g. ``sinusoid:tiny``).
      overrides: ``"key=value"`` strings with dotted keys (``train.steps=100``).

    An algorithm setting of the file that the algorithm named (by the file or by an
    override) does not take is reset to its default, with one line on stderr saying so;
    one set by an override stays, for the build to refuse.
    """
    target, _, variant = spec.partition(":")
    path = Path(target)
    if not (target.endswith(".py") or path.is_file()):
        path = find(target)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.")
    module = load_module(path)
    try:
        config = module.get_config(variant)
    except ValueError as e:  # an unknown variant
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(config, Config):
        raise ConfigError(f"{path}: get_config returned {type(config).__name__}, not a Config.")
    config = apply_overrides(config, overrides)
    from metajax.run.build import drop_untaken_settings  # imports the algorithms: only here

    given = {item.partition("=")[0].strip() for item in overrides}
    config, dropped = drop_untaken_settings(config, given)
    if dropped:
        print(
            f"metajax: {config.algorithm.name} takes no {', '.join(dropped)}: dropped from {spec}.",
            file=sys.stderr,
        )
    return config


def load_module(path: Path) -> ModuleType:
    """Executes a config file and returns it as a module with ``get_config``."""
    module_spec = importlib.util.spec_from_file_location(f"metajax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(variant).")
    return module


def find(name: str) -> Path:
    """The config file of experiment ``name`` on :func:`search_path`."""
    for d in search_path():
        if (d / f"{name}.py").is_file():
            return d / f"{name}.py"
    raise ConfigError(
        f"no experiment {name!r}{suggest(name, experiment_names())}; "
        f"known: {', '.join(experiment_names()) or 'none'}."
    )


def variants(name: str) -> tuple[str, ...]:
    """The variants a config file lists in ``VARIANTS`` (empty if it lists none)."""
    return tuple(getattr(load_module(find(name)), "VARIANTS", ()))
