"""From a config to an experiment: the family's setup, the algorithm, the outer optimizer.

The algorithm table says which ``metajax.algorithms`` function each ``algorithm.name`` is
and which settings of :class:`~metajax.run.config.AlgorithmConfig` it takes; those are
passed on, and one it does not take must keep its default (one from a config file is reset
by :func:`drop_untaken_settings`). ProtoNets and Proto-MAML meta-learn the family's
``embedding`` instead of its model (Proto-MAML with a head of its own): this module is the
only place that knows.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metajax import algorithms
from metajax.algorithms import MetaLearner
from metajax.algorithms.proto_maml import proto_maml_logits
from metajax.algorithms.protonets import distance_by_name, protonet_logits
from metajax.models.losses import accuracy_metric, classification_loss
from metajax.paths import mask_by_path
from metajax.run import families
from metajax.run.config import AlgorithmConfig, Config, ConfigError, OptimizerConfig, suggest
from metajax.run.setup import Evaluator, Setup
from metajax.types import LossFn, MetricFn, Params


class AlgorithmSpec(NamedTuple):
    """One ``algorithm.name``.

    Attributes:
      fn: the ``metajax.algorithms`` function; the runner passes it the family's loss (or
        embedding) and ``metric_fn``.
      takes: the :class:`AlgorithmConfig` settings it takes, each a keyword of ``fn``
        (``inner_optimizer`` stands for ``inner_optimizer_args`` too).
      fixed: settings it fixes, with their values.
      masks: it takes ``mask=``, a family's inner mask.
      metric_based: it meta-learns the family's embedding (ProtoNets).
      prototype_head: it meta-learns the family's embedding and adapts it with a head
        started at the support's prototypes (Proto-MAML).
      zero_head: its meta-parameters are the family's, so ``algorithm.zero_head`` can keep
        their head at zero (build zeroes it and masks its outer updates).
    """

    fn: Callable[..., MetaLearner]
    takes: tuple[str, ...] = ()
    fixed: dict[str, Any] = {}
    masks: bool = False
    metric_based: bool = False
    prototype_head: bool = False
    zero_head: bool = False

    @property
    def on_embedding(self) -> bool:
        """Whether it meta-learns the family's embedding rather than its model."""
        return self.metric_based or self.prototype_head


_INNER = ("inner_steps", "inner_lr", "inner_optimizer", "unroll", "monitor")
_TASKS = ("task_batch", "unroll_tasks")
_GRADIENT = _INNER + _TASKS + ("remat",)
ALGORITHMS = {
    "maml": AlgorithmSpec(algorithms.maml, (*_GRADIENT, "first_order"), masks=True, zero_head=True),
    "fomaml": AlgorithmSpec(
        algorithms.maml, _GRADIENT, {"first_order": True}, masks=True, zero_head=True
    ),
    "anil": AlgorithmSpec(algorithms.anil, (*_GRADIENT, "first_order", "head"), zero_head=True),
    "meta_sgd": AlgorithmSpec(algorithms.meta_sgd, (*_GRADIENT, "first_order"), masks=True),
    "mamlpp": AlgorithmSpec(
        algorithms.mamlpp,
        (*_GRADIENT, "first_order", "lslr", "multi_step_loss", "anneal_iters", "first_order_until"),
        masks=True,
    ),
    "imaml": AlgorithmSpec(algorithms.imaml, (*_INNER, *_TASKS, "reg", "cg_steps"), zero_head=True),
    "reptile": AlgorithmSpec(
        algorithms.reptile, (*_INNER, *_TASKS, "inner_batch"), masks=True, zero_head=True
    ),
    "pretrain": AlgorithmSpec(algorithms.pretrain, _INNER, masks=True),
    "protonets": AlgorithmSpec(
        algorithms.protonets, ("distance", "cosine_scale"), metric_based=True
    ),
    "proto_maml": AlgorithmSpec(
        algorithms.proto_maml,
        (*_GRADIENT, "first_order", "distance", "cosine_scale"),
        masks=True,
        prototype_head=True,
    ),
    "proto_fomaml": AlgorithmSpec(
        algorithms.proto_maml,
        (*_GRADIENT, "distance", "cosine_scale"),
        {"first_order": True},
        masks=True,
        prototype_head=True,
    ),
}


