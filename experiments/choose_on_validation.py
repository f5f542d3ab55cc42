"""Chooses a run's checkpoint and adaptation rate on validation tasks, then evaluates the test.

Every kept checkpoint of WORKDIR, at every rate given, is evaluated on the validation split
(``task.eval_split=validation``; ``eval.scores=false``, so translation is compared by its
query bits per byte, not by the slow greedy chrF). The candidate with the best metric after
its best number of adaptation steps (0..``eval.inner_steps``, also chosen here) is then
evaluated on the test split into WORKDIR/eval.json, so the test tasks never take part in
the choice: read the test metric at the chosen number of steps::

    .venv/bin/python experiments/choose_on_validation.py runs/fewrel_5w1s_maml --metric accuracy
    .venv/bin/python experiments/choose_on_validation.py runs/translate_8_pretrain \\
        --metric bits_per_byte --rates 0.01 0.03 0.1 0.3 1.0 --set eval.inner_steps=20

Writes WORKDIR/validation/step<N>[_lr<R>].json and WORKDIR/validation/choice.json; with
``--name NAME`` (e.g. the same run on 5-shot tasks, ``--set task.shots=5``),
WORKDIR/validation_NAME/ and WORKDIR/eval_NAME.json instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _shared_data import use_shared_data

from metajax.run.checkpoint import Checkpointer
from metajax.run.evaluate import evaluate_workdir
from metajax.run.workdir import read_config

LOWER_IS_BETTER = ("loss", "bits_per_byte", "mse")


def main():
    use_shared_data()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--metric", required=True, help="an eval.json metric, e.g. accuracy")
    parser.add_argument("--rates", type=float, nargs="*", default=[], help="inner rates tried")
    parser.add_argument(
        "--steps", type=int, nargs="*", default=[], help="checkpoints tried (default: all kept)"
    )
    parser.add_argument("--tasks", type=int, default=200, help="validation tasks per candidate")
    parser.add_argument(
        "--reuse", action="store_true", help="read validation files already written"
    )
    parser.add_argument(
        "--set",
        dest="sets",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="evaluation settings for validation and test, e.g. eval.inner_steps=20",
    )
    parser.add_argument(
        "--name",
        default="",
        help="a name for this choice (e.g. 5shot): writes validation_NAME/ and eval_NAME.json",
    )
    args = parser.parse_args()
    suffix = f"_{args.name}" if args.name else ""
    folder = args.workdir / f"validation{suffix}"
    folder.mkdir(exist_ok=True)
    ckpt = Checkpointer(args.workdir / "checkpoints", create=False)
    steps = args.steps or ckpt.all_steps()
    ckpt.close()
    rates = args.rates or [None]
    sign = 1.0 if args.metric in LOWER_IS_BETTER else -1.0
    scores = []
    for step in steps:
        for rate in rates:
            rate_set = [] if rate is None else [f"algorithm.inner_lr={rate}"]
            out = folder / (f"step{step}" + ("" if rate is None else f"_lr{rate}") + ".json")
            if not (args.reuse and out.is_file()):
                sets = ["task.eval_split=validation", "eval.scores=false"]
                sets += [*args.sets, f"eval.num_tasks={args.tasks}", *rate_set]
                evaluate_workdir(args.workdir, sets, step=step, output=out)
            means = json.loads(out.read_text())["metrics"][args.metric]["mean"]
            k = min(range(len(means)), key=lambda i: sign * means[i])
            best_k = {"adaptation_steps": k, args.metric: means[k]}
            scores.append({"step": step, "rate": rate, **best_k})
            print(f"validation: step {step}, rate {rate}: {args.metric} {means[k]:.4f} after {k}")
    best = min(scores, key=lambda s: sign * s[args.metric])
    choice = {"metric": args.metric, "validation_tasks": args.tasks, "best": best, "all": scores}
    (folder / "choice.json").write_text(json.dumps(choice, indent=1) + "\n")
    print(f"chosen on validation: {best}", flush=True)
    test = args.workdir / f"eval{suffix}.json"
    if best["rate"] is None and test.is_file() and not args.sets:
        done = json.loads(test.read_text())
        trained_rate = read_config(args.workdir).algorithm.inner_lr
        if (done["checkpoint_step"], done["config"]["algorithm"]["inner_lr"]) == (
            best["step"],
            trained_rate,
        ):
            print(f"{test} is already the test evaluation of step {best['step']}")
            return
    rate_set = [] if best["rate"] is None else [f"algorithm.inner_lr={best['rate']}"]
    evaluate_workdir(args.workdir, [*args.sets, *rate_set], step=best["step"], output=test)


if __name__ == "__main__":
    main()
