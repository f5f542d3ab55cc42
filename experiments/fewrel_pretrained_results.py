"""Tables and the figure of the FewRel runs with SmolLM2-135M, from their result files.

Reads, under RUNS (default ``runs``): ``sm_5w1s_<algo>/eval.json`` (5-way 1-shot news, at the
checkpoint and rate chosen on validation by ``experiments/choose_on_validation.py``),
``sm_5w1s_<algo>/eval_5shot.json`` (the same runs on 5-shot tasks),
``sm_5w5s_<algo>/eval.json`` (runs meta-trained on 5-shot tasks), the same under
``sm_prompt_<setting>_<algo>`` (the ``smollm2_prompt_*`` configs), the ``validation*/choice.json``
files, ``sm_finetune/eval_<k>shot.json`` (``experiments/fewrel_finetune.py``), and
``experiments/results/fewrel_frozen_features.json``; the word-overlap reference is computed
here (seconds). Prints markdown tables and writes the figure of each readout that has runs,
``experiments/results/fewrel_smollm2_steps.png`` (end markers) and
``experiments/results/fewrel_smollm2_prompt_steps.png`` (the prompt)::

    .venv/bin/python experiments/fewrel_pretrained_results.py runs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _shared_data import use_shared_data  # noqa: E402
from fewrel_lexical import accuracy as word_overlap  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ADAPTING = {
    "maml": "second-order MAML",
    "fomaml": "FOMAML",
    "reptile": "Reptile",
    "proto_maml": "Proto-MAML, second order",
    "proto_fomaml": "Proto-MAML, first order",
}
STEP_COLUMNS = (0, 1, 2, 5, 10)
NO_STEPS = ("-",) * len(STEP_COLUMNS)
NAMES = {"protonets": "ProtoNets", "cosine": "ProtoNets by centered cosine", **ADAPTING}


def cell(mean: float, ci: float) -> str:
    return f"{100 * mean:.2f} ± {100 * ci:.2f} %"


def read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


PROMPT = "prompt_"
PROMPT_NOTE = ", prompt readout after block 16"


def run_rows(runs: Path, suffix: str, setting: str = "5w1s", note: str = "") -> dict:
    """``{name: (accuracy by step, ci by step, chosen steps, choice, test tasks, algo,
    readout)}`` of the runs found, with the end-marker readout (``sm_<setting>_<algo>``) and
    the prompt readout (``sm_prompt_<setting>_<algo>``), each name ``NAMES[algo] + note``
    (and :data:`PROMPT_NOTE`); ``eval_10steps.json`` (the same test tasks adapted up to 10
    steps) is read instead of ``eval.json`` where there is one."""
    rows = {}
    for readout, algo in ((r, a) for r in ("", PROMPT) for a in NAMES):
        workdir = runs / f"sm_{readout}{setting}_{algo}"
        result = read(workdir / f"eval_10steps{suffix}.json") or read(
            workdir / f"eval{suffix}.json"
        )
        if result is None:
            continue
        acc = result["metrics"]["accuracy"]
        choice = read(workdir / f"validation{suffix}" / "choice.json")
        # Without a validation choice (the in-domain protocol has no validation relations)
        # the row's main cell is its last step count, and its label says nothing was chosen.
        best = choice["best"] if choice else None
        steps = best["adaptation_steps"] if best else len(acc["mean"]) - 1
        rows[NAMES[algo] + note + (PROMPT_NOTE if readout else "")] = (
            acc["mean"],
            acc["ci95"],
            steps,
            best,
            result["num_tasks"],
            algo,
            readout,
        )
    return rows


def row(name: str, chosen: str, main: str, by_step=NO_STEPS) -> str:
    return f"| {name} | {chosen} | **{main}** | " + " | ".join(by_step) + " |"


def table(title, rows, finetune, frozen, overlap) -> list[str]:
    lines = [f"**{title}**", ""]
    lines.append(
        row(
            "run",
            "chosen on validation",
            "accuracy at the chosen steps",
            ("0 steps", *map(str, STEP_COLUMNS[1:])),
        ).replace("**", "")
    )
    lines.append("|---" * (3 + len(STEP_COLUMNS)) + "|")
    for name, (mean, ci, k, best, tasks, *_) in rows.items():
        chosen = (
            f"checkpoint {best['step']}, rate {best['rate'] or '-'}, {k} steps"
            if best
            else f"nothing chosen; {k} steps shown"
        )
        chosen += f"; {tasks} test tasks"
        by_step = [cell(mean[s], ci[s]) if s < len(mean) else "-" for s in STEP_COLUMNS]
        lines.append(row(f"{name} (LoRA, top 2 blocks)", chosen, cell(mean[k], ci[k]), by_step))
    if finetune:
        mean, ci, k = finetune["test"]["mean"], finetune["test"]["ci95"], finetune["steps"]
        by_step = [cell(mean[s], ci[s]) if s < len(mean) else "-" for s in STEP_COLUMNS]
        chosen = f"rate {finetune['rate']}, {k} steps"
        lines.append(
            row(
                "fine-tuned on the pooled relations, then adapted",
                chosen,
                cell(mean[k], ci[k]),
                by_step,
            )
        )
        lines.append(
            row("fine-tuned, prototypes of its features", "-", cell(*finetune["test_prototypes"]))
        )
    for result, label in frozen:
        lines.append(row("frozen SmolLM2 features, prototypes (no training)", label, cell(*result)))
    lines.append(row("word overlap (nothing learned)", "-", cell(*overlap)))
    return lines


def figure(rows, finetune, frozen, overlap, path: Path, prompt: bool = False) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (mean, ci, _, _, _, algo, readout) in rows.items():
        color = f"C{list(NAMES).index(algo)}"
        if len(mean) == 1:
            ls = "-." if readout else "--"
            ax.axhline(100 * mean[0], color=color, ls=ls, label=f"{name} (no steps)")
            continue
        m = [100 * v for v in mean]
        ax.errorbar(
            range(len(mean)),
            m,
            yerr=[100 * c for c in ci],
            color=color,
            marker="s" if readout else "o",
            ms=3,
            capsize=2,
            label=name,
        )
    if finetune:
        m = [100 * v for v in finetune["test"]["mean"]]
        ax.plot(range(len(m)), m, "k-.", marker="s", ms=3, label="fine-tuned on pooled relations")
    for (mean, _), label in frozen:
        ls = ":" if label.startswith("end") else (0, (1, 4))
        ax.axhline(100 * mean, color="C7", ls=ls, label=f"frozen features, prototypes ({label})")
    ax.axhline(100 * overlap[0], color="C8", ls="--", label="word overlap")
    ax.axhline(20, color="k", lw=0.5)
    ax.set_xlabel("adaptation steps on the support set")
    ax.set_ylabel("query accuracy on news, %")
    where = "the entities named after the sentence, block 16" if prompt else "the end markers"
    ax.set_title(f"FewRel 5-way 1-shot, Wikipedia/SemEval to news: SmolLM2-135M\nread at {where}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def frozen_rows(frozen_file: dict | None, setting: str, where: str = "") -> list:
    """``[((accuracy, ci), label)]``: the frozen features of each pooling at the layer and
    distance chosen for it on validation."""
    rows = []
    for pool, choice in (frozen_file or {}).get("pools", {}).items():
        result = choice["settings"][setting]
        label = f"{pool}: layer {choice['layer']}, {choice['distance']}{where}"
        rows.append(((result["accuracy"], result["ci95"]), label))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="?", default=Path("runs"))
    args = parser.parse_args()
    use_shared_data()
    frozen_file = read(RESULTS / "fewrel_frozen_features.json")
    for suffix, shots in (("", 1), ("_5shot", 5)):
        rows = run_rows(args.runs, suffix)
        if shots == 5:
            rows |= run_rows(args.runs, "", setting="5w5s", note=", meta-trained at 5 shots")
        finetune = read(args.runs / "sm_finetune" / f"eval_{shots}shot.json")
        frozen = frozen_rows(frozen_file, f"cross-domain 5w{shots}s")
        overlap = word_overlap("cross_domain", shots, "test")
        title = f"Cross-domain 5-way {shots}-shot (test: the 25 news relations)"
        print("\n".join(table(title, rows, finetune, frozen, overlap)) + "\n")
        if shots == 1:
            # One figure per readout, each with its own frozen-features line; a readout
            # without runs keeps the figure it has.
            for readout, name in (
                ("", "fewrel_smollm2_steps"),
                (PROMPT, "fewrel_smollm2_prompt_steps"),
            ):
                mine = {k: v for k, v in rows.items() if v[-1] == readout}
                lines = [f for f in frozen if f[1].startswith("prompt") == bool(readout)]
                if mine:
                    tune = None if readout else finetune
                    figure(mine, tune, lines, overlap, RESULTS / f"{name}.png", bool(readout))
    rows = run_rows(args.runs, "", setting="indomain_5w1s")
    frozen = frozen_rows(frozen_file, "in-domain 5w1s", " (the cross-domain protocol's)")
    overlap = word_overlap("in_domain", 1, "test")
    title = "In-domain 5-way 1-shot (test: 5 held-out Wikipedia relations)"
    print("\n".join(table(title, rows, None, frozen, overlap)))


if __name__ == "__main__":
    main()