class Experiment(NamedTuple):
    """A built experiment.

    Attributes:
      config: the config it was built from.
      setup: the task family's setup.
      algo: the :class:`MetaLearner`.
      optimizer: the outer optax optimizer.
      params: the initial parameters ``algo.init`` takes (the embedding's for ProtoNets).
      loss_fn: the query loss of adapted parameters, for evaluation.
      metric_fn: the query metrics of adapted parameters, or None.
      evaluator: the family's :class:`~metajax.run.setup.Evaluator` (for ProtoNets and
        Proto-MAML, predicting from the prototypes or the prototype head).
    """

    config: Config
    setup: Setup
    algo: MetaLearner
    optimizer: optax.GradientTransformation
    params: Params
    loss_fn: LossFn
    metric_fn: MetricFn | None
    evaluator: Evaluator


def build(config: Config) -> Experiment:
    """Builds the experiment ``config`` describes (the model initialised from ``train.seed``).

    Raises:
      ConfigError: an unknown family or algorithm, a setting the algorithm does not take, or
        a value the family or the algorithm refuses; nothing has been written.
    """
    family = families.load(config.family)
    if not isinstance(config.task, family.task_config):
        raise ConfigError(
            f"config.task is a {type(config.task).__name__}; family "
            f"{config.family!r} takes {family.task_config.__name__}."
        )
    try:
        setup = family.build(config)
    except (ValueError, TypeError) as e:  # a source or model refusing the task's values
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"task: {e}") from None
    spec = _spec(config.algorithm.name)
    loss_fn, metric_fn, params, evaluator = (
        setup.loss_fn,
        setup.metric_fn,
        setup.params,
        setup.evaluator,
    )
    extra = {}
    if spec.on_embedding:
        if setup.embedding is None:
            raise ConfigError(
                f"algorithm {config.algorithm.name!r} classifies by distances "
                f"between embeddings; family {config.family!r} is not a "
                "classification family with an embedding."
            )
        embedding = setup.embedding
        distance_fn = distance_by_name(config.algorithm.distance, config.algorithm.cosine_scale)

        def predict_fn(adapted, x):
            if spec.prototype_head:
                return proto_maml_logits(embedding.apply_fn, adapted, x)
            return protonet_logits(embedding.apply_fn, adapted, x, distance_fn)

        params, loss_fn, metric_fn = (
            embedding.params,
            classification_loss(predict_fn),
            accuracy_metric(predict_fn),
        )
        evaluator = evaluator._replace(predict_fn=predict_fn)
        extra = {"ways": embedding.ways}
    algo = make_algorithm(config.algorithm, setup, extra)
    optimizer = make_optimizer(config.optimizer, config.train.steps)
    if setup.wrap_optimizer is not None:
        optimizer = setup.wrap_optimizer(optimizer)
    if config.algorithm.zero_head:
        params, optimizer = _zero_head(config, setup, params, optimizer)
    return Experiment(config, setup, algo, optimizer, params, loss_fn, metric_fn, evaluator)


def _zero_head(config: Config, setup: Setup, params, optimizer):
    """The parameters with the family's head at zero, and ``optimizer`` with zero updates for
    it (``algorithm.zero_head``)."""
    name = config.algorithm.name
    if name == "reptile" and config.algorithm.inner_steps < 2:
        # At the first step a zero head passes no gradient to the body: nothing to learn.
        raise ConfigError(
            f"algorithm.zero_head=True: reptile with inner_steps={config.algorithm.inner_steps}"
            " never moves the body (a zero head passes it no gradient); use 2 or more."
        )
    if setup.head is None:
        raise ConfigError(f"algorithm.zero_head: family {config.family!r} has no head.")
    is_head = mask_by_path(params, setup.head)
    if not any(jax.tree.leaves(is_head)):
        raise ConfigError(
            f"algorithm.zero_head: no parameter of {name} matches the head {setup.head!r}."
        )
    params = jax.tree.map(lambda h, p: jnp.zeros_like(p) if h else p, is_head, params)
    labels = jax.tree.map(lambda h: "head" if h else "meta", is_head)
    return params, optax.multi_transform({"meta": optimizer, "head": optax.set_to_zero()}, labels)


