"""The runner's evaluation: held-out tasks, ``eval.json`` and the printed table."""

from __future__ import annotations

import json
from pathlib import Path

import jax

from metajax.experiment import Experiment
from metajax.train import evaluate, summarize


def run_eval(exp: Experiment, meta_params, workdir: Path, *, step: int | None = None,
             echo=print) -> dict:
    """Evaluates ``meta_params`` on ``eval.num_tasks`` test tasks; writes ``eval.json``; plots.

    Every process computes the same numbers on its own devices (no
    collectives); only process 0 writes files and prints.

    Returns:
      The eval.json content: ``{"metrics": {name: {"mean": [...], "ci95": [...]}}, ...}``,
      lists indexed by the number of adaptation steps ``0..inner_steps``.
    """
    cfg = exp.config.eval
    per_task = evaluate(exp.algo, meta_params, exp.setup.eval_source, exp.setup.loss_fn,
                        exp.setup.metric_fn, num_tasks=cfg.num_tasks, steps=cfg.inner_steps,
                        chunk=cfg.chunk, vmap_tasks=cfg.vmap_tasks)
    result = {
        "config": exp.config.name,
        "checkpoint_step": step,
        "num_tasks": cfg.num_tasks,
        "adaptation_steps": list(range(cfg.inner_steps + 1)),
        "confidence": "95% half-width: 1.96 * sample std / sqrt(num_tasks)",
        "metrics": summarize(per_task),
    }
    if jax.process_index() != 0:
        return result
    workdir = Path(workdir)
    (workdir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    echo(format_table(result, cfg.table_steps))
    echo(f"wrote {workdir / 'eval.json'}")
    if exp.setup.plot_fn is not None:
        path = exp.setup.plot_fn(exp.algo, meta_params, workdir / "plots")
        if path is not None:
            echo(f"plot of adapted fits: {path}")
    return result


def format_table(result: dict, table_steps=(0, 1, 5, 10)) -> str:
    """Rows: adaptation steps; columns: each metric's mean +- 95% CI over the test tasks."""
    last = result["adaptation_steps"][-1]
    steps = sorted({s for s in table_steps if 0 <= s <= last} | {0, last})
    names = list(result["metrics"])
    header = f"{'steps':>5}  " + "  ".join(f"{'query ' + n:>24}" for n in names)
    lines = [f"Held-out evaluation on {result['num_tasks']} test tasks (mean +- 95% CI):", header]
    for s in steps:
        cells = []
        for n in names:
            m = result["metrics"][n]
            cells.append(f"{m['mean'][s]:>15.4f} +- {m['ci95'][s]:<6.4f}")
        lines.append(f"{s:>5}  " + "  ".join(cells))
    return "\n".join(lines)
