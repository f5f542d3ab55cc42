"""Flax NNX models as pure ``(apply_fn, params)`` pairs, through ``nnx.split`` / ``nnx.merge``.

metajax's primitives take a pure ``loss_fn(params, batch)``. An NNX module is a mutable
object; :func:`from_nnx` splits it once into a static graph, its ``nnx.Param`` leaves (what
is meta-learned and adapted) and everything else (batch statistics, RNG state, ...), and
returns a function that rebuilds a fresh module from ``params`` on every call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

from metajax.types import Params


def from_nnx(module: nnx.Module, method: str = "__call__") -> tuple[Callable[..., Any], Params]:
    """Splits an NNX module into a pure ``apply_fn(params, *args, **kwargs)`` and ``params``.

    ``params`` is a plain nested dict of arrays (``nnx.to_pure_dict`` of the
    ``nnx.Param`` variables), so parameter paths read like ``'linear/kernel'`` for
    :func:`metajax.mask_by_path`. Every call of ``apply_fn`` merges a new module from
    ``params`` and a snapshot of the non-parameter state taken now, and calls ``method`` on
    it; whatever the call mutates (BatchNorm running statistics, RNG counters) is discarded,
    so the function is pure and the original module is never touched.

    Consequences of that snapshot: a BatchNorm in training mode normalises with the current
    batch's statistics on every call (transductive, as in MAML), and one in eval mode uses
    the statistics it had at split time; a Dropout module would draw the same mask on every
    call, so call ``module.eval()`` (or construct it deterministic) before splitting. Set the
    mode you want before calling this function.

    Args:
      module: the NNX module.
      method: the name of the method ``apply_fn`` calls.

    Returns:
      ``(apply_fn, params)``; ``apply_fn(params, x)`` is the module's ``method(x)``.
    """
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    # Pure dicts: merging them creates new Variables, so no call can write into `rest`.
    rest = nnx.to_pure_dict(rest)

    def apply_fn(params: Params, *args, **kwargs):
        model = nnx.merge(graphdef, params, rest)
        return getattr(model, method)(*args, **kwargs)

    return apply_fn, nnx.to_pure_dict(params)


def update_nnx(module: nnx.Module, params: Params) -> nnx.Module:
    """Writes ``params`` (as from :func:`from_nnx`, e.g. after meta-training) into ``module``.

    Updates ``module`` in place and returns it.
    """
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(module, state)
    return module
