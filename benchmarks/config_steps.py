"""Time per meta-step of several configs on the same tasks, interleaved in one process.

    PYTHONPATH=. .venv/bin/python -m benchmarks.config_steps \
        fewrel:smollm2_5w1s_maml fewrel:smollm2_5w1s_fomaml fewrel:smollm2_5w1s_reptile

Each config is built as ``metajax train`` builds it (its family's task source, model, trunk
cache and loss); every config draws its first meta-batch from its own train source with the
same seed, so configs that differ only in the algorithm (the ``fewrel:smollm2_5w1s_*``
variants) step on identical tasks. Each whole jitted training step (``mj.make_train_step``:
meta-gradient and outer update, state donated) is compiled once, with FLOPs and temporary
bytes from XLA's analyses (:func:`benchmarks.measure.compile_stats`), then the configs are
timed in rounds: one call of each per round, in turn, so that load from other work on a
shared machine falls on all of them alike. Prints a Markdown table with each median and its
ratio to the first config's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

import metajax as mj
from benchmarks.measure import block, compile_stats
from metajax.run.build import build
from metajax.run.config_files import load_config


def prepare(spec: str, overrides: list[str]) -> dict:
    """Builds the config, samples its first meta-batch and compiles its training step."""
    exp = build(load_config(spec, overrides))
    tasks = jax.device_put(exp.setup.train_source.sample(0, exp.config.train.meta_batch))
    state = mj.train_state(exp.algo, exp.params, exp.optimizer)
    compiled, stats = compile_stats(mj.make_train_step(exp.algo, exp.optimizer), state, tasks)
    state, _ = compiled(state, tasks)  # warm-up
    block(state)
    return {"step": compiled, "state": state, "tasks": tasks, "times": [], **stats}


def timed_call(run: dict) -> None:
    t0 = time.perf_counter()
    run["state"], metrics = run["step"](run["state"], run["tasks"])
    block((run["state"], metrics))
    run["times"].append(time.perf_counter() - t0)


def main(argv=None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="config specs, e.g. fewrel:smollm2_5w1s_maml")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls of each config")
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every config")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds={args.rounds}: must be at least 1")
    runs = {spec: prepare(spec, args.set) for spec in args.configs}
    for _ in range(args.rounds):
        for run in runs.values():
            timed_call(run)
    first = statistics.median(runs[args.configs[0]]["times"])
    print(f"{args.rounds} interleaved rounds {' '.join(args.set)}")
    print("| config | step (median s) | min-max | ratio | GFLOP | temp MiB | compile |")
    print("|---|---|---|---|---|---|---|")
    for spec, run in runs.items():
        median = statistics.median(run["times"])
        run["median_s"] = median
        print(
            f"| {spec} | {median:.3f} | {min(run['times']):.3f}-{max(run['times']):.3f} | "
            f"{median / first:.2f}x | {run['flops'] / 1e9:.1f} | "
            f"{run['temp_bytes'] / 2**20:.0f} | {run['compile_s']:.1f} s |"
        )
    return runs


if __name__ == "__main__":
    main()
