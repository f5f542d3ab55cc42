"""The table and figure of translation with SmolLM2-135M on the Latin-script test group.

Reads, under RUNS (default ``runs``), ``tr_sm_<k>_<algo>/eval.json`` of the
``translate:smollm2_<k>_<algo>`` runs, ``tr_sml_<k>_<algo>/eval.json`` of the
``translate:smollm2_latin_<k>_<algo>`` runs (meta-trained on the Latin-script training
languages only), and the baselines' file written by
``experiments/translate_baselines.py`` (copying the English name, in-context learning with
the same model). Prints one Markdown row per run and baseline (chrF and exact match at the
scored step counts, bits per target token; a run evaluated on fewer tasks than the baselines
gets the baselines' rows on its first tasks too, the same languages) and writes
``experiments/results/translate_smollm2_latin.png``: chrF against adaptation steps, the
baselines as horizontal lines::

    .venv/bin/python experiments/translate_pretrained_results.py runs \
        --baselines runs/translate_icl_latin_sm.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NAMES = {"maml": "second-order MAML", "fomaml": "FOMAML", "reptile": "Reptile",
         "pretrain": "fine-tuned on pooled pairs"}  # fmt: skip
BASELINES = {"copy": "copy the English name", "icl": "in-context learning"}
# Meta-training languages: the run directory's prefix and the row's words.
TRAIN_LANGUAGES = {"all": ("tr_sm", "all 137"), "latin": ("tr_sml", "81 Latin-script")}


def cell(mean: float, ci: float, scale: float = 1.0) -> str:
    return "-" if math.isnan(mean) else f"{scale * mean:.2f} ± {scale * ci:.2f}"


def runs_found(runs: Path) -> dict[tuple[int, str, str], dict]:
    """``{(shots, algo, training languages): eval.json}`` of the runs under ``runs``."""
    found = {}
    for languages, (prefix, _) in TRAIN_LANGUAGES.items():
        for shots in (8, 32):
            for algo in NAMES:
                path = runs / f"{prefix}_{shots}_{algo}" / "eval.json"
                if path.is_file():
                    found[shots, algo, languages] = json.loads(path.read_text())
    return found


def run_name(algo: str, languages: str) -> str:
    return f"{NAMES[algo]} (LoRA, top 2 blocks; {TRAIN_LANGUAGES[languages][1]} languages)"


def scored(result: dict) -> list[int]:
    """The step counts whose chrF was scored (the others are NaN in eval.json)."""
    chrf = result["metrics"]["chrf"]["mean"]
    return [s for s, v in zip(result["adaptation_steps"], chrf) if not math.isnan(v)]


def table(found: dict, baselines: list[dict]) -> list[str]:
    lines = [
        "| K | run | test tasks | chrF at each scored step count | exact match, last |"
        " bits per token, 0 steps | last |",
        "|---|---|---|---|---|---|---|",
    ]
    for (shots, algo, languages), result in found.items():
        m = result["metrics"]
        steps = scored(result)
        chrf = ", ".join(f"{s}: {cell(m['chrf']['mean'][s], m['chrf']['ci95'][s])}" for s in steps)
        last = steps[-1]
        bits = m["bits_per_token"]
        first, final = (
            cell(bits["mean"][0], bits["ci95"][0]),
            cell(bits["mean"][-1], bits["ci95"][-1]),
        )
        lines.append(
            f"| {shots} | {run_name(algo, languages)} | {result['num_tasks']} | {chrf} | "
            f"{cell(m['exact_match']['mean'][last], m['exact_match']['ci95'][last], 100)} % | "
            f"{first} | {final} |"
        )
    for result in baselines:
        for method, summary in result["methods"].items():
            chrf, exact = summary["chrf"], summary["exact_match"]
            lines.append(
                f"| {result['shots']} | {BASELINES[method]} | {result['num_tasks']} | "
                f"{cell(chrf['mean'], chrf['ci95'])} | "
                f"{cell(exact['mean'], exact['ci95'], 100)} % | - | - |"
            )
    return lines


def figure(found: dict, baselines: list[dict], path: Path) -> None:
    # Colour: the algorithm; line: the meta-training languages; marker and width: K.
    fig, ax = plt.subplots(figsize=(11, 5))
    for (shots, algo, languages), result in found.items():
        steps = scored(result)
        chrf = result["metrics"]["chrf"]
        ax.errorbar(
            steps, [chrf["mean"][s] for s in steps], yerr=[chrf["ci95"][s] for s in steps],
            marker="o" if shots == 8 else "^", ms=4, capsize=2, lw=1 + (shots > 8),
            ls="-" if languages == "all" else "-.", color=f"C{list(NAMES).index(algo)}",
            label=f"{NAMES[algo]}, K = {shots}, {TRAIN_LANGUAGES[languages][1]} languages, "
            f"{result['num_tasks']} tasks",
        )  # fmt: skip
    styles = {"copy": ("C7", ":"), "icl": ("k", "--")}
    for result in baselines:
        for method, summary in result["methods"].items():
            color, ls = styles[method]
            ax.axhline(
                summary["chrf"]["mean"], color=color, ls=ls, lw=1 + (result["shots"] > 8),
                label=f"{BASELINES[method]}, K = {result['shots']}, {result['num_tasks']} tasks",
            )  # fmt: skip
    ax.set_xlabel("adaptation steps on the K support pairs")
    ax.set_ylabel("chrF of greedy translations (0 to 100)")
    ax.set_title("English to held-out Latin-script languages: SmolLM2-135M")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def first_tasks(result: dict, n: int) -> dict:
    """A baselines' result restricted to its first ``n`` tasks, from its per-task scores: a
    run evaluated on ``n`` tasks drew the same languages in the same order, and the same
    pairs when the baselines were scored with the run's config (``translate_baselines.py
    --config``)."""
    per_task = result["per_task"]
    methods = {}
    for method in result["methods"]:
        methods[method] = {}
        for score in ("chrf", "exact_match"):
            values = np.asarray(per_task[f"{method}/{score}"][:n], np.float64)
            ci = 1.96 * values.std(ddof=1) / math.sqrt(n)
            methods[method][score] = {"mean": float(values.mean()), "ci95": float(ci)}
    return dict(result, num_tasks=n, methods=methods)


def matched(found: dict, baselines: list[dict]) -> list[dict]:
    """The baselines, plus each on the first n tasks of every run evaluated on fewer."""
    out = list(baselines)
    counts = sorted({r["num_tasks"] for r in found.values()})
    for result in baselines:
        out += [first_tasks(result, n) for n in counts if n < result["num_tasks"]]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="?", default=Path("runs"))
    parser.add_argument("--baselines", type=Path, nargs="*", default=[])
    args = parser.parse_args()
    found = runs_found(args.runs)
    baselines = [
        r
        for path in args.baselines
        for r in json.loads(path.read_text())["results"]
        if r["group"] == "latin"
    ]
    if not found and not baselines:
        raise SystemExit(f"no tr_sm[l]_<k>_<algo>/eval.json under {args.runs} and no baselines")
    baselines = matched(found, baselines)
    print("\n".join(table(found, baselines)))
    if found:  # without a run the figure would be the baselines' lines alone
        # The baselines on the tasks every run was evaluated on (the first n of each).
        fewest = min(r["num_tasks"] for r in found.values())
        lines = [b for b in baselines if b["num_tasks"] == fewest] or baselines
        figure(found, lines, RESULTS / "translate_smollm2_latin.png")


if __name__ == "__main__":
    main()