def _spec(name: str) -> AlgorithmSpec:
    if name not in ALGORITHMS:
        raise ConfigError(
            f"algorithm.name={name!r}: unknown{suggest(name, ALGORITHMS)}; "
            f"choose one of {', '.join(ALGORITHMS)}."
        )
    return ALGORITHMS[name]


def _takes(spec: AlgorithmSpec, field: str) -> bool:
    """Whether the algorithm takes ``AlgorithmConfig.field`` (or fixes it)."""
    if field == "inner_optimizer_args":
        field = "inner_optimizer"
    if field == "zero_head":
        return spec.zero_head
    return field in spec.fixed or field in spec.takes


def drop_untaken_settings(config: Config, given: Iterable[str] = ()) -> tuple[Config, list[str]]:
    """Resets the algorithm settings the named algorithm does not take to their defaults.

    A config file written for one algorithm sets what that algorithm takes (an inner rate,
    inner steps); naming another one (``--set algorithm.name=protonets``) should not fail on
    them. Settings in ``given`` (dotted keys, those set on the command line) are kept, so
    :func:`make_algorithm` still refuses them. An unknown name is left for it to report.

    Returns:
      The config and the dotted keys reset, in field order.
    """
    if config.algorithm.name not in ALGORITHMS:
        return config, []
    spec, defaults, given = ALGORITHMS[config.algorithm.name], AlgorithmConfig(), set(given)
    reset = {}
    for field in dataclasses.fields(AlgorithmConfig):
        name, key = field.name, f"algorithm.{field.name}"
        value = getattr(config.algorithm, name)
        if name == "name" or key in given or value == getattr(defaults, name):
            continue
        if not _takes(spec, name):
            reset[name] = getattr(defaults, name)
    if not reset:
        return config, []
    algorithm = dataclasses.replace(config.algorithm, **reset)
    return dataclasses.replace(config, algorithm=algorithm), [f"algorithm.{n}" for n in reset]


def make_algorithm(cfg: AlgorithmConfig, setup: Setup, extra: dict | None = None) -> MetaLearner:
    """The :class:`MetaLearner` ``cfg`` names, on the family's losses (or embedding)."""
    spec = _spec(cfg.name)
    defaults = AlgorithmConfig()
    kwargs = dict(extra or {})
    for field in dataclasses.fields(AlgorithmConfig):
        name = field.name
        if name in ("name", "inner_optimizer", "inner_optimizer_args"):
            continue  # the inner optimizer is built below, from both of its fields
        if name == "zero_head":  # build zeroes the head and masks its outer updates
            if cfg.zero_head and not spec.zero_head:
                raise ConfigError(f"algorithm.zero_head=True: {cfg.name} takes no 'zero_head'.")
            continue
        value = getattr(cfg, name)
        if name == "unroll" and value is None:  # a config.json may say null: the default
            continue
        if name in spec.fixed:
            if value != getattr(defaults, name) and value != spec.fixed[name]:
                raise ConfigError(
                    f"algorithm.{name}={value!r}: {cfg.name} fixes {name}={spec.fixed[name]!r}."
                )
            kwargs[name] = spec.fixed[name]
        elif name in spec.takes:
            if name == "head" and value is None:
                value = setup.head
                if value is None:
                    raise ConfigError(
                        "algorithm.head: family has no default head; set "
                        "algorithm.head to a regex of the parameter paths to adapt."
                    )
            kwargs[name] = value
        elif value != getattr(defaults, name):
            raise ConfigError(f"algorithm.{name}={value!r}: {cfg.name} takes no {name!r}.")
    if cfg.inner_optimizer is not None or cfg.inner_optimizer_args:
        if "inner_optimizer" not in spec.takes:
            raise ConfigError(
                f"algorithm.inner_optimizer={cfg.inner_optimizer!r}: {cfg.name} "
                "takes no inner optimizer."
            )
        kwargs.update(inner_rule(cfg))
    if not spec.on_embedding:
        kwargs["metric_fn"] = setup.metric_fn
    if setup.inner_mask is not None:  # ANIL restricts its inner loop by `head` instead
        if spec.prototype_head:
            kwargs["mask"] = _embedding_mask(setup)
        elif spec.masks:
            kwargs["mask"] = setup.inner_mask
        elif "head" not in spec.takes:
            raise ConfigError(
                f"algorithm {cfg.name!r} cannot restrict its inner loop to part "
                "of the parameters, which this family's model asks for."
            )
    first = setup.embedding.apply_fn if spec.on_embedding else setup.loss_fn
    try:
        return spec.fn(first, **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"algorithm {cfg.name}: {e}") from None


