"""The runner's evaluation: held-out tasks, ``eval.json``, the printed table, and
``metajax eval`` on a trained workdir."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import jax

from metajax.run import families
from metajax.run.build import Experiment, build
from metajax.run.checkpoint import restore_checkpoint
from metajax.run.config import (
    Config,
    ConfigError,
    apply_overrides,
    changed_keys,
    to_dict,
    validate,
)
from metajax.run.workdir import lock as workdir_lock
from metajax.run.workdir import read_config
from metajax.train import summarize

# What `metajax eval --set` may change on a trained workdir besides eval.*: what evaluation
# alone uses. A family adds its own (the test data, the evaluated split): Family.eval_keys.
EVAL_KEYS = ("algorithm.inner_lr",)


def run_eval(
    exp: Experiment,
    meta_params,
    workdir: Path,
    *,
    step: int | None = None,
    output: Path | None = None,
    echo=print,
) -> dict:
    """Evaluates ``meta_params`` on ``eval.num_tasks`` held-out tasks of the family's
    ``task.eval_split`` (test where it has none) with the experiment's
    :class:`~metajax.run.setup.Evaluator`; writes ``output`` (default
    ``workdir/eval.json``); plots.

    Every process computes the same numbers on its own devices (no collectives); only
    process 0 writes files and prints.

    Returns:
      The eval.json content: ``{"metrics": {name: {"mean": [...], "ci95": [...]}}, ...}``,
      lists indexed by the number of adaptation steps ``0..inner_steps``; ``config`` is the
      full config evaluated (task settings included).
    """
    cfg = exp.config.eval
    per_task = exp.evaluator.run(exp, meta_params)
    result = {
        "config_name": exp.config.name,
        "checkpoint_step": step,
        "num_tasks": cfg.num_tasks,
        "split": _eval_split(exp.config),
        "adaptation_steps": list(range(cfg.inner_steps + 1)),
        "confidence": "95% half-width: 1.96 * sample std / sqrt(num_tasks)",
        "metrics": summarize(per_task),
        "config": to_dict(exp.config),
    }
    if jax.process_index() != 0:
        return result
    workdir = Path(workdir)
    output = workdir / "eval.json" if output is None else Path(output)
    output.write_text(json.dumps(result, indent=2) + "\n")
    echo(format_table(result, cfg.table_steps))
    echo(f"wrote {output}")
    if exp.evaluator.plot_fn is not None:
        path = exp.evaluator.plot_fn(exp.algo, meta_params, workdir / "plots")
        if path is not None:
            echo(f"plot of adapted fits: {path}")
    return result


def evaluate_workdir(
    workdir: str | Path,
    overrides=(),
    *,
    name: str | None = None,
    step: int | None = None,
    output: str | Path | None = None,
    echo=print,
) -> dict:
    """Evaluates a checkpoint of ``workdir`` with the config it was trained with.

    Args:
      workdir: a ``metajax train`` run directory.
      overrides: ``--set`` items; only what evaluation uses may change (``eval.*``, the
        adaptation rate, the family's ``eval_keys``: its test data and split).
      name: the config name given on the command line, which must be the workdir's.
      step: the checkpoint evaluated (default: the newest that reads); choosing one on
        validation tasks (``--set task.eval_split=validation``) is how a run's checkpoint
        is picked.
      output: the JSON file written (default ``workdir/eval.json``), so that a validation
        evaluation does not replace the test one. Writing the default takes the workdir's
        lock (a training run there writes it too); another file does not, so checkpoints
        can be evaluated while the run trains on.

    Raises:
      ConfigError: no config or checkpoint (at ``step``) in ``workdir``, a name that is not
        the workdir's, an override of a training setting, a task the data cannot give, an
        ``output`` whose folder does not exist, or a workdir another process writes to.
    """
    workdir = Path(workdir)
    trained = read_config(workdir)
    if trained is None:
        raise ConfigError(
            f"{workdir / 'config.json'} does not exist: is {workdir} a metajax train workdir?"
        )
    if name is not None and name != trained.name:
        raise ConfigError(
            f"{workdir} holds a {trained.name!r} run, not {name!r}: give its own name, or none."
        )
    config = eval_config(trained, overrides, families.load(trained.family).eval_keys)
    validate(config)
    check_eval_config(config)
    output = Path(output) if output is not None else workdir / "eval.json"
    if not output.parent.is_dir() or output.is_dir():
        raise ConfigError(f"--output {output}: not a file in an existing folder.")
    exp = build(config)
    check_sources(exp, train=False, evaluate=True)
    writes_workdir = output.resolve() == (workdir / "eval.json").resolve()
    with contextlib.ExitStack() as held:
        if writes_workdir and jax.process_index() == 0:
            held.enter_context(workdir_lock(workdir, "eval", echo=echo))
        state, step = restore_checkpoint(exp, workdir, step, echo=echo)
        echo(f"evaluating {workdir} at step {step}")
        return run_eval(exp, state.meta_params, workdir, step=step, output=output, echo=echo)


def eval_config(
    trained: Config, overrides: Sequence[str], family_keys: Sequence[str] = ()
) -> Config:
    """The trained config with ``overrides`` that change only what evaluation uses.

    Raises:
      ConfigError: an override of a setting that training fixed (the model, the data it
        was trained on, the algorithm's training settings), named.
    """
    config = apply_overrides(trained, overrides)
    allowed = set(EVAL_KEYS) | set(family_keys)
    refused = [
        k for k in changed_keys(trained, config) if not k.startswith("eval.") and k not in allowed
    ]
    if refused:
        raise ConfigError(
            f"metajax eval --set {', '.join(refused)}: evaluation can change "
            f"only eval.*, {', '.join(sorted(allowed))}; these were fixed by "
            "training."
        )
    return config


def format_table(result: dict, table_steps=(0, 1, 5, 10)) -> str:
    """Rows: adaptation steps; columns: each metric's mean +- 95% CI over the held-out tasks."""
    last = result["adaptation_steps"][-1]
    steps = sorted({s for s in table_steps if 0 <= s <= last} | {0, last})
    names = list(result["metrics"])
    header = f"{'steps':>5}  " + "  ".join(f"{'query ' + n:>24}" for n in names)
    split = result.get("split", "test")
    lines = [
        f"Held-out evaluation on {result['num_tasks']} {split} tasks (mean +- 95% CI):",
        header,
    ]
    for s in steps:
        cells = []
        for n in names:
            m = result["metrics"][n]
            cells.append(f"{m['mean'][s]:>15.4f} +- {m['ci95'][s]:<6.4f}")
        lines.append(f"{s:>5}  " + "  ".join(cells))
    return "\n".join(lines)


def check_eval_config(config: Config) -> None:
    """Evaluation settings that must agree with each other (one line, before writing)."""
    ec = config.eval
    bad = [s for s in ec.table_steps if not 0 <= s <= ec.inner_steps]
    if bad:
        raise ConfigError(
            f"eval.table_steps={ec.table_steps}: {bad[0]} is outside 0..eval.inner_steps "
            f"= {ec.inner_steps}; lower it or raise eval.inner_steps."
        )


def check_sources(exp: Experiment, *, train: bool, evaluate: bool) -> None:
    """Runs the task sources' own checks (``source.check()``: enough classes, drawings,
    sentences for the task shape), so a task the data cannot give is one config line
    before anything is written, not an error in the first sampled batch."""
    sources = []
    if train:
        sources.append(("train", exp.setup.train_source))
    if evaluate:
        sources.append((_eval_split(exp.config), exp.setup.eval_source))
    for split, source in sources:
        check = getattr(source, "check", None)
        if check is None:
            continue
        try:
            check()
        except (ValueError, FileNotFoundError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"task ({split} split): {e}") from None


def _eval_split(config: Config) -> str:
    return getattr(config.task, "eval_split", "test")
