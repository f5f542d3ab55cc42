"""The trivial recommenders on the movies experiment's test tasks, and its report.

    .venv/bin/python experiments/movies_baselines.py movies:10s_maml [--out FILE] [--set K=V]
    .venv/bin/python experiments/movies_baselines.py --paired WORKDIR... [--against WORKDIR]
    .venv/bin/python experiments/movies_baselines.py --report RUNS_DIR

The first form scores, on exactly the tasks ``metajax eval`` draws for that config
(``eval.num_tasks`` tasks of ``task.eval_split``, meta-batch 0), the baselines a reader of
cold-start recommendation checks first; nothing is fitted to the test users but their
support ratings:

- global mean: the mean of every meta-training rating;
- movie mean: the movie's mean over meta-training users (the global mean if none rated it);
- user mean: the mean of the user's support ratings;
- movie mean + user offset: the movie mean plus the user's mean support residual from it;
- shrunk movie mean + user offset: the same with each movie mean shrunk to the global mean
  with prior weight 5 (the model's ``shrunk_mean`` feature).

It prints MAE, RMSE and nDCG@5 (the family's metric functions) with 95% intervals and
writes them as JSON (default ``/work/runs/movies_baselines_<K>s.json``). A constant
prediction ranks the query movies in their drawn (random) order.

``--paired`` evaluates runs again at what validation chose (``WORKDIR/validation/
choice.json``) and writes ``WORKDIR/paired.json``: the test metrics minus the movie mean +
user offset baseline's (and, with ``--against``, another run's, printed), task by task, with
95% intervals of those differences.
``--report`` reads ``RUNS_DIR/movies_<K>s_<algo>/eval.json`` and the baseline files, prints
the Markdown tables of experiments/results_movies.md and draws
experiments/results/movies_mae_vs_steps.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from metajax.run.build import build
from metajax.run.config_files import load_config
from metajax.tasks.movies import ndcg_at_k
from metajax.train import summarize

HERE = Path(__file__).resolve().parent
LABELS = {
    "maml": "MAML (2nd order)",
    "fomaml": "FOMAML",
    "reptile": "Reptile",
    "anil": "ANIL (head adapts)",
    "mamlpp": "MAML++",
    "pretrain": "pooled model, fine-tuned",
}
BASELINES = (
    "global mean",
    "movie mean",
    "user mean",
    "movie mean + user offset",
    "shrunk movie mean + user offset",
)


def predictions(support, query, global_mean: float) -> dict[str, np.ndarray]:
    """Each baseline's ``(tasks, queries)`` predictions from a batch of tasks."""
    ((_, fs), ys), ((_, fq), _) = support, query
    movie_s, movie_q = global_mean + fs[..., 0], global_mean + fq[..., 0]
    shrunk_s, shrunk_q = global_mean + fs[..., 1], global_mean + fq[..., 1]
    ones = np.ones_like(movie_q)
    return {
        "global mean": global_mean * ones,
        "movie mean": movie_q,
        "user mean": ys.mean(-1, keepdims=True) * ones,
        "movie mean + user offset": movie_q + (ys - movie_s).mean(-1, keepdims=True),
        "shrunk movie mean + user offset": shrunk_q + (ys - shrunk_s).mean(-1, keepdims=True),
    }


@jax.jit
def _scores(pred, y):
    per_task = jax.vmap(lambda p, t: ndcg_at_k(p, t, 5))(pred, y)
    err = pred - y
    return {
        "mae": jnp.abs(err).mean(-1),
        "rmse": jnp.sqrt(jnp.square(err).mean(-1)),
        "ndcg5": per_task,
    }


