"""The table and figure of few-shot language modelling with SmolLM2-135M (``words_lm``).

Reads, under RUNS (default ``runs``), ``w_sm_<algo>/eval.json`` of the
``words_lm:smollm2_<algo>`` runs and ``words_icl.json`` (``experiments/words_icl.py``: the
same test tasks with the K support words as a prompt, and with none). Prints one Markdown row
per run and baseline (query bits per byte after 0, 1, 5, 10 and 20 steps) and writes
``experiments/results/words_smollm2_bpb.png``: bits per byte against adaptation steps, the
in-context rows as horizontal lines::

    .venv/bin/python experiments/words_pretrained_results.py runs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NAMES = {"maml": "second-order MAML", "fomaml": "FOMAML", "reptile": "Reptile",
         "pretrain": "fine-tuned on pooled words"}  # fmt: skip
IN_CONTEXT = {"icl": "in-context learning (K words as a prompt)", "zero_shot": "no support words"}
STEP_COLUMNS = (0, 1, 5, 10, 20)


def cell(mean: float, ci: float) -> str:
    return f"{mean:.3f} ± {ci:.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="?", default=Path("runs"))
    args = parser.parse_args()
    found = {
        algo: json.loads(path.read_text())
        for algo in NAMES
        if (path := args.runs / f"w_sm_{algo}" / "eval.json").is_file()
    }
    icl_path = args.runs / "words_icl.json"
    icl = json.loads(icl_path.read_text()) if icl_path.is_file() else None
    if not found and icl is None:
        raise SystemExit(f"no w_sm_<algo>/eval.json and no words_icl.json under {args.runs}")
    steps = ", ".join(map(str, STEP_COLUMNS[1:]))
    print(f"| run | test tasks | bits per byte, 0 steps | {steps.replace(', ', ' | ')} |")
    print("|---" * (2 + len(STEP_COLUMNS)) + "|")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, (algo, result) in enumerate(found.items()):
        bpb = result["metrics"]["bits_per_byte"]
        cells = [cell(bpb["mean"][s], bpb["ci95"][s]) if s < len(bpb["mean"]) else "-"
                 for s in STEP_COLUMNS]  # fmt: skip
        print(f"| {NAMES[algo]} (LoRA, top 2 blocks) | {result['num_tasks']} | "
              + " | ".join(cells) + " |")  # fmt: skip
        ax.errorbar(
            range(len(bpb["mean"])), bpb["mean"], yerr=bpb["ci95"], marker="o", ms=3,
            capsize=2, color=f"C{n}", label=NAMES[algo],
        )  # fmt: skip
    if icl:
        for method, color in (("icl", "C3"), ("zero_shot", "C7")):
            bpb = icl["methods"][method]["bits_per_byte"]
            print(f"| {IN_CONTEXT[method]} | {icl['num_tasks']} | "
                  f"{cell(bpb['mean'], bpb['ci95'])} | - | - | - | - |")  # fmt: skip
            ax.axhline(bpb["mean"], color=color, ls="--", label=IN_CONTEXT[method])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("adaptation steps on the K support words")
    ax.set_ylabel("query bits per byte (lower is better)")
    ax.set_title("Words of held-out language families: SmolLM2-135M")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = RESULTS / "words_smollm2_bpb.png"
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
