"""LoRA factors as meta-learned parameters, for any parameter pytree.

Low-rank adaptation (Hu et al., 2021) adds ``alpha / rank * A @ B`` to a frozen
pretrained kernel ``W``. Here ``A`` and ``B`` are ordinary leaves of the
meta-parameters, so every algorithm, exactness test and sharding rule applies
to them unchanged::

    lora = mj.lora.LoRA(rank=4, alpha=8.0, targets=r"mlp_(in|out)/kernel")
    meta = lora.init(params, jax.random.key(0))  # {"base": params, "lora": factors}
    loss = lora.wrap(loss_fn)  # loss(meta, batch) = loss_fn(lora.merge(meta), batch)
    algo = mj.maml(loss, inner_steps=5, inner_lr=0.1, mask=mj.lora.inner_mask(meta, "lora"))
    opt = mj.lora.freeze_base(optax.adam(1e-3))  # the outer loop trains only the factors
    step = mj.make_train_step(algo, opt)

``meta["lora"]`` mirrors the nesting of the targeted kernels' paths (list
indices become string keys): the kernel at path ``params/trunk/blocks_0/mlp_in/kernel``
gets ``meta["lora"]["params"]["trunk"]["blocks_0"]["mlp_in"]["kernel"] = {"a": A, "b": B}``,
so :func:`metajax.mask_by_path` sees it as ``lora/params/.../kernel/a``. Plain nested
dicts of string keys checkpoint and print like Flax parameters.

Kernels with more than two axes (Flax ``DenseGeneral``: the Transformer's fused
``qkv`` kernel ``(width, 3, heads, head_dim)``, its ``out`` kernel
``(heads, head_dim, width)``; convolutions ``(kh, kw, c_in, c_out)``) have no
single matrix view: the first ``k`` axes are the input side for some, ``k = 1``
for ``qkv`` and ``k = 2`` for ``out``. So such a kernel is refused unless
``in_dims`` says ``k``; it is then viewed as the matrix
``(prod(shape[:k]), prod(shape[k:]))``, and its update reshaped back.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from metajax.paths import path_str
from metajax.types import Params, PyTree

BASE, FACTORS = "base", "lora"
# Flax LayerNorm / RMSNorm leaves (``ln_attn/scale``, ``LayerNorm_0/bias``, ``norm/scale``),
# searched in a leaf's path inside the base parameters.
NORM_PATTERN = r"(?i)(^|/)(ln[^/]*|[^/]*norm[^/]*)/(scale|bias)$"
AdaptMode = Literal["lora", "lora+norm", "all"]


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Which kernels get low-rank factors, their rank and their scale.

    Attributes:
      rank: ``r``, the inner dimension of the factors, ``>= 1``.
      alpha: the update is ``alpha / rank * A @ B``; None means ``alpha = rank``
        (scale 1). Keeping ``alpha`` fixed while changing ``rank`` keeps the
        size of the initial updates comparable (the LoRA paper's convention).
      targets: a regex searched in each leaf's path (the path strings of
        :func:`metajax.mask_by_path`, e.g. ``params/trunk/blocks_0/mlp_in/kernel``),
        or a predicate on that string. Matched leaves with two or more axes get
        factors; matched leaves with fewer (biases, norms) are left alone. It
        must match at least one kernel.
      in_dims: for kernels with more than two axes, how many leading axes form
        the input side of the matrix view. An int applies to every such kernel;
        a mapping ``{regex: k}`` gives ``k`` by the first regex found in the
        path (e.g. ``{r"attn/out": 2, r"attn/qkv": 1}`` for
        :class:`metajax.models.TransformerLM`). None refuses such kernels. Two-axis
        kernels are always ``(in, out)``.
    """

    rank: int
    targets: str | Callable[[str], bool]
    alpha: float | None = None
    in_dims: int | Mapping[str, int] | None = None

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {self.rank!r}.")
        if self.alpha is not None and not (
            isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0
        ):
            raise ValueError(f"alpha must be a positive finite number or None, got {self.alpha!r}.")
        if not (isinstance(self.targets, str) or callable(self.targets)):
            raise TypeError(f"targets must be a regex or a predicate, got {self.targets!r}.")
        if isinstance(self.targets, str):
            re.compile(self.targets)

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor in front of ``A @ B``."""
        return (self.rank if self.alpha is None else float(self.alpha)) / self.rank

    def init(self, params: Params, key: jax.Array) -> dict[str, PyTree]:
        """The meta-parameters ``{"base": params, "lora": factors}``; merged, they equal ``params``.

        For each targeted kernel, viewed as a matrix ``(m, n)``: ``a`` of shape
        ``(m, rank)`` drawn from ``N(0, 1 / m)`` (so ``x @ a`` keeps the scale
        of ``x``, as a fan-in initialisation does) and ``b`` of shape
        ``(rank, n)`` all zeros, both in the kernel's dtype. ``B = 0`` makes the
        merged model exactly the base model at initialisation; the first
        gradient then reaches ``b`` only (``d/dA`` carries a factor ``B``).

        Args:
          params: the pretrained parameters (any pytree of arrays).
          key: a ``jax.random.key``; kernel ``i`` (in leaf order) uses ``fold_in(key, i)``.

        Raises:
          ValueError: no kernel matches ``targets``, or a matched kernel has more
            than two axes and no ``in_dims`` for it.
        """
        if is_lora_params(params):
            raise ValueError("params are already LoRA meta-parameters ({'base', 'lora'}).")
        factors: dict[str, Any] = {}
        kernels = [(kp, x) for kp, x in _leaves_with_path(params) if self._targeted(kp, x)]
        if not kernels:
            shown = [
                f"{path_str(kp)} {jnp.shape(x)}"
                for kp, x in _leaves_with_path(params)
                if jnp.ndim(x) >= 2
            ][:8]
            raise ValueError(
                f"targets={self.targets!r} matches no kernel with two or more axes; "
                f"kernels present: {shown}."
            )
        for i, (kp, w) in enumerate(kernels):
            if not jnp.issubdtype(jnp.result_type(w), jnp.floating):
                raise TypeError(
                    f"LoRA target {path_str(kp)} has dtype {jnp.result_type(w)}, "
                    "not a float kernel."
                )
            rows, cols = self._matrix_shape(path_str(kp), jnp.shape(w))
            dtype = jnp.result_type(w)
            a = jax.random.normal(jax.random.fold_in(key, i), (rows, self.rank), dtype)
            node = factors
            parts = _parts(kp)
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = {"a": a / math.sqrt(rows), "b": jnp.zeros((self.rank, cols), dtype)}
        return {BASE: params, FACTORS: factors}

    def merge(self, meta_params: dict[str, PyTree]) -> Params:
        """The model's parameters: ``W + alpha / rank * (a @ b).reshape(W.shape)`` per target.

        Differentiable in both the base and the factors; everything else passes
        through unchanged. The product is materialised (``m * n * rank`` flops
        per kernel per call), which is what lets any model's ``apply`` use it.

        Args:
          meta_params: ``{"base": params, "lora": factors}`` as :meth:`init` returns.

        Returns:
          A pytree with the structure and dtypes of ``meta_params["base"]``.
        """
        if not is_lora_params(meta_params):
            raise TypeError(
                "merge takes LoRA meta-parameters {'base': params, 'lora': factors}, "
                f"got {type(meta_params).__name__}"
                f"{sorted(meta_params) if isinstance(meta_params, dict) else ''}."
            )
        factors = meta_params[FACTORS]
        used = set()

        def merge_leaf(kp, w):
            node = factors
            for part in _parts(kp):
                if not isinstance(node, dict) or part not in node:
                    return w
                node = node[part]
            used.add(path_str(kp))
            return self._merged_kernel(path_str(kp), w, node)

        merged = jax.tree_util.tree_map_with_path(merge_leaf, meta_params[BASE])
        expected = {path_str(kp[:-1]) for kp, _ in _leaves_with_path(factors)}
        if expected - used:
            stale = sorted(expected - used)
            raise ValueError(f"LoRA factors without a kernel in the base: {stale}.")
        return merged

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn(params, *args)`` (a loss or metric function) as ``fn(meta_params, *args)``."""

        def on_merged(meta_params, *args, **kwargs):
            return fn(self.merge(meta_params), *args, **kwargs)

        return on_merged

    def _targeted(self, kp, x) -> bool:
        if jnp.ndim(x) < 2:
            return False
        path = path_str(kp)
        if callable(self.targets):
            return bool(self.targets(path))
        return re.search(self.targets, path) is not None

    def _matrix_shape(self, path: str, shape: tuple[int, ...]) -> tuple[int, int]:
        if len(shape) == 2:
            return shape
        k = self.in_dims
        if isinstance(k, Mapping):
            k = next((v for pattern, v in k.items() if re.search(pattern, path)), None)
        if k is None:
            raise ValueError(
                f"LoRA target {path} has shape {shape}: with more than two axes, say how many "
                "leading axes are its input side with in_dims (e.g. in_dims={r'attn/out': 2, "
                r"r'attn/qkv': 1}), or narrow targets to two-axis kernels."
            )
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < len(shape):
            raise ValueError(
                f"in_dims for {path} must be an int in [1, {len(shape) - 1}] for its "
                f"shape {shape}, got {k!r}."
            )
        return math.prod(shape[:k]), math.prod(shape[k:])

    def _merged_kernel(self, path: str, w, node) -> jax.Array:
        if not (isinstance(node, dict) and set(node) == {"a", "b"}):
            raise ValueError(f"LoRA factors for {path} must be {{'a', 'b'}}, got {node!r}.")
        a, b = node["a"], node["b"]
        shape = jnp.shape(w)
        prefix_sizes = {math.prod(shape[:k]) for k in range(1, len(shape))}
        if (
            jnp.ndim(a) != 2
            or jnp.ndim(b) != 2
            or a.shape[1] != self.rank
            or b.shape[0] != self.rank
            or a.shape[0] not in prefix_sizes
            or a.shape[0] * b.shape[1] != math.prod(shape)
        ):
            raise ValueError(
                f"LoRA factors a {jnp.shape(a)}, b {jnp.shape(b)} do not fit the "
                f"kernel {path} of shape {shape} at rank {self.rank}."
            )
        delta = (self.scale * (a @ b)).reshape(shape)
        return (w + delta).astype(jnp.result_type(w))


