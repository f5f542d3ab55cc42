"""The experiment config schema: frozen dataclasses, ``--set`` overrides, JSON round trips.

A leaf module: it imports nothing from metajax, so config files, task families and the
runner can all import it. A config file (``metajax/configs/<name>.py``, or a user's own)
defines ``get_config(variant) -> Config`` (big_vision style); ``Config.task`` is the task
family's own frozen dataclass (``FAMILY.task_config`` in ``metajax/run/families/<family>.py``).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Sequence
from typing import Any


class ConfigError(ValueError):
    """A config, override, workdir or data folder that cannot be used; the CLI exits 2."""


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    """The meta-learning algorithm and its settings; a setting the algorithm lacks must keep
    its default (``metajax show CONFIG`` lists them all with their types).

    Attributes:
      name: maml, fomaml, anil, meta_sgd, mamlpp, imaml, reptile, pretrain, protonets,
        proto_maml or proto_fomaml (MAML or FOMAML with the head started, for every task,
        at the support's prototypes).
      inner_steps: inner-loop steps per task in meta-training (>= 1).
      inner_lr: inner learning rate (> 0): plain SGD, or the rate of inner_optimizer.
      first_order: stop the gradient through the inner gradients (maml, anil, meta_sgd,
        mamlpp, proto_maml).
      remat: recompute each inner step in the backward pass instead of storing it.
      unroll: the longest inner loop unrolled; longer ones are scanned (true: unroll every
        loop, false: scan every loop); metajax.adapt's default.
      task_batch: tasks vmapped at once (none: the whole meta-batch).
      unroll_tasks: with task_batch, unroll the loop over task groups (ConvNets on a CPU).
      monitor: also log the query loss and metrics before adaptation.
      inner_optimizer: an optax optimizer's name (adam, sgd, ...) for the inner loop at
        inner_lr; none: plain SGD. Adam-like optimizers get eps_root=1e-8 unless set, since
        the derivative of sqrt(v) at v = 0 is infinite.
      inner_optimizer_args: extra keyword arguments of inner_optimizer as (name, value)
        pairs, e.g. (("b1", 0.0),).
      head: anil: regex of the parameter paths that adapt; none: the family's head.
      zero_head: maml, fomaml, anil, reptile, imaml: the family's head starts every task at zero and
        is not meta-learned (its outer updates are zero), so no head bias carries over from
        the tasks of meta-training, whose labels are permuted (reptile: 2 or more inner
        steps, since at the first a zero head passes the body no gradient).
      lslr: mamlpp: learn per-layer per-step inner rates.
      multi_step_loss: mamlpp: the annealed weighted loss after every inner step.
      anneal_iters: mamlpp: meta-steps over which the multi-step weights anneal.
      first_order_until: mamlpp: first order before this meta-step, then second order.
      reg: imaml: proximal regularisation strength (> 0).
      cg_steps: imaml: conjugate-gradient iterations.
      inner_batch: reptile: support examples per inner step in meta-training (none: all).
      distance: protonets and proto_[fo]maml: squared_euclidean (the paper's) or
        centered_cosine (cosine after subtracting the task's mean prototype, times
        cosine_scale).
      cosine_scale: protonets and proto_[fo]maml: the logit scale of centered_cosine (> 0).
    """

    name: str = "maml"
    inner_steps: int = 1
    inner_lr: float = 0.01
    first_order: bool = False
    remat: bool = False
    unroll: int | bool = 8
    task_batch: int | None = None
    unroll_tasks: bool = False
    monitor: bool = True
    inner_optimizer: str | None = None
    inner_optimizer_args: tuple[tuple[str, float], ...] = ()
    head: str | None = None
    zero_head: bool = False
    lslr: bool = True
    multi_step_loss: bool = True
    anneal_iters: int = 1000
    first_order_until: int = 0
    reg: float = 1.0
    cg_steps: int = 5
    inner_batch: int | None = None
    distance: str = "squared_euclidean"
    cosine_scale: float = 10.0


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The outer optimizer.

    Attributes:
      name: any optax optimizer taking a learning rate first (adam, sgd, adamw, ...).
      lr: outer learning rate (> 0).
      clip_norm: > 0: clip the meta-gradient's global norm first; 0: no clipping.
      schedule: constant, linear or cosine (the last two decay to 0 at train.steps).
    """

    name: str = "adam"
    lr: float = 1e-3
    clip_norm: float = 0.0
    schedule: str = "constant"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The outer loop.

    Attributes:
      steps: meta-steps in all (a resume may raise it).
      meta_batch: tasks per meta-step; divisible by the number of devices.
      seed: seeds the model's initialisation and the task stream.
      log_every: meta-steps per metrics line and progress update.
      checkpoint_every: meta-steps per checkpoint.
      keep_checkpoints: checkpoints kept on disk.
      devices: devices to shard the meta-batch over; 0: all of every process.
      parallel: sharding (one jit over a device mesh) or pmap (the legacy path).
      mesh: (tasks, model): a 2-D device mesh, the meta-batch split over "tasks" and the
        parameters and optimizer state sharded over "model" (FSDP-style); (): a 1-D mesh
        of train.devices devices.
    """

    steps: int = 1000
    meta_batch: int = 25
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    devices: int = 0
    parallel: str = "sharding"
    mesh: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: ``num_tasks`` test tasks adapted for 0..``inner_steps`` steps.

    Attributes:
      num_tasks: held-out tasks evaluated.
      inner_steps: adaptation steps evaluated (0..inner_steps).
      chunk: tasks per evaluation batch.
      vmap_tasks: vmap the tasks of a chunk; false: one jitted task after another (the
        fast form for ConvNets on XLA:CPU).
      after_train: evaluate when training ends.
      table_steps: adaptation steps shown in the printed table.
      scores: also compute the family's host-side scores where it has them (translation:
        chrF and exact match of greedy translations, the slow part); false: only the
        jitted metrics, e.g. for choosing a rate by the query loss.
      score_steps: the adaptation step counts at which those host-side scores are
        computed; () is every one. The others are NaN in ``eval.json``; the jitted
        metrics always cover every step.
    """

    num_tasks: int = 600
    inner_steps: int = 10
    chunk: int = 100
    vmap_tasks: bool = True
    after_train: bool = True
    table_steps: tuple[int, ...] = (0, 1, 5, 10)
    scores: bool = True
    score_steps: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Config:
    """One experiment. ``task`` is the family's ``task_config`` (shots, model size, ...)."""

    name: str
    family: str
    task: Any
    algorithm: AlgorithmConfig = AlgorithmConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()


SCHEDULES = ("constant", "linear", "cosine")
# ProtoNets' named distances (metajax.algorithms.protonets.DISTANCES; this module imports no jax).
DISTANCES = ("squared_euclidean", "centered_cosine")


def require_positive(section: Any, *names: str, prefix: str = "task") -> None:
    """Raises :class:`ConfigError` naming the first of ``names`` whose value is below 1."""
    for name in names:
        value = getattr(section, name)
        if value < 1:
            raise ConfigError(f"{prefix}.{name}={value} must be >= 1.")


def validate(config: Config) -> None:
    """Range checks of the runner's own sections (the family checks ``task``)."""
    tc, ec, oc, ac = config.train, config.eval, config.optimizer, config.algorithm
    for name in ("steps", "meta_batch", "log_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(tc, name) < 1:
            raise ConfigError(f"train.{name}={getattr(tc, name)} must be >= 1.")
    if tc.devices < 0:
        raise ConfigError(f"train.devices={tc.devices} must be >= 0 (0: all devices).")
    if tc.parallel not in ("sharding", "pmap"):
        raise ConfigError(f"train.parallel={tc.parallel!r}: choose 'sharding' or 'pmap'.")
    if tc.mesh:
        if len(tc.mesh) != 2 or min(tc.mesh) < 1:
            raise ConfigError(f"train.mesh={tc.mesh}: give (tasks, model) sizes >= 1, or ().")
        if tc.parallel == "pmap":
            raise ConfigError(
                "train.mesh shards parameters, which the pmap path cannot: use "
                "train.parallel=sharding."
            )
        if tc.devices not in (0, tc.mesh[0] * tc.mesh[1]):
            raise ConfigError(
                f"train.devices={tc.devices} disagrees with train.mesh={tc.mesh} "
                f"({tc.mesh[0] * tc.mesh[1]} devices); set one of them."
            )
    if ec.num_tasks < 1 or ec.chunk < 1:
        raise ConfigError(f"eval.num_tasks={ec.num_tasks} and eval.chunk={ec.chunk} must be >= 1.")
    if ec.inner_steps < 0:
        raise ConfigError(f"eval.inner_steps={ec.inner_steps} must be >= 0.")
    if any(not 0 <= s <= ec.inner_steps for s in ec.score_steps):
        raise ConfigError(
            f"eval.score_steps={ec.score_steps}: each must be in [0, eval.inner_steps = "
            f"{ec.inner_steps}]."
        )
    if not oc.lr > 0:
        raise ConfigError(f"optimizer.lr={oc.lr} must be > 0.")
    if oc.clip_norm < 0:
        raise ConfigError(f"optimizer.clip_norm={oc.clip_norm} must be >= 0 (0: no clipping).")
    if oc.schedule not in SCHEDULES:
        raise ConfigError(f"optimizer.schedule={oc.schedule!r}: choose one of {SCHEDULES}.")
    if ac.inner_steps < 1:
        raise ConfigError(f"algorithm.inner_steps={ac.inner_steps} must be >= 1.")
    if not ac.inner_lr > 0:
        raise ConfigError(f"algorithm.inner_lr={ac.inner_lr} must be > 0.")
    if ac.distance not in DISTANCES:
        raise ConfigError(
            f"algorithm.distance={ac.distance!r}: unknown{suggest(ac.distance, DISTANCES)}; "
            f"choose one of {', '.join(DISTANCES)}."
        )
    if not ac.cosine_scale > 0:
        raise ConfigError(f"algorithm.cosine_scale={ac.cosine_scale} must be > 0.")
    if ac.cosine_scale != AlgorithmConfig.cosine_scale and ac.distance != "centered_cosine":
        raise ConfigError(
            f"algorithm.cosine_scale={ac.cosine_scale} scales centered_cosine only; "
            f"algorithm.distance is {ac.distance!r}."
        )
    for name in ("task_batch", "inner_batch"):
        value = getattr(ac, name)
        if value is not None and value < 1:
            raise ConfigError(f"algorithm.{name}={value} must be >= 1 (or none).")


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
            raise ConfigError(f"--set {key}: unknown config key{suggest(key, keys)}.")
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
        if type(None) in args and raw.strip().lower() in ("none", "null"):
            return None
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
        if raw.strip().lower() in ("none", "null"):
            raise ValueError("this key cannot be none")
        return raw
    if hint is tuple or origin is tuple:
        value = ast.literal_eval(raw)
        value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if args and args[-1] is Ellipsis and isinstance(args[0], type):
            for v in value:
                if not isinstance(v, args[0]) or isinstance(v, bool) != (args[0] is bool):
                    raise TypeError(f"element {v!r} is not {args[0].__name__}")
        return value
    if hint is Any:
        return ast.literal_eval(raw)
    raise TypeError(f"cannot parse a {hint} from the command line")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is None and hasattr(hint, "__name__"):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.5)
    if not close:  # "steps" -> "train.steps": match the last component too
        tail = {c.rsplit(".", 1)[-1]: c for c in candidates}
        close = [tail[c] for c in difflib.get_close_matches(word.rsplit(".", 1)[-1], tail, n=3)]
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def to_dict(config: Config) -> dict:
    """JSON-ready dict of a config (tuples as lists), with the task dataclass's type name."""
    out = dataclasses.asdict(config)
    out["task"] = {"type": type(config.task).__name__, **out["task"]}
    return out


def from_dict(data: dict, task_cls: type) -> Config:
    """The :class:`Config` that :func:`to_dict` wrote, its task built as ``task_cls``."""
    task = dict(data["task"])
    kind = task.pop("type", task_cls.__name__)
    if kind != task_cls.__name__:
        raise ConfigError(
            f"config: task type {kind!r} is not family {data['family']!r}'s {task_cls.__name__}."
        )
    hints = typing.get_type_hints(Config)

    def make(cls, fields):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"config: unknown {cls.__name__} keys {unknown}.")
        return cls(**{k: _tuples(v) for k, v in fields.items()})

    return Config(
        name=data["name"],
        family=data["family"],
        task=make(task_cls, task),
        **{k: make(hints[k], data.get(k, {})) for k in ("algorithm", "optimizer", "train", "eval")},
    )


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the frozen config dataclasses hold."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def flat_items(config: Config) -> dict[str, Any]:
    """``{"train.steps": 1000, ...}``: every settable key and its value."""
    return {key: _get(config, key) for key in flat_keys(config)}


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ between two configs (names and families too)."""
    a, b = flat_items(old), flat_items(new)
    keys = [k for k in a if a[k] != b.get(k)] + [k for k in b if k not in a]
    for top in ("name", "family"):
        if getattr(old, top) != getattr(new, top):
            keys.insert(0, top)
    if type(old.task) is not type(new.task):
        keys.insert(0, "task")
    return keys


def describe(config: Config) -> str:
    """One line per key: ``key: type = value  # what it means`` (``metajax show``)."""
    lines = [
        f"name: {config.name}",
        f"family: {config.family}",
        f"task: {type(config.task).__name__}",
    ]
    for key in flat_keys(config):
        if "." not in key:
            continue
        owner = _get(config, key.rsplit(".", 1)[0])
        field = key.rsplit(".", 1)[1]
        hint = typing.get_type_hints(type(owner))[field]
        doc = field_docs(type(owner)).get(field, "")
        value = _get(config, key)
        lines.append(f"{key}: {_type_name(hint)} = {_show(value)}" + (f"  # {doc}" if doc else ""))
    return "\n".join(lines)


def field_docs(cls: type) -> dict[str, str]:
    """The ``Attributes:`` section of a dataclass's docstring, one line per field."""
    docs, current = {}, None
    in_attributes = False
    for line in (cls.__doc__ or "").splitlines():
        if line.strip() == "Attributes:":
            in_attributes = True
            continue
        if not in_attributes:
            continue
        match = re.match(r"^\s{4,8}(\w+): (.*)$", line)
        if match and match.group(1) in {f.name for f in dataclasses.fields(cls)}:
            current = match.group(1)
            docs[current] = match.group(2).strip()
        elif current and line.strip():
            docs[current] += " " + line.strip()
    return docs


def _show(value: Any) -> str:
    return "none" if value is None else repr(value) if isinstance(value, str) else str(value)


def _get(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj
