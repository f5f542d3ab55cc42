"""The runner's evaluation: held-out tasks, ``eval.json`` and the printed table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from metajax.run.build import Experiment
from metajax.run.config import Config, ConfigError, apply_overrides, changed_keys, to_dict
from metajax.train import evaluate, summarize

# What `metajax eval --set` may change on a trained workdir besides eval.*: what evaluation
# alone uses. A family adds its own (the test data, the evaluated split) in EVAL_KEYS.
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
    ``task.eval_split`` (test where it has none); writes ``output`` (default
    ``workdir/eval.json``); plots.

    Every process computes the same numbers on its own devices (no collectives); only
    process 0 writes files and prints.

    Returns:
      The eval.json content: ``{"metrics": {name: {"mean": [...], "ci95": [...]}}, ...}``,
      lists indexed by the number of adaptation steps ``0..inner_steps``; ``config`` is the
      full config evaluated (task settings included).
    """
    cfg = exp.config.eval
    per_task = evaluate(
        exp.algo,
        meta_params,
        exp.setup.eval_source,
        exp.loss_fn,
        exp.metric_fn,
        num_tasks=cfg.num_tasks,
        steps=cfg.inner_steps,
        chunk=cfg.chunk,
        vmap_tasks=cfg.vmap_tasks,
    )
    if exp.setup.score_fn is not None and cfg.scores:
        per_task.update(host_scores(exp, meta_params))
    result = {
        "config_name": exp.config.name,
        "checkpoint_step": step,
        "num_tasks": cfg.num_tasks,
        "split": getattr(exp.config.task, "eval_split", "test"),
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
    if exp.setup.plot_fn is not None:
        path = exp.setup.plot_fn(exp.algo, meta_params, workdir / "plots")
        if path is not None:
            echo(f"plot of adapted fits: {path}")
    return result


def host_scores(exp: Experiment, meta_params) -> dict[str, np.ndarray]:
    """``Setup.score_fn`` of every held-out task after 0..``eval.inner_steps`` steps (only
    at ``eval.score_steps`` where given; NaN at the others).

    The adapted parameters of each step come from one jitted ``adapt_trace`` per task;
    the scores are computed on the host.

    Returns:
      ``{name: array (num_tasks, inner_steps + 1)}``, like :func:`metajax.evaluate`.
    """
    cfg, algo = exp.config.eval, exp.algo
    trace = jax.jit(
        lambda mp, support: algo.adapt_trace(mp, support, lambda p: p, steps=cfg.inner_steps)[1]
    )
    params = jax.device_put(jax.device_get(meta_params))
    scored = set(cfg.score_steps or range(cfg.inner_steps + 1))
    rows = []
    for first in range(0, cfg.num_tasks, cfg.chunk):
        tasks = jax.device_get(
            exp.setup.eval_source.sample(0, min(cfg.chunk, cfg.num_tasks - first), first)
        )
        for i in range(jax.tree.leaves(tasks)[0].shape[0]):
            task = jax.tree.map(lambda x, i=i: x[i], tasks)
            adapted = trace(params, task.support)
            steps = {
                k: exp.setup.score_fn(jax.tree.map(lambda x, k=k: x[k], adapted), task.query)
                for k in sorted(scored)
            }
            names = next(iter(steps.values()))
            rows.append(
                {
                    n: [steps[k][n] if k in steps else np.nan for k in range(cfg.inner_steps + 1)]
                    for n in names
                }
            )
    return {name: np.asarray([r[name] for r in rows], np.float64) for name in rows[0]}


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
