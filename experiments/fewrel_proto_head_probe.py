"""Proto-MAML's head scale and inner rate on validation relations, before meta-training.

The pretrained model with its LoRA factors at their start (nothing meta-trained) is adapted on
validation tasks from the prototype head at each ``SCALE:RATE`` pair; the accuracy and query
loss after 0..5 inner steps show whether the inner loop moves at all. At 1 shot each support
sentence is its own class's prototype, so at a large scale the support loss is near zero and
no rate changes anything::

    .venv/bin/python experiments/fewrel_proto_head_probe.py --shots 1 10:1 3:1 3:3 1:3

Prints one line per pair and writes experiments/results/fewrel_proto_head_probe_<K>shot.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from _shared_data import use_shared_data

from metajax.run.build import build, make_algorithm
from metajax.run.config_files import load_config
from metajax.train import evaluate

RESULTS = Path(__file__).resolve().parent / "results"


def curves(algo, exp, tasks: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean query accuracy and loss after 0..``steps`` inner steps of ``algo`` from the
    experiment's initial parameters, over its first ``tasks`` evaluation tasks."""
    per_task = evaluate(
        algo,
        exp.params,
        exp.setup.eval_source,
        exp.loss_fn,
        exp.metric_fn,
        num_tasks=tasks,
        steps=steps,
        chunk=20,
    )
    return np.asarray(per_task["accuracy"]).mean(0), np.asarray(per_task["loss"]).mean(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pairs", nargs="+", help="SCALE:RATE, e.g. 3:1")
    parser.add_argument("--config", default="fewrel:smollm2_5w1s_proto_fomaml")
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=60, help="validation tasks per pair")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    use_shared_data()
    pairs = []
    for pair in args.pairs:
        try:
            scale, rate = map(float, pair.split(":"))
        except ValueError:
            parser.error(f"{pair!r} is not SCALE:RATE (two numbers, e.g. 3:1)")
        pairs.append((pair, scale, rate))
    config = load_config(args.config, ["task.eval_split=validation", f"task.shots={args.shots}"])
    exp = build(config)
    out = {}
    for pair, scale, rate in pairs:
        rule = dataclasses.replace(config.algorithm, inner_lr=rate, cosine_scale=scale)
        algo = make_algorithm(rule, exp.setup, {"ways": config.task.ways})
        acc, loss = curves(algo, exp, args.tasks, args.steps)
        out[pair] = {"accuracy": acc.tolist(), "loss": loss.tolist()}
        print(
            f"scale {scale:g}, rate {rate:g}: accuracy {np.round(acc, 4)}, loss {np.round(loss, 3)}"
        )
    path = RESULTS / f"fewrel_proto_head_probe_{args.shots}shot.json"
    path.write_text(json.dumps({"tasks": args.tasks, "pairs": out}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
