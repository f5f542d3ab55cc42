"""Parameter paths: ``head/kernel``-style names of pytree leaves, and masks built from them."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax

from metajax.types import Params, PyTree


def path_str(key_path: Sequence[Any]) -> str:
    """A key path (``jax.tree_util.tree_flatten_with_path``) as ``'head/kernel'``.

    Dict keys, attribute names and sequence indices alike become one component each, so
    ``params['head']['kernel']`` reads ``head/kernel`` and ``params[2]['w']`` reads ``2/w``.
    """
    parts = []
    for k in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def mask_by_path(params: Params, pattern: str | Callable[[str], bool]) -> PyTree:
    """Builds an :func:`metajax.adapt` mask from parameter paths.

    Args:
      params: the parameter pytree.
      pattern: a regex searched in each leaf's path (``"head"`` matches
        ``params['head']['kernel']``, whose path reads ``head/kernel``), or a
        predicate on that path string.

    Returns:
      A pytree of Python bools, True where the leaf adapts.
    """
    match = pattern if callable(pattern) else (lambda path: re.search(pattern, path) is not None)
    return jax.tree_util.tree_map_with_path(lambda kp, _: bool(match(path_str(kp))), params)
