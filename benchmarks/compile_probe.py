"""Compile time of the standard second-order MAML step in a fresh process.

Run twice with the same ``METAJAX_BENCH_CACHE``: the first run compiles and fills JAX's
persistent compilation cache, the second loads from it. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax

jax.config.update("jax_compilation_cache_dir", os.environ["METAJAX_BENCH_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

import optax  # noqa: E402

import metajax as mj  # noqa: E402
from benchmarks import cases  # noqa: E402
from benchmarks.run import SMOKE, STANDARD  # noqa: E402


def main() -> None:
    case = cases.transformer_case(**(SMOKE if "--smoke" in sys.argv else STANDARD))
    algo = mj.maml(case.loss_fn, inner_steps=case.inner_steps, inner_lr=case.inner_lr, task_batch=1)
    optimizer = optax.adam(1e-3)
    state = mj.train_state(algo, case.params, optimizer)
    step = mj.make_train_step(algo, optimizer)
    t0 = time.perf_counter()
    lowered = step.lower(state, case.tasks)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    print(json.dumps({"trace_lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0}))


if __name__ == "__main__":
    main()