def is_lora_params(tree: Any) -> bool:
    """Whether ``tree`` is a LoRA meta-parameter dict ``{"base": ..., "lora": ...}``."""
    return isinstance(tree, dict) and set(tree) == {BASE, FACTORS}


def inner_mask(
    meta_params: dict[str, PyTree], adapt: AdaptMode = "lora", *, norm: str = NORM_PATTERN
) -> PyTree:
    """The ``mask=`` of :func:`metajax.adapt`, maml, reptile or meta_sgd for LoRA meta-params.

    Args:
      meta_params: ``{"base": params, "lora": factors}``.
      adapt: ``"lora"``: only the factors adapt, the base gets no inner-loop
        change; ``"lora+norm"``: the factors and the base's normalisation scales
        and biases (leaves whose path inside the base matches ``norm``);
        ``"all"``: every leaf.
      norm: regex for the normalisation leaves of ``"lora+norm"``.

    Returns:
      A pytree of Python bools with the structure of ``meta_params``.
    """
    _check_lora_params(meta_params)
    if adapt not in ("lora", "lora+norm", "all"):
        raise ValueError(f"adapt must be 'lora', 'lora+norm' or 'all', got {adapt!r}.")
    base = meta_params[BASE]
    if adapt == "lora":
        base_mask = jax.tree.map(lambda _: False, base)
    elif adapt == "all":
        base_mask = jax.tree.map(lambda _: True, base)
    else:
        base_mask = jax.tree_util.tree_map_with_path(
            lambda kp, _: re.search(norm, path_str(kp)) is not None, base
        )
        if not any(jax.tree.leaves(base_mask)):
            raise ValueError(f"adapt='lora+norm', but norm={norm!r} matches no leaf of the base.")
    return {BASE: base_mask, FACTORS: jax.tree.map(lambda _: True, meta_params[FACTORS])}


