"""Experiments as code: the config dataclasses, ``--set`` overrides and the builder registries.

A config file in ``experiments/`` defines ``get_config(variant: str = "") ->
Config`` (big_vision style); every file has a ``"tiny"`` variant for smoke
tests. :func:`build` turns a config into an :class:`Experiment` with two
small registries:

- task families (``Config.family``): ``config -> Setup`` (initial parameters,
  ``loss_fn``, ``metric_fn``, train and eval task sources, an optional plot);
  add one with ``@register_family("omniglot")``;
- algorithms (``Config.algorithm.name``): any function of
  ``metajax.algorithms`` is found by name and called with the config fields
  its signature takes; ``@register_algorithm`` adds variants (``fomaml``).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import os
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import optax

import metajax.algorithms
from metajax.algorithms.base import MetaLearner
from metajax.types import LossFn, MetricFn, Params


class ConfigError(ValueError):
    """A config name, variant or ``--set`` override that cannot be applied."""


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    """The meta-learning algorithm: a ``metajax.algorithms`` function name and its arguments.

    ``options`` holds extra keyword arguments as ``(("name", value), ...)``,
    e.g. ``--set 'algorithm.options=(("cg_steps", 5),)'``. ``inner_optimizer``
    names an optax optimizer (``"adam"``) that replaces plain SGD in the inner
    loop, built as ``optax.<name>(inner_lr, **dict(inner_optimizer_args))``.
    """

    name: str = "maml"
    inner_steps: int = 1
    inner_lr: float = 0.01
    first_order: bool = False
    remat: bool = False
    options: tuple = ()
    inner_optimizer: str = ""
    inner_optimizer_args: tuple = ()


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The outer optimizer: any optax function taking a learning rate first (adam, sgd, ...)."""

    name: str = "adam"
    lr: float = 1e-3
    clip_norm: float = 0.0  # > 0: clip the meta-gradient's global norm first
    schedule: str = "constant"  # or "linear" / "cosine": lr decays to 0 at train.steps


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The outer loop. ``devices=0`` uses every device of every process."""

    steps: int = 1000
    meta_batch: int = 25
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    devices: int = 0
    parallel: str = "sharding"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: ``num_tasks`` test tasks adapted for 0..``inner_steps`` steps."""

    num_tasks: int = 600
    inner_steps: int = 10
    chunk: int = 100
    vmap_tasks: bool = True  # False: one task at a time (ConvNets on a CPU, see train.evaluate)
    after_train: bool = True
    table_steps: tuple[int, ...] = (0, 1, 5, 10)


@dataclasses.dataclass(frozen=True)
class Config:
    """One experiment. ``task`` is the family's own frozen dataclass (shots, model size, ...)."""

    name: str
    family: str
    task: Any
    algorithm: AlgorithmConfig = AlgorithmConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()


class Setup(NamedTuple):
    """What a task family builds from a config.

    ``plot_fn(algo, meta_params, plots_dir) -> path | None`` draws a
    family-specific figure after evaluation (e.g. fitted sinusoids).
    ``embed_fn(params, x) -> (n, d)`` is what metric-based algorithms whose
    first argument is ``embed_fn`` (ProtoNets) get instead of ``loss_fn``.
    ``predict_fn(adapted, x) -> outputs`` maps what ``algo.adapt`` returns to
    predictions on new inputs (regression values, class or next-token logits).
    """

    params: Params
    loss_fn: LossFn
    metric_fn: MetricFn | None
    train_source: Any
    eval_source: Any
    plot_fn: Callable[..., Any] | None = None
    embed_fn: Callable[..., Any] | None = None
    predict_fn: Callable[..., Any] | None = None


class Experiment(NamedTuple):
    """A built experiment: the setup, the algorithm and the outer optimizer."""

    config: Config
    setup: Setup
    algo: MetaLearner
    optimizer: optax.GradientTransformation


FAMILIES: dict[str, Callable[[Config], Setup]] = {}
ALGORITHMS: dict[str, Callable[[AlgorithmConfig, LossFn, MetricFn | None], MetaLearner]] = {}


def register_family(name: str):
    """Decorator: ``@register_family("sinusoid") def build(config) -> Setup``."""

    def register(fn):
        FAMILIES[name] = fn
        return fn

    return register


def register_algorithm(name: str):
    """Decorator for a builder ``(algorithm_config, loss_fn, metric_fn) -> MetaLearner``."""

    def register(fn):
        ALGORITHMS[name] = fn
        return fn

    return register


def algorithm_names() -> list[str]:
    """Registered builders plus the metajax.algorithms functions that return a MetaLearner."""

    def is_algorithm(name):
        fn = getattr(metajax.algorithms, name, None)
        ret = inspect.signature(fn).return_annotation if callable(fn) else None
        return ret in (MetaLearner, "MetaLearner")

    found = [n for n in getattr(metajax.algorithms, "__all__", []) if is_algorithm(n)]
    return sorted(set(found) | set(ALGORITHMS))