def _embedding_mask(setup: Setup) -> Any:
    """The part of the family's inner mask over its embedding: the embedding's parameters are
    the model's top-level entries but the head (e.g. ``{"model": ...}`` of ``{"model": ...,
    "head": ...}``)."""
    mask, params = setup.inner_mask, setup.embedding.params
    if not (isinstance(mask, dict) and isinstance(params, dict) and set(params) <= set(mask)):
        raise ConfigError(
            "this family's inner mask does not cover its embedding's parameters; Proto-MAML "
            "cannot tell which of them adapt."
        )
    return {name: mask[name] for name in params}


def inner_rule(cfg: AlgorithmConfig) -> dict:
    """``inner_optimizer`` (optax at ``inner_lr``) as keywords; Adam-like ones get
    ``eps_root=1e-8`` unless set, since the derivative of ``sqrt(v)`` at 0 is infinite."""
    if cfg.inner_optimizer is None:
        raise ConfigError("algorithm.inner_optimizer_args given without algorithm.inner_optimizer.")
    fn = getattr(optax, cfg.inner_optimizer, None)
    if not callable(fn) or cfg.inner_optimizer.startswith("_"):
        raise ConfigError(
            f"algorithm.inner_optimizer={cfg.inner_optimizer!r} is not an optax "
            f"optimizer{suggest(cfg.inner_optimizer, _optax_optimizers())}."
        )
    args = dict(cfg.inner_optimizer_args)
    if "eps_root" in inspect.signature(fn).parameters:
        args.setdefault("eps_root", 1e-8)
    try:
        opt = fn(cfg.inner_lr, **args)
    except TypeError as e:
        raise ConfigError(
            f"algorithm.inner_optimizer_args={cfg.inner_optimizer_args!r}: {e}"
        ) from None
    return {"inner_lr": None, "inner_optimizer": opt}


def _optax_optimizers() -> list[str]:
    return ["adam", "adamw", "sgd", "rmsprop", "adagrad", "lamb", "lion", "adafactor"]


def make_optimizer(cfg: OptimizerConfig, total_steps: int = 0) -> optax.GradientTransformation:
    """The outer optimizer; a ``linear`` or ``cosine`` schedule reaches 0 at ``total_steps``."""
    fn = getattr(optax, cfg.name, None)
    if not callable(fn) or cfg.name.startswith("_"):
        raise ConfigError(
            f"optimizer.name={cfg.name!r} is not an optax optimizer"
            f"{suggest(cfg.name, _optax_optimizers())}."
        )
    lr = cfg.lr
    if cfg.schedule == "linear":
        lr = optax.linear_schedule(cfg.lr, 0.0, total_steps)
    elif cfg.schedule == "cosine":
        lr = optax.cosine_decay_schedule(cfg.lr, total_steps)
    opt = fn(lr)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt) if cfg.clip_norm > 0 else opt
