"""How a jitted function is measured: compile time, FLOPs, memory, step time.

Conventions (DESIGN.md, "Performance"): time a jitted call after warm-up with
``block_until_ready``, median of many runs; FLOPs from ``cost_analysis()`` of
the compiled program (XLA counts a ``scan`` body once, so benchmarks unroll);
memory from ``memory_analysis()`` (temporary bytes, deterministic); peak
FLOP/s from a large float32 matmul measured in the same process.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def time_calls(
    fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 20, min_seconds: float = 0.0
) -> dict[str, float]:
    """Median and spread of ``fn()`` wall time in seconds, after ``warmup`` calls.

    Runs at least ``repeats`` times and, if ``min_seconds`` is set, until that much time passed.
    """
    for _ in range(warmup):
        block(fn())
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "median_s": statistics.median(times),
        "p10_s": times[len(times) // 10],
        "p90_s": times[(9 * len(times)) // 10],
        "runs": len(times),
    }


def compile_stats(jitted: Callable, *args) -> tuple[Any, dict[str, float]]:
    """Lowers and compiles ``jitted`` on ``args``; returns (compiled, stats)."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax returned one dict per device program
        cost = cost[0]
    memory = compiled.memory_analysis()
    return compiled, {
        "trace_lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "flops": float(cost.get("flops", float("nan"))) if cost else float("nan"),
        "temp_bytes": int(memory.temp_size_in_bytes) if memory is not None else -1,
    }


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large float32 matmul on the default device: the machine's practical peak."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    timing = time_calls(lambda: mm(a, b), warmup=2, repeats=repeats)
    return 2 * n**3 / timing["median_s"]