def per_task(source, num_tasks: int, chunk: int) -> dict[str, dict[str, np.ndarray]]:
    """``{baseline: {metric: (num_tasks,)}}`` on tasks ``0..num_tasks - 1`` of meta-batch 0."""
    parts = {name: [] for name in BASELINES}
    for first in range(0, num_tasks, chunk):
        tasks = source.sample(0, min(chunk, num_tasks - first), first)
        y = np.asarray(tasks.query[1])
        for name, pred in predictions(tasks.support, tasks.query, source.global_mean).items():
            parts[name].append(jax.device_get(_scores(jnp.asarray(pred, jnp.float32), y)))
    return {
        name: {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        for name, chunks in parts.items()
    }


def baselines(spec: str, overrides=()) -> dict:
    """``{baseline: {metric: {"mean": float, "ci95": float}}}`` on the config's eval tasks."""
    config = load_config(spec, overrides)
    cfg = config.eval
    scores = per_task(build(config).setup.eval_source, cfg.num_tasks, cfg.chunk)
    out = {}
    for name, metrics in scores.items():
        summary = summarize({k: v[:, None] for k, v in metrics.items()})
        out[name] = {k: {"mean": v["mean"][0], "ci95": v["ci95"][0]} for k, v in summary.items()}
    return {
        "config": spec,
        "shots": config.task.shots,
        "split": config.task.eval_split,
        "num_tasks": cfg.num_tasks,
        "baselines": out,
    }


def _run_per_task(workdir: Path) -> tuple[dict[str, np.ndarray], object, dict]:
    """A run's per-task test metrics at the checkpoint, rate and number of steps chosen on
    validation (``WORKDIR/validation/choice.json``), its eval source and that choice."""
    from metajax.run.checkpoint import restore_checkpoint
    from metajax.run.config import apply_overrides
    from metajax.run.workdir import read_config
    from metajax.train import evaluate

    best = json.loads((workdir / "validation" / "choice.json").read_text())["best"]
    config = read_config(workdir)
    if best["rate"] is not None:
        config = apply_overrides(config, [f"algorithm.inner_lr={best['rate']}"])
    exp, k, cfg = build(config), best["adaptation_steps"], config.eval
    state, _ = restore_checkpoint(exp, workdir, best["step"])
    model = evaluate(
        exp.algo,
        state.meta_params,
        exp.setup.eval_source,
        exp.loss_fn,
        exp.metric_fn,
        num_tasks=cfg.num_tasks,
        steps=k,
        chunk=cfg.chunk,
    )
    return (
        {n: np.asarray(v[:, k], np.float64) for n, v in model.items()},
        exp.setup.eval_source,
        best,
    )


def paired(workdir: Path, against: str = "movie mean + user offset") -> dict:
    """The run's test metrics minus a baseline's (or another run's, ``against`` a workdir),
    task by task, each at what validation chose for it."""
    model, source, best = _run_per_task(workdir)
    if Path(against).is_dir():
        other = _run_per_task(Path(against))[0]
    else:
        num = len(model["mae"])
        other = per_task(source, num, min(num, 100))[against]
    out = {"run": str(workdir), "against": against, "checkpoint": best}
    for name in ("mae", "rmse", "ndcg5"):
        s = summarize({name: (model[name] - other[name])[:, None]})[name]
        out[name] = {"mean": s["mean"][0], "ci95": s["ci95"][0]}
    return out


def _cell(m: dict, digits: int = 3) -> str:
    return f"{m['mean']:.{digits}f} ± {m['ci95']:.{digits}f}"


def baseline_table(result: dict) -> str:
    lines = ["| baseline | MAE | RMSE | nDCG@5 |", "|---|---|---|---|"]
    for name, m in result["baselines"].items():
        lines.append(f"| {name} | {_cell(m['mae'])} | {_cell(m['rmse'])} | {_cell(m['ndcg5'])} |")
    return "\n".join(lines)


def _runs(runs: Path, shots: int) -> dict[str, dict]:
    found = {}
    for algo in LABELS:
        path = runs / f"movies_{shots}s_{algo}" / "eval.json"
        if path.is_file():
            found[algo] = json.loads(path.read_text())
    return found


def _chosen_row(workdir: Path, label: str, res: dict) -> str:
    """One Markdown row: the test metrics at what validation chose, paired differences."""
    choice = workdir / "validation" / "choice.json"
    if not choice.is_file():
        return f"| {label} | (not chosen) | | | | | |"
    best = json.loads(choice.read_text())["best"]
    k, m = best["adaptation_steps"], res["metrics"]
    rate = res["config"]["algorithm"]["inner_lr"]
    pair = workdir / "paired.json"
    diffs = ["", ""]
    if pair.is_file():
        p = json.loads(pair.read_text())
        diffs = [f"{p[n]['mean']:+.3f} ± {p[n]['ci95']:.3f}" for n in ("mae", "ndcg5")]
    # Training may span processes (a resumed run): one wall_s*.txt each.
    train_s = sum(float(w.read_text()) for w in workdir.glob("wall_s*.txt"))
    eval_file = workdir / "eval_wall_s.txt"
    wall = f"{train_s:.0f}" + (
        f" + {float(eval_file.read_text()):.0f}" if eval_file.is_file() else ""
    )
    cells = [f"{m[n]['mean'][k]:.3f} ± {m[n]['ci95'][k]:.3f}" for n in ("mae", "ndcg5")]
    where = f"{best['step']}, {rate:g}, {k}"
    return f"| {label} | {where} | " + " | ".join(cells + diffs) + f" | {wall} |"


def report(runs: Path, steps=(0, 1, 2, 5, 10)) -> None:
    """Prints the tables and draws the MAE-against-steps figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, shots in zip(axes, (5, 10), strict=True):
        base_file = runs / f"movies_baselines_{shots}s.json"
        base = json.loads(base_file.read_text()) if base_file.is_file() else None
        found = _runs(runs, shots)
        print(f"\n### K = {shots}\n")
        if base:
            print(baseline_table(base) + "\n")
        head = (
            " | ".join(f"MAE, {s}" for s in steps)
            + " | "
            + " | ".join(f"nDCG@5, {s}" for s in steps)
        )
        print(f"| run | rate | {head} |")
        print("|---|---|" + "---|" * (2 * len(steps)))
        chosen = []
        for algo, res in found.items():
            chosen.append(_chosen_row(runs / f"movies_{shots}s_{algo}", LABELS[algo], res))
            m = res["metrics"]
            rate = res["config"]["algorithm"]["inner_lr"]
            cells = [
                f"{m[k]['mean'][s]:.3f} ± {m[k]['ci95'][s]:.3f}"
                for k in ("mae", "ndcg5")
                for s in steps
            ]
            print(f"| {LABELS[algo]} | {rate:g} | " + " | ".join(cells) + " |")
            mae = np.asarray(m["mae"]["mean"])
            ci = np.asarray(m["mae"]["ci95"])
            xs = np.arange(len(mae))
            ax.plot(xs, mae, marker="o", ms=3, label=LABELS[algo])
            ax.fill_between(xs, mae - ci, mae + ci, alpha=0.15)
        print(
            "\n| run | checkpoint, rate, steps (validation) | MAE | nDCG@5 | ΔMAE, paired |"
            " ΔnDCG@5, paired | train, choice + test (s) |\n|---|---|---|---|---|---|---|"
        )
        print("\n".join(chosen))
        if base:
            for i, name in enumerate(BASELINES[1:]):
                ax.axhline(
                    base["baselines"][name]["mae"]["mean"],
                    ls=("--", ":", "-.", (0, (1, 3)))[i],
                    color=f"C{6 + i}" if i < 4 else "k",
                    label=name,
                )
        ax.set_title(f"{shots} support ratings; 600 test tasks of held-out users")
        ax.set_xlabel("adaptation steps on the support ratings")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("query MAE (ratings 0-10), 95% interval shaded")
    axes[1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    out = HERE / "results" / "movies_mae_vs_steps.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"\nwrote {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("spec", nargs="?", help="a movies config, e.g. movies:10s_maml")
    parser.add_argument("--out", type=Path, help="the JSON written")
    parser.add_argument("--set", dest="sets", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--report", type=Path, metavar="RUNS_DIR")
    parser.add_argument("--paired", type=Path, nargs="*", metavar="WORKDIR")
    parser.add_argument("--against", type=Path, help="--paired: also against this run")
    args = parser.parse_args()
    if args.report is not None:
        report(args.report)
        return
    if args.paired:
        for workdir in args.paired:
            result = paired(workdir)
            (workdir / "paired.json").write_text(json.dumps(result, indent=1) + "\n")
            print(json.dumps(result))
            if args.against is not None:
                print(json.dumps(paired(workdir, str(args.against))))
        return
    if args.spec is None:
        parser.error("give a config spec or --report RUNS_DIR")
    result = baselines(args.spec, args.sets)
    out = args.out or Path(f"/work/runs/movies_baselines_{result['shots']}s.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['num_tasks']} {result['split']} tasks, K = {result['shots']}:\n")
    print(baseline_table(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
