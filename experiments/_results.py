"""Tables and figures of experiments/RESULTS.md from the run directories (``runs/<name>``).

    .venv/bin/python experiments/_results.py [RUNS_DIR]

Prints Markdown tables (mean +- 95% CI over the test tasks, wall-clock of each run) and writes
PNGs to experiments/results/. The leading underscore keeps this file out of the experiment
list. Per-task medians of the sinusoid runs are recomputed from the checkpoints (seconds),
because one diverging task dominates some means.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
# Runs resumed on a GPU after this meta-step: the wall-clock panel (CPU seconds) stops there.
GPU_FROM = {"omniglot_20w1s_maml": 2500}


def load(run: Path) -> dict | None:
    if not (run / "eval.json").is_file():
        return None
    result = json.loads((run / "eval.json").read_text())
    wall = run / "wall_s.txt"
    result["wall_s"] = float(wall.read_text()) if wall.is_file() else None
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    result["curve"] = rows
    return result


def cell(metric: dict, step: int, scale: float = 1.0, digits: int = 3) -> str:
    if step >= len(metric["mean"]):
        return "-"
    return f"{scale * metric['mean'][step]:.{digits}f} ± {scale * metric['ci95'][step]:.{digits}f}"


def curve_time(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Meta-steps and cumulative training seconds at each log line (from steps_per_s)."""
    steps = np.array([r["step"] for r in rows], float)
    widths = np.diff(np.concatenate([[0.0], steps]))
    seconds = np.cumsum(widths / np.array([r["steps_per_s"] for r in rows]))
    return steps, seconds


def sinusoid_medians(run: Path, steps=(0, 1, 10)) -> list[float]:
    from metajax.run import predict as mp
    from metajax.train import evaluate

    model = mp.load(run)
    exp = model._exp
    per_task = evaluate(
        exp.algo,
        model.meta_params,
        exp.setup.eval_source,
        exp.setup.loss_fn,
        num_tasks=600,
        steps=max(steps),
        chunk=200,
    )["loss"]
    # nanmedian: a task whose fit diverged to NaN must not hide the other 599.
    return [float(np.nanmedian(per_task[:, s])) for s in steps]