def make_algorithm(cfg: AlgorithmConfig, loss_fn: LossFn, metric_fn: MetricFn | None,
                   embed_fn: Callable[..., Any] | None = None):
    """The :class:`MetaLearner` named ``cfg.name``: registered, or a metajax.algorithms function.

    Fields of ``cfg`` the function's signature lacks must keep their defaults;
    otherwise the config asks for something the algorithm cannot do. A
    function whose first parameter is ``embed_fn`` (ProtoNets) gets the
    family's ``embed_fn`` in place of ``loss_fn``.
    """
    if cfg.name in ALGORITHMS:
        return ALGORITHMS[cfg.name](cfg, loss_fn, metric_fn)
    fn = getattr(metajax.algorithms, cfg.name, None)
    if not callable(fn) or cfg.name[0].isupper():
        raise ConfigError(f"unknown algorithm {cfg.name!r}{_suggest(cfg.name, algorithm_names())}; "
                          f"available: {', '.join(algorithm_names())}.")
    accepted = inspect.signature(fn).parameters
    first = loss_fn
    if next(iter(accepted), None) == "embed_fn":
        if embed_fn is None:
            raise ConfigError(f"algorithm {cfg.name!r} needs an embedding; this task family "
                              "provides none (Setup.embed_fn).")
        first = embed_fn
    defaults = AlgorithmConfig()
    kwargs = dict(cfg.options)
    for field in ("inner_steps", "inner_lr", "first_order", "remat"):
        value = getattr(cfg, field)
        if field in accepted:
            kwargs.setdefault(field, value)
        elif value != getattr(defaults, field):
            raise ConfigError(f"algorithm.{field}={value!r}: {cfg.name} takes no {field!r}.")
    if cfg.inner_optimizer:
        if "inner_optimizer" not in accepted:
            raise ConfigError(f"algorithm.inner_optimizer={cfg.inner_optimizer!r}: {cfg.name} "
                              "takes no inner optimizer.")
        kwargs.update(inner_rule(cfg))
    if "metric_fn" in accepted:
        kwargs["metric_fn"] = metric_fn
    unknown = set(kwargs) - set(accepted)
    if unknown:
        raise ConfigError(f"algorithm.options: {cfg.name} takes no {sorted(unknown)}.")
    return fn(first, **kwargs)


def inner_rule(cfg: AlgorithmConfig) -> dict:
    """``inner_lr`` (plain SGD) or ``inner_optimizer`` (optax at ``inner_lr``), as keywords."""
    if not cfg.inner_optimizer:
        return {"inner_lr": cfg.inner_lr}
    fn = getattr(optax, cfg.inner_optimizer, None)
    if not callable(fn):
        raise ConfigError(f"algorithm.inner_optimizer={cfg.inner_optimizer!r} is not an optax "
                          "optimizer.")
    if cfg.inner_lr <= 0:
        raise ConfigError(f"algorithm.inner_lr={cfg.inner_lr} must be > 0 (it is the learning "
                          f"rate of optax.{cfg.inner_optimizer}).")
    try:
        opt = fn(cfg.inner_lr, **dict(cfg.inner_optimizer_args))
    except TypeError as e:
        raise ConfigError(f"algorithm.inner_optimizer_args={cfg.inner_optimizer_args!r}: {e}") \
            from None
    return {"inner_lr": None, "inner_optimizer": opt}


@register_algorithm("fomaml")
def _fomaml(cfg, loss_fn, metric_fn):
    return metajax.algorithms.maml(
        loss_fn, inner_steps=cfg.inner_steps, first_order=True, remat=cfg.remat,
        metric_fn=metric_fn, **inner_rule(cfg), **dict(cfg.options))


SCHEDULES = ("constant", "linear", "cosine")


def make_optimizer(cfg: OptimizerConfig, total_steps: int = 0) -> optax.GradientTransformation:
    """The outer optimizer; a ``linear`` or ``cosine`` schedule reaches 0 at ``total_steps``."""
    fn = getattr(optax, cfg.name, None)
    if not callable(fn):
        raise ConfigError(f"optimizer.name={cfg.name!r} is not an optax optimizer.")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"optimizer.schedule={cfg.schedule!r}: choose one of {SCHEDULES}.")
    lr = cfg.lr
    if cfg.schedule != "constant":
        if total_steps < 1:
            raise ConfigError(f"optimizer.schedule={cfg.schedule!r} needs train.steps >= 1.")
        lr = (optax.linear_schedule(cfg.lr, 0.0, total_steps) if cfg.schedule == "linear"
              else optax.cosine_decay_schedule(cfg.lr, total_steps))
    opt = fn(lr)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt) if cfg.clip_norm > 0 else opt


def build(config: Config) -> Experiment:
    """Builds the experiment a config describes (model initialised from ``train.seed``)."""
    _import_builtin_families()
    if config.family not in FAMILIES:
        raise ConfigError(f"unknown task family {config.family!r}"
                          f"{_suggest(config.family, FAMILIES)}; registered: {sorted(FAMILIES)}.")
    setup = FAMILIES[config.family](config)
    algo = make_algorithm(config.algorithm, setup.loss_fn, setup.metric_fn, setup.embed_fn)
    return Experiment(config, setup, algo, make_optimizer(config.optimizer, config.train.steps))