def outer_mask(meta_params: PyTree) -> PyTree:
    """True where the outer loop trains: everything but the base of each LoRA dict.

    Works on any tree holding LoRA meta-parameters: ``{"base", "lora"}`` itself
    (maml, reptile, anil) or nested, as in Meta-SGD's ``{"params": {"base",
    "lora"}, "lr": {"base", "lora"}}`` (the base's learned rates are frozen too:
    they scale no update when the base does not adapt). Leaves outside any LoRA
    dict are trained.
    """

    def node_mask(node):
        if is_lora_params(node):
            return {
                BASE: jax.tree.map(lambda _: False, node[BASE]),
                FACTORS: jax.tree.map(lambda _: True, node[FACTORS]),
            }
        return True

    mask = jax.tree.map(node_mask, meta_params, is_leaf=is_lora_params)
    if all(jax.tree.leaves(mask)):
        raise ValueError("outer_mask found no LoRA meta-parameters {'base', 'lora'} in the tree.")
    return mask


def freeze_base(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optimizer`` on the factors (and anything outside LoRA dicts), a zero update on the base.

    An ``optax.multi_transform``: the base's updates are exactly zero, so its
    values never change, and ``optimizer`` keeps no state (Adam moments) for
    it. Do not use ``optax.masked(optimizer, outer_mask(meta))`` for this:
    ``optax.masked`` passes the masked-out leaves' gradients through as their
    updates, so the base would take plain gradient steps.
    """

    def labels(tree):
        return jax.tree.map(lambda train: "train" if train else "frozen", outer_mask(tree))

    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


def _check_lora_params(meta_params: Any) -> None:
    if not is_lora_params(meta_params):
        raise TypeError(
            "expected LoRA meta-parameters {'base': params, 'lora': factors} "
            f"(LoRA.init), got {type(meta_params).__name__}."
        )


def _leaves_with_path(tree: PyTree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _parts(key_path) -> list[str]:
    return [path_str((k,)) for k in key_path]