def sinusoid(runs: Path) -> None:
    algos = ("maml", "fomaml", "reptile", "pretrain")
    if not any((run / "eval.json").is_file() for run in runs.glob("sinusoid_k*")):
        return  # keep the committed figures
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    print(
        "| K | algorithm | MSE, 0 steps | MSE, 1 step | MSE, 10 steps | median 1 / 10 steps "
        "| run time |"
    )
    print("|---|---|---|---|---|---|---|")
    for ax, k in zip(axes, (5, 10, 20), strict=True):
        for algo in algos:
            run = runs / f"sinusoid_k{k}_{algo}"
            r = load(run)
            if r is None:
                continue
            loss = r["metrics"]["loss"]
            med = sinusoid_medians(run)
            wall = f"{r['wall_s']:.0f} s" if r["wall_s"] else "-"
            print(
                f"| {k} | {algo} | {cell(loss, 0)} | {cell(loss, 1)} | {cell(loss, 10)} | "
                f"{med[1]:.3f} / {med[2]:.3f} | {wall} |"
            )
            mean, ci = np.array(loss["mean"]), np.array(loss["ci95"])
            x = np.arange(len(mean))
            ax.plot(x, mean, "o-", ms=3, label=algo)
            ax.fill_between(x, np.maximum(mean - ci, 1e-3), mean + ci, alpha=0.15)
        ax.set_title(f"K = {k}")
        ax.set_xlabel("adaptation steps (SGD, lr 0.01)")
        ax.set_yscale("log")
        ax.set_ylim(0.01, 100)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("query MSE, 600 test tasks (95% CI)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(OUT / "sinusoid_mse_vs_steps.png", dpi=80)
    plt.close(fig)
    for name in ("sinusoid_k5_maml", "sinusoid_k5_pretrain"):
        src = runs / name / "plots" / "sinusoid_fit.png"
        if src.is_file():
            shutil.copy(src, OUT / f"{name}_fit.png")


def held_out_points(run: Path, pattern: str = "eval*.json") -> tuple[list[int], list[float]]:
    """Held-out accuracy at each evaluated checkpoint (``eval.json`` and earlier ones kept as
    ``eval_step<N>.json``; ``pattern="validation/step*.json"``: the validation evaluations of
    ``experiments/choose_on_validation.py`` at the run's own inner rate), after as many
    adaptation steps as the meta-training inner loop takes, so that the points sit on the
    same footing as the meta-train curve."""
    algorithm = json.loads((run / "config.json").read_text())["algorithm"]
    inner = algorithm["inner_steps"]
    points = []
    for path in run.glob(pattern):
        e = json.loads(path.read_text())
        if path.parent.name == "validation" and (
            e["config"]["algorithm"]["inner_lr"] != algorithm["inner_lr"]
        ):
            continue
        if "accuracy" in e["metrics"]:
            mean = e["metrics"]["accuracy"]["mean"]
            points.append((e["checkpoint_step"], mean[min(inner, len(mean) - 1)]))
    points.sort()
    return [p[0] for p in points], [p[1] for p in points]


def order_plot(runs: Path, names: dict[str, str], metric: str, path: str, title: str) -> None:
    """Meta-training curves of first- against second-order runs, by step and by wall-clock.

    Skipped when none of the runs is in ``runs``, so that regenerating from a partial runs
    folder leaves the committed figure alone.
    """
    found = [
        (label, name, r) for label, name in names.items() if (r := load(runs / name)) is not None
    ]
    if not found:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for label, name, r in found:
        steps, seconds = curve_time(r["curve"])
        y = np.array([row[metric] for row in r["curve"]])
        cpu = steps <= GPU_FROM.get(name, np.inf)
        (line,) = a.plot(steps, y, label=label)
        b.plot(seconds[cpu], y[cpu], label=label)
        if metric == "accuracy_after":
            held_out = held_out_points(runs / name)
            a.plot(*held_out, "o--", color=line.get_color(), ms=4, lw=0.8)
            validation = held_out_points(runs / name, "validation/step*.json")
            a.plot(*validation, "s:", color=line.get_color(), ms=4, lw=0.8)
        if not cpu.all():
            a.axvline(GPU_FROM[name], color=line.get_color(), ls=":", lw=1)
            a.annotate(
                " H200 from here",
                (GPU_FROM[name], 0.37),
                color=line.get_color(),
                xycoords=("data", "axes fraction"),
                fontsize=8,
            )
    a.set_xlabel("meta-train step")
    b.set_xlabel("training wall-clock (s, shared 2-core CPU)")
    a.set_ylabel(f"meta-train {metric} (query, after adaptation)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        if "loss" in metric:
            ax.set_yscale("log")
    if metric == "accuracy_after":
        a.plot([], [], "ko--", ms=4, lw=0.8, label="held-out test tasks, same inner steps")
        if any((runs / name / "validation").is_dir() for _, name, _ in found):
            a.plot([], [], "ks:", ms=4, lw=0.8, label="validation tasks, same inner steps")
        # Below both panels: the held-out points sit where a legend inside would go.
        fig.legend(*a.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
        bottom = 0.16
    else:
        a.legend()
        bottom = 0.0
    fig.suptitle(title)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(OUT / path, dpi=80)
    plt.close(fig)


def generic(runs: Path, prefix: str, metric: str, steps: tuple[int, ...], scale=1.0) -> None:
    """One row per run; the last column is the run's final adaptation step (Reptile: 5 to 100)."""
    print(
        "| run | meta-steps | "
        + " | ".join(f"{metric}, {s} steps" for s in steps)
        + " | last step | run time |"
    )
    print("|---|---|" + "---|" * (len(steps) + 2))
    for run in sorted(runs.glob(f"{prefix}*")):
        r = load(run)
        if r is None:
            continue
        m = r["metrics"][metric]
        wall = f"{r['wall_s']:.0f} s" if r["wall_s"] else "-"
        cells = " | ".join(cell(m, s, scale) for s in steps)
        last = len(m["mean"]) - 1
        final = f"{cell(m, last, scale)} ({last})" if last > max(steps) else "-"
        print(f"| {run.name} | {r['curve'][-1]['step']} | {cells} | {final} | {wall} |")


def adaptation_plot(runs: Path, names: dict[str, str], metrics: dict[str, str], path: str) -> None:
    """Held-out metrics against adaptation steps (95% bands), one panel per metric.

    Skipped when none of the runs is in ``runs`` (the committed figure stays)."""
    found = [(label, r) for label, name in names.items() if (r := load(runs / name)) is not None]
    if not found:
        return
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.8))
    colors: dict[str, str] = {}
    for ax, (metric, ylabel) in zip(np.atleast_1d(axes), metrics.items(), strict=True):
        for label, r in found:
            if metric not in r["metrics"]:
                continue
            mean, ci = (np.array(r["metrics"][metric][k]) for k in ("mean", "ci95"))
            steps = np.arange(len(mean))
            scored = np.isfinite(mean)  # host-side scores may cover some step counts only
            steps, mean, ci = steps[scored], mean[scored], ci[scored]
            # One colour per method, one line style per setting ("..., K = 32" dashed).
            method, _, setting = label.rpartition(", ")
            color = colors.setdefault(method or label, f"C{len(colors)}")
            style = "--" if setting == "K = 32" else "-"
            ax.plot(steps, mean, "o" + style, ms=3, color=color, label=label)
            ax.fill_between(steps, mean - ci, mean + ci, color=color, alpha=0.15)
        ax.set_xlabel("adaptation steps on the support pairs")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[-1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(OUT / path, dpi=80)
    plt.close(fig)


def main(runs: Path) -> None:
    OUT.mkdir(exist_ok=True)
    print("## sinusoid\n")
    sinusoid(runs)
    order_plot(
        runs,
        {
            "MAML (2nd order)": "sinusoid_k5_maml",
            "FOMAML": "sinusoid_k5_fomaml",
            "Reptile": "sinusoid_k5_reptile",
        },
        "loss_after",
        "sinusoid_first_vs_second_order.png",
        "Sinusoid K = 5",
    )
    print("\n## omniglot\n")
    generic(runs, "omniglot", "accuracy", (0, 1, 3, 10), scale=100)
    for setting, title in (
        ("5w1s", "5-way 1-shot"),
        ("5w5s", "5-way 5-shot"),
        ("20w1s", "20-way 1-shot"),
    ):
        suffix = "" if setting == "5w1s" else f"_{setting}"
        order_plot(
            runs,
            {
                label: f"omniglot_{setting}_{algo}"
                for label, algo in (
                    ("MAML (2nd order)", "maml"),
                    ("FOMAML", "fomaml"),
                    ("ANIL (2nd order, head)", "anil"),
                    ("Reptile", "reptile"),
                    ("ProtoNets", "protonets"),
                )
            },
            "accuracy_after",
            f"omniglot{suffix}_first_vs_second_order.png",
            f"Omniglot {title}",
        )
    print("\n## words_lm\n")
    generic(runs, "words_lm", "bits_per_byte", (0, 1, 5, 20))
    order_plot(
        runs,
        {
            "MAML (2nd order)": "words_lm_maml",
            "FOMAML": "words_lm_fomaml",
            "Reptile": "words_lm_reptile",
            "pretrain": "words_lm_pretrain",
        },
        "loss_after",
        "words_lm_first_vs_second_order.png",
        "Byte LM, held-out-family languages",
    )
    print("\n## words_langid\n")
    generic(runs, "words_langid", "accuracy", (0, 1, 5, 10), scale=100)
    for shots in (1, 5):
        order_plot(
            runs,
            {
                label: f"words_langid_5w{shots}s_{algo}"
                for label, algo in (
                    ("MAML (2nd order)", "maml"),
                    ("FOMAML", "fomaml"),
                    ("Reptile", "reptile"),
                )
            },
            "accuracy_after",
            f"words_langid_5w{shots}s_first_vs_second_order.png",
            f"Language ID, 5-way {shots}-shot",
        )
    print("\n## fewrel\n")
    generic(runs, "fewrel", "accuracy", (0, 1, 5, 10), scale=100)
    order_plot(
        runs,
        {
            "MAML (2nd order)": "fewrel_5w1s_maml",
            "FOMAML": "fewrel_5w1s_fomaml",
            "ProtoNets": "fewrel_5w1s_protonets",
        },
        "accuracy_after",
        "fewrel_5w1s_first_vs_second_order.png",
        "FewRel 5-way 1-shot, meta-trained on Wikipedia and web text, tested on news",
    )
    print("\n## translate\n")
    for metric in ("chrf", "bits_per_byte"):
        generic(runs, "translate", metric, (0, 1, 5, 10, 20))
    adaptation_plot(
        runs,
        {
            f"{label}, K = {k}": f"translate_{k}_{algo}"
            for k in (8, 32)
            for label, algo in (
                ("MAML (2nd order)", "maml"),
                ("FOMAML", "fomaml"),
                ("Reptile", "reptile"),
                ("multilingual baseline", "pretrain"),
            )
        },
        {"chrf": "chrF of greedy translations (0-100)", "bits_per_byte": "bits per target byte"},
        "translate_chrf_vs_steps.png",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent / "runs")