def _import_builtin_families() -> None:
    import metajax.families  # noqa: F401  (registers sinusoid, omniglot, words_lm, ...)


# --- finding and loading config files ------------------------------------------------------


def search_path() -> list[Path]:
    """Where config names are looked up: ``$METAJAX_EXPERIMENTS``, ./experiments, the repo's."""
    extra = [Path(p) for p in os.environ.get("METAJAX_EXPERIMENTS", "").split(os.pathsep) if p]
    return extra + [Path.cwd() / "experiments", Path(__file__).resolve().parents[1] / "experiments"]


def experiment_names() -> list[str]:
    names = set()
    for d in search_path():
        if d.is_dir():
            names |= {p.stem for p in d.glob("*.py") if not p.stem.startswith("_")}
    return sorted(names)


def load_config(spec: str, overrides: Sequence[str] = ()) -> Config:
    """Loads ``NAME``, ``NAME:VARIANT`` or ``path/to/file.py[:VARIANT]`` and applies overrides.

    Args:
      spec: an experiment name (a file in :func:`search_path`) or a path,
        optionally followed by ``:variant`` (e.g. ``sinusoid:tiny``).
      overrides: ``"key=value"`` strings with dotted keys (``train.steps=100``).
    """
    target, _, variant = spec.partition(":")
    path = Path(target)
    if not (target.endswith(".py") or path.is_file()):
        found = [d / f"{target}.py" for d in search_path() if (d / f"{target}.py").is_file()]
        if not found:
            raise ConfigError(f"no experiment {target!r}{_suggest(target, experiment_names())}; "
                              f"known: {', '.join(experiment_names()) or 'none'}.")
        path = found[0]
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.")
    module_spec = importlib.util.spec_from_file_location(f"metajax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(variant).")
    try:
        config = module.get_config(variant)
    except ValueError as e:  # an unknown variant
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(config, Config):
        raise ConfigError(f"{path}: get_config returned {type(config).__name__}, not a Config.")
    return apply_overrides(config, overrides)


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """Returns ``config`` with each ``"dotted.key=value"`` set, parsed by the field's type.

    Raises:
      ConfigError: naming the key (with close matches) when it does not exist,
        or naming the key and expected type when the value does not parse.
    """
    keys = flat_keys(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value.")
        if key not in keys:
            raise ConfigError(f"--set {key}: unknown config key{_suggest(key, keys)}.")
        config = _replace(config, key.split("."), raw, key)
    return config


def flat_keys(obj: Any, prefix: str = "") -> list[str]:
    """Every settable dotted key of a (nested) dataclass config."""
    out = []
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if dataclasses.is_dataclass(value):
            out += flat_keys(value, f"{prefix}{field.name}.")
        else:
            out.append(prefix + field.name)
    return out


def _replace(obj: Any, parts: list[str], raw: str, key: str) -> Any:
    name = parts[0]
    if len(parts) > 1:
        return dataclasses.replace(obj, **{name: _replace(getattr(obj, name), parts[1:], raw, key)})
    hint = typing.get_type_hints(type(obj))[name]
    try:
        value = _parse(raw, hint)
    except (ValueError, SyntaxError, TypeError) as e:
        raise ConfigError(f"--set {key}={raw}: expected {_type_name(hint)} ({e}).") from None
    return dataclasses.replace(obj, **{name: value})


def _parse(raw: str, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _parse(raw, arg)
            except (ValueError, SyntaxError, TypeError):
                continue
        raise ValueError("matches none of the union's types")
    if hint is type(None):
        if raw.strip().lower() in ("none", "null"):
            return None
        raise ValueError("not None")
    if hint is bool:
        low = raw.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError("use true or false")
    if hint is int:
        return int(raw)
    if hint is float:
        return float(raw)
    if hint is str:
        return raw
    if hint is tuple or origin is tuple:
        value = ast.literal_eval(raw)
        value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if args and args[-1] is Ellipsis:
            for v in value:
                if not isinstance(v, args[0]) or isinstance(v, bool) != (args[0] is bool):
                    raise TypeError(f"element {v!r} is not {args[0].__name__}")
        return value
    if hint is Any:
        return ast.literal_eval(raw)
    raise TypeError(f"cannot parse a {hint} from the command line")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.5)
    if not close:  # "steps" -> "train.steps": match the last component too
        tail = {c.rsplit(".", 1)[-1]: c for c in candidates}
        close = [tail[c] for c in difflib.get_close_matches(word.rsplit(".", 1)[-1], tail, n=3)]
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def config_dict(config: Config) -> dict:
    """JSON-ready dict of a config (tuples as lists), with the task dataclass's type name."""
    out = dataclasses.asdict(config)
    out["task"] = {"type": type(config.task).__name__, **out["task"]}
    return out
