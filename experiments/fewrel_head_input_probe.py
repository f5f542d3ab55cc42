"""What a zero head learns in a few SGD steps from each head input, before meta-training.

The pretrained model with its LoRA factors at their start (nothing meta-trained) and a zero
N-way head is adapted on validation tasks (factors and head, as FOMAML's inner loop) at each
``HEAD_INPUT:RATE`` pair; the accuracy and query loss after 0..5 inner steps show whether a
gradient-based meta-learner has a start to build on. ``raw`` is the states the prompt
readout pools after block 16; ``centered`` subtracts the mean meta-training state and scales
each state to unit root mean square (``task.head_input``)::

    .venv/bin/python experiments/fewrel_head_input_probe.py raw:0.0001 raw:0.001 raw:0.01 \\
        centered:0.01 centered:0.1 centered:1

Prints one line per pair and writes experiments/results/fewrel_head_input_probe.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from _shared_data import use_shared_data
from fewrel_proto_head_probe import curves

from metajax.run.build import build, make_algorithm
from metajax.run.config_files import load_config

RESULTS = Path(__file__).resolve().parent / "results"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pairs", nargs="+", help="HEAD_INPUT:RATE, e.g. centered:0.1")
    parser.add_argument("--config", default="fewrel:smollm2_prompt_5w1s_fomaml")
    parser.add_argument("--tasks", type=int, default=100, help="validation tasks per pair")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    use_shared_data()
    pairs = []
    for pair in args.pairs:
        head_input, _, rate = pair.partition(":")
        try:
            pairs.append((pair, head_input, float(rate)))
        except ValueError:
            parser.error(f"{pair!r} is not HEAD_INPUT:RATE (e.g. centered:0.1)")
    out, built = {}, {}
    for pair, head_input, rate in pairs:
        if head_input not in built:
            sets = ["task.eval_split=validation", f"task.head_input={head_input}"]
            built[head_input] = build(load_config(args.config, sets))
        exp = built[head_input]
        rule = dataclasses.replace(exp.config.algorithm, inner_lr=rate)
        acc, loss = curves(make_algorithm(rule, exp.setup), exp, args.tasks, args.steps)
        out[pair] = {"accuracy": acc.tolist(), "loss": loss.tolist()}
        print(f"{head_input}, rate {rate:g}: accuracy {np.round(acc, 4)}, loss {np.round(loss, 3)}")
    path = RESULTS / "fewrel_head_input_probe.json"
    path.write_text(json.dumps({"config": args.config, "tasks": args.tasks, "pairs": out}) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
