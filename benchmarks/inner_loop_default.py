"""The default inner loop against forced forms and a hand-written meta-gradient.

    PYTHONPATH=. .venv/bin/python -m benchmarks.inner_loop_default            # standard case
    PYTHONPATH=. .venv/bin/python -m benchmarks.inner_loop_default --smoke    # seconds

Part one times the second-order meta-gradient of the standard case (all 8 tasks vmapped, 5
inner SGD steps) in four forms, interleaved: one call of each form per round, in an order
drawn afresh every round, so that the load of a shared machine falls on all alike; the median
over rounds is reported with its ratio to the hand-written form. The forms: metajax's
default (``mj.maml`` as it comes), ``unroll=True``, ``unroll=False``, and ``jax.grad``
through a Python loop of ``jax.grad`` steps, vmapped over tasks, without metajax. The
metajax forms run with ``monitor=False`` so that all four compute the same thing (the query
loss before adaptation is a forward pass more); every form's meta-gradient is checked
against the hand-written one before anything is timed.

Part two compiles the default with ``remat=True`` at few and many inner steps (5 and 50)
and the forced scan at few: trace and lower time, compile time, temporary memory
(``compiled.memory_analysis()``) and whether the program loops (``while`` in its HLO). Each
is compiled ``--compiles`` times, the rows in rotated order; the fastest is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import jax
import jax.flatten_util
import jax.numpy as jnp

import metajax as mj
from benchmarks import cases
from benchmarks.run import SMOKE, STANDARD

FORMS = ("default", "unroll", "scan", "hand")


def hand_meta_grad(loss_fn, steps: int, lr: float):
    """Second-order MAML written plainly: grad of the mean query loss after a Python loop of
    ``steps`` SGD steps, each a ``jax.grad``; tasks vmapped."""

    def task_loss(params, task):
        for _ in range(steps):
            grads = jax.grad(loss_fn)(params, task.support)
            params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        return loss_fn(params, task.query)

    def meta_grad(params, tasks):
        mean = lambda p: jnp.mean(jax.vmap(task_loss, in_axes=(None, 0))(p, tasks))
        return jax.grad(mean)(params)

    return meta_grad


def metajax_meta_grad(case: cases.Case, steps: int, **kw):
    algo = mj.maml(case.loss_fn, inner_steps=steps, inner_lr=case.inner_lr, monitor=False, **kw)
    return lambda params, tasks: algo.meta_grad(params, tasks)[0]


def form_fn(form: str, case: cases.Case, steps: int, **kw):
    if form == "hand":
        return hand_meta_grad(case.loss_fn, steps, case.inner_lr)
    unroll = {"default": {}, "unroll": {"unroll": True}, "scan": {"unroll": False}}[form]
    return metajax_meta_grad(case, steps, **unroll, **kw)


def rel_diff(a, b) -> float:
    fa, _ = jax.flatten_util.ravel_pytree(a)
    fb, _ = jax.flatten_util.ravel_pytree(b)
    return float(jnp.linalg.norm(fa - fb) / jnp.linalg.norm(fb))


def step_times(case: cases.Case, steps: int, rounds: int) -> dict:
    """Median seconds per meta-gradient of each form, interleaved over ``rounds`` rounds."""
    compiled, grads, programs = {}, {}, {}
    for form in FORMS:
        lowered = jax.jit(form_fn(form, case, steps)).lower(case.params, case.tasks)
        programs[form] = lowered.as_text()
        compiled[form] = lowered.compile()
        grads[form] = jax.block_until_ready(compiled[form](case.params, case.tasks))
    diffs = {form: rel_diff(grads[form], grads["hand"]) for form in FORMS}
    if max(diffs.values()) > 1e-4:
        raise AssertionError(f"the forms disagree with the hand-written meta-gradient: {diffs}")
    times = {form: [] for form in FORMS}
    rng = random.Random(0)
    for _ in range(rounds):
        # A fresh order each round: a call right after the same program (the default and
        # unroll=True are one program at few steps) runs faster, so no fixed neighbour.
        for form in rng.sample(FORMS, len(FORMS)):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled[form](case.params, case.tasks))
            times[form].append(time.perf_counter() - t0)
    median = {form: statistics.median(ts) for form, ts in times.items()}
    return {
        form: {
            "median_s": median[form],
            "vs_hand": median[form] / median["hand"],
            "runs": len(times[form]),
            "rel_diff_vs_hand": diffs[form],
            # Which forced form's program the default's is, operation for operation.
            "same_program_as_default": programs[form] == programs["default"],
        }
        for form in FORMS
    }


def remat_compile(size: dict, form: str, steps: int) -> dict:
    """Trace, lower and compile the remat meta-gradient of ``form`` at ``steps`` inner steps."""
    case = cases.transformer_case(**{**size, "inner_steps": steps})
    fn = jax.jit(form_fn(form, case, steps, remat=True))
    t0 = time.perf_counter()
    lowered = fn.lower(case.params, case.tasks)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return {
        "form": form,
        "inner_steps": steps,
        "trace_lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "ready_s": t2 - t0,
        "temp_mb": compiled.memory_analysis().temp_size_in_bytes / 1e6,
        "loops": "stablehlo.while" in lowered.as_text(),
    }


def report(result: dict) -> str:
    lines = [
        f"Meta-gradient, {result['inner_steps']} inner steps, median of {result['rounds']} "
        "interleaved rounds:",
        "",
        "| form | median s | vs hand-written | rel. diff. of gradient | default's program |",
        "|---|---|---|---|---|",
    ]
    for form, r in result["step"].items():
        lines.append(
            f"| {form} | {r['median_s']:.3f} | {r['vs_hand']:.3f}x | "
            f"{r['rel_diff_vs_hand']:.1e} | {r['same_program_as_default']} |"
        )
    lines += [
        "",
        "With remat:",
        "",
        "| form | inner steps | loops | trace+lower s | compile s | ready s | temp MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["remat"]:
        lines.append(
            f"| {r['form']} | {r['inner_steps']} | {r['loops']} | {r['trace_lower_s']:.1f} | "
            f"{r['compile_s']:.1f} | {r['ready_s']:.1f} | {r['temp_mb']:.1f} |"
        )
    few, many = result["remat"][0], result["remat"][1]
    lines += [
        "",
        f"default, remat, {many['inner_steps']} against {few['inner_steps']} steps: ready "
        f"{many['ready_s'] / few['ready_s']:.2f}x, compile "
        f"{many['compile_s'] / few['compile_s']:.2f}x, temp memory "
        f"{many['temp_mb'] / few['temp_mb']:.2f}x",
        f"load average {result['load'][0]} at start, {result['load'][1]} at end",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed calls of each form")
    parser.add_argument("--remat-steps", type=int, nargs=2, default=[5, 50])
    parser.add_argument("--compiles", type=int, default=2, help="compiles of each remat row")
    parser.add_argument("--out", default=None, help="folder for inner_loop_default.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks, not numbers")
    args = parser.parse_args(argv)
    size = SMOKE if args.smoke else STANDARD
    rounds = 1 if args.smoke else args.rounds
    few, many = (2, 12) if args.smoke else args.remat_steps
    load = [os.getloadavg()[0]]  # the 1-minute average of /proc/loadavg
    case = cases.transformer_case(**size)
    result = {
        "command": "python -m benchmarks.inner_loop_default " + " ".join(argv or []),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "inner_steps": case.inner_steps,
        "rounds": rounds,
        "step": step_times(case, case.inner_steps, rounds),
    }
    print(json.dumps(result["step"]), flush=True)
    rows = (("default", few), ("default", many), ("scan", few))
    runs = {row: [] for row in rows}
    for r in range(1 if args.smoke else args.compiles):
        for row in rows[r % len(rows) :] + rows[: r % len(rows)]:
            runs[row].append(remat_compile(size, *row))
            print(json.dumps(runs[row][-1]), flush=True)
    result["remat"] = [min(runs[row], key=lambda x: x["ready_s"]) for row in rows]
    result["load"] = load + [os.getloadavg()[0]]
    print(report(result))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "inner_loop_default.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
