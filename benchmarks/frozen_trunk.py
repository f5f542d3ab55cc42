"""A pretrained model's meta-step with every block trainable against a frozen, cached trunk.

    PYTHONPATH=. .venv/bin/python -m benchmarks.frozen_trunk                  # the tiny fixture
    PYTHONPATH=. .venv/bin/python -m benchmarks.frozen_trunk --model smollm2-135m --top 2

One row per setting of ``task.trainable_blocks`` (none: every block; ``--top``: the top k):
the whole jitted training step (``mj.make_train_step``: second-order MAML meta-gradient and
the outer Adam update, state donated) of the ``words_lm`` family on one meta-batch, the
config ``--config`` with ``task.model`` set. Step times are medians after warm-up, in the
same process; the frozen-trunk row also reports the one-off time to compute and write the
trunk's states of the batch's sequences (``$METAJAX_TRUNK_CACHE``, a fresh temporary folder
unless set). Prints a Markdown table with the ratio of the two step times.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax

import metajax as mj
from benchmarks.measure import block, time_calls
from metajax.run.build import build
from metajax.run.config_files import load_config

FIXTURE = "tests/fixtures/gpt2_tiny"


def measure(spec: str, overrides: list[str], repeats: int) -> dict[str, float]:
    """Build time, first-batch sampling time (the trunk's states computed there) and the
    median step time of one config."""
    t0 = time.perf_counter()
    exp = build(load_config(spec, overrides))
    built = time.perf_counter() - t0
    batch = exp.config.train.meta_batch
    t0 = time.perf_counter()
    tasks = jax.device_put(exp.setup.train_source.sample(0, batch))
    sampled = time.perf_counter() - t0
    step = mj.make_train_step(exp.algo, exp.optimizer)
    state = mj.train_state(exp.algo, exp.params, exp.optimizer)
    t0 = time.perf_counter()
    state, _ = step(state, tasks)
    block(state)
    compiled = time.perf_counter() - t0

    def run():
        nonlocal state
        state, metrics = step(state, tasks)
        return metrics

    stats = time_calls(run, warmup=1, repeats=repeats)
    return {"build_s": built, "sample_s": sampled, "compile_s": compiled, **stats}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=FIXTURE, help="task.model (default the fixture)")
    parser.add_argument("--config", default="words_lm:maml", help="config spec")
    parser.add_argument("--top", type=int, default=1, help="trainable blocks of the frozen run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", nargs="*", default=[], help="more overrides, key=value")
    args = parser.parse_args(argv)
    os.environ.setdefault("METAJAX_TRUNK_CACHE", tempfile.mkdtemp(prefix="trunk-"))
    common = [f"task.model={args.model}", *args.set]
    print(f"{args.config} with task.model={args.model} {' '.join(args.set)}")
    print("| trainable blocks | step (median s) | p10-p90 | first batch sampled | compile |")
    print("|---|---|---|---|---|", flush=True)
    rows = {}
    # The frozen run first: its short compile gives a row even if the whole model's is slow.
    for blocks in (str(args.top), "none"):
        overrides = [*common, f"task.trainable_blocks={blocks}"]
        r = rows[blocks] = measure(args.config, overrides, args.repeats)
        print(
            f"| {'all' if blocks == 'none' else blocks} | {r['median_s']:.4f} | "
            f"{r['p10_s']:.4f}-{r['p90_s']:.4f} | {r['sample_s']:.2f} s | {r['compile_s']:.1f} s |",
            flush=True,
        )
    ratio = rows["none"]["median_s"] / rows[str(args.top)]["median_s"]
    print(f"step time, all blocks / top {args.top}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
