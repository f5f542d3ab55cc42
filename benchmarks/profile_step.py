"""Where the time of the standard second-order step goes: run, compile and trace profiles.

    PYTHONPATH=. .venv/bin/python -m benchmarks.profile_step --out benchmarks/results
    PYTHONPATH=. .venv/bin/python -m benchmarks.profile_step --smoke --out /tmp/p   # seconds

Writes ``profile.md`` and ``profile.json``:

- **run**: the jitted metajax training step under ``jax.profiler`` (XLA:CPU reports one event
  per executed kernel), each kernel put in a category by what its HLO computes (matmul,
  convolution, reduction, transpose/copy, elementwise, other); beside it the PyTorch
  autograd peer under ``torch.profiler`` (if torch is installed), the same categories from aten
  op names. The split answers whether a gap is in the matmuls or around them.
- **compile**: ``lowered.compile()`` under ``jax.profiler``: XLA's own phases (HLO passes,
  LLVM code generation of each fused kernel, thunk emission).
- **trace**: ``jit.trace`` + ``lower`` under ``cProfile``: the Python cost of building the
  program, split between the model (Flax), JAX's transformations and metajax.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import glob
import gzip
import json
import os
import platform
import pstats
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import metajax as mj
from benchmarks import cases
from benchmarks.measure import time_calls
from benchmarks.run import SMOKE, STANDARD, algorithm

# "transpose/copy": a layout change, alone or fused with elementwise work.
CATEGORIES = ("matmul", "convolution", "reduction", "transpose/copy", "elementwise", "other")


def _trace_events(fn, repeats: int) -> list[dict]:
    """Complete ("X") events of ``repeats`` calls of ``fn`` under ``jax.profiler``."""
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(repeats):
                jax.block_until_ready(fn())
        path = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0]
        events = json.load(gzip.open(path))["traceEvents"]
    return [e for e in events if e.get("ph") == "X"]


def _hlo_categories(hlo_text: str) -> dict[str, str]:
    """Instruction name -> category, a fusion by the heaviest op in its computation."""
    computations, current = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
        if head and line.rstrip().endswith("{"):
            current = computations.setdefault(head.group(1), [])
        elif current is not None:
            current.append(line)

    def body_category(lines: list[str]) -> str:
        text = "\n".join(lines)
        if " dot(" in text:
            return "matmul"
        if " convolution(" in text:
            return "convolution"
        if re.search(r" (reduce|reduce-window|select-and-scatter)\(", text):
            return "reduction"
        if re.search(r" (transpose|copy)\(", text):
            return "transpose/copy"
        return "elementwise"

    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = .*? ([a-z\-]+)\(", line)
        if not m:
            continue
        name, op = m.groups()
        called = re.search(r"calls=%?([\w.\-]+)", line)
        if op in ("fusion", "custom-call") and called and called.group(1) in computations:
            out[name] = body_category(computations[called.group(1)])
        elif op == "dot":
            out[name] = "matmul"
        elif op == "convolution":
            out[name] = "convolution"
        elif op in ("reduce", "reduce-window", "select-and-scatter"):
            out[name] = "reduction"
        elif op in (
            "copy",
            "transpose",
            "bitcast",
            "broadcast",
            "concatenate",
            "slice",
            "dynamic-slice",
            "dynamic-update-slice",
            "pad",
            "reshape",
            "gather",
            "scatter",
            "iota",
        ):
            out[name] = "transpose/copy"
        else:
            out[name] = "other"
    return out


def _split(totals: dict[str, float], counts: dict[str, int], per_step: int) -> dict:
    total = sum(totals.values())
    return {
        c: {
            "ms_per_step": totals.get(c, 0.0) / per_step,
            "fraction": totals.get(c, 0.0) / total if total else 0.0,
            "calls_per_step": counts.get(c, 0) / per_step,
        }
        for c in CATEGORIES
    }


def profile_run(case, repeats: int) -> dict:
    """Kernel time per category of the metajax second-order training step."""
    opt = optax.adam(1e-3)
    algo = algorithm("maml", case)
    step = mj.make_train_step(algo, opt)
    state = mj.train_state(algo, jax.tree.map(jnp.copy, case.params), opt)
    compiled = step.lower(state, case.tasks).compile()
    categories = _hlo_categories(compiled.as_text())
    holder = [state]

    def run():
        holder[0], metrics = compiled(holder[0], case.tasks)
        return metrics

    plain = time_calls(run, warmup=2, repeats=repeats)["median_s"]
    start = time.perf_counter()
    events = _trace_events(run, repeats)
    wall = (time.perf_counter() - start) / repeats
    totals, counts, top = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        name = e["name"].split(":")[0]
        if name in categories:
            totals[categories[name]] += e["dur"] / 1e3
            counts[categories[name]] += 1
            top[f"{name} ({categories[name]})"] += e["dur"] / 1e3 / repeats
    return {
        "median_ms_per_step": plain * 1e3,
        "wall_ms_per_step_profiled": wall * 1e3,
        "kernel_ms_per_step": sum(totals.values()) / repeats,
        "categories": _split(totals, counts, repeats),
        "top_kernels_ms": dict(top.most_common(10)),
    }


def _torch_category(op: str) -> str | None:
    if op in ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::dot"):
        return "matmul"
    if op.startswith("aten::conv"):
        return "convolution"
    if op in (
        "aten::sum",
        "aten::mean",
        "aten::max",
        "aten::logsumexp",
        "aten::amax",
        "aten::var_mean",
        "aten::native_layer_norm",
        "aten::native_layer_norm_backward",
        "aten::_log_softmax",
        "aten::_softmax",
        "aten::_log_softmax_backward_data",
        "aten::_softmax_backward_data",
    ):
        return "reduction"
    if op in (
        "aten::t",
        "aten::transpose",
        "aten::view",
        "aten::expand",
        "aten::reshape",
        "aten::permute",
        "aten::as_strided",
        "aten::empty",
        "aten::empty_like",
        "aten::copy_",
        "aten::clone",
        "aten::contiguous",
        "aten::cat",
        "aten::index",
        "aten::index_select",
        "aten::embedding_dense_backward",
        "aten::gather",
        "aten::scatter_add_",
        "aten::index_put_",
        "aten::_unsafe_view",
        "aten::fill_",
        "aten::zero_",
    ):
        return "transpose/copy"
    if op.startswith("aten::"):
        return "elementwise"
    return None


def profile_torch(case, heads: int, repeats: int) -> dict | None:
    """Self CPU time per category of the PyTorch autograd peer's second-order step."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    from benchmarks import torch_peers as tp

    model = tp.TorchLM(tp.torch_params(case.params), heads=heads)
    _, step = tp.make_autograd_step(
        model,
        tp.to_torch_tasks(case.tasks),
        steps=case.inner_steps,
        lr=case.inner_lr,
        second_order=True,
    )
    plain = time_calls(step, warmup=2, repeats=repeats)["median_s"]
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    wall = (time.perf_counter() - start) / repeats
    totals, counts, top = collections.Counter(), collections.Counter(), collections.Counter()
    for avg in prof.key_averages():
        category = _torch_category(avg.key)
        if category is not None and avg.self_cpu_time_total > 0:
            totals[category] += avg.self_cpu_time_total / 1e3
            counts[category] += avg.count
            top[f"{avg.key} ({category})"] += avg.self_cpu_time_total / 1e3 / repeats
    return {
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "median_ms_per_step": plain * 1e3,
        "wall_ms_per_step_profiled": wall * 1e3,
        "op_self_ms_per_step": sum(totals.values()) / repeats,
        "categories": _split(totals, counts, repeats),
        "top_ops_ms": dict(top.most_common(10)),
    }


def profile_compile(case) -> dict:
    """XLA's compile phases (top-level spans of the compile) and the biggest pass totals."""
    opt = optax.adam(1e-3)
    algo = algorithm("maml", case)
    step = mj.make_train_step(algo, opt)
    state = mj.train_state(algo, case.params, opt)
    lowered = step.lower(state, case.tasks)
    start = time.perf_counter()
    holder = []
    events = _trace_events(lambda: holder.append(lowered.compile()), 1)
    wall = time.perf_counter() - start
    totals, counts = collections.Counter(), collections.Counter()
    for e in events:
        totals[e["name"]] += e["dur"] / 1e6
        counts[e["name"]] += 1
    phases = [
        "HLO passes through layout assignment",
        "HLO passes after layout assignment",
        "Codegen",
        "FusionCompiler::Compile",
        "ThunkEmitter::EmitEntryComputation",
    ]
    phase_s = {p: sum(t for n, t in totals.items() if n.startswith(p)) for p in phases}
    kernels = counts.get("FusionCompiler::Compile", 0)
    return {
        "compile_s": wall,
        "phases_s": phase_s,
        "fused_kernels_compiled": kernels,
        "hlo_instructions": holder[0].as_text().count("\n"),
    }


def profile_trace(case) -> dict:
    """cProfile of tracing and lowering, cumulative time attributed by package."""
    opt = optax.adam(1e-3)
    algo = algorithm("maml", case)
    step = mj.make_train_step(algo, opt)
    state = mj.train_state(algo, case.params, opt)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    traced = step.trace(state, case.tasks)
    traced.lower()
    profiler.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats
    own = collections.Counter()  # self time by package: where the Python work happens
    for (path, _, _), (_, _, tottime, _, _) in stats.items():
        package = (
            "flax"
            if "/flax/" in path
            else "jax"
            if "/jax/" in path
            else "metajax"
            if "/metajax/" in path
            else "other"
        )
        own[package] += tottime
    total = sum(own.values())
    return {
        "trace_lower_s_profiled": wall,
        "jaxpr_equations": len(traced.jaxpr.jaxpr.eqns),
        "self_time_fraction": {k: v / total for k, v in own.most_common()},
        "ms_per_equation": wall * 1e3 / len(traced.jaxpr.jaxpr.eqns),
    }


def _markdown(result: dict) -> str:
    lines = [
        "# Profile of the standard second-order MAML step",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}",
        "",
    ]
    run, torch_run = result["run"], result.get("torch")
    lines += [
        "## Run: kernel time per step by category",
        "",
        "| category | metajax ms/step | share | kernels/step | torch autograd ms/step "
        "| share | ops/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in CATEGORIES:
        ours = run["categories"][c]
        theirs = torch_run["categories"][c] if torch_run else None
        lines.append(
            f"| {c} | {ours['ms_per_step']:.1f} | {ours['fraction']:.0%} | "
            f"{ours['calls_per_step']:.0f} | "
            + (
                f"{theirs['ms_per_step']:.1f} | {theirs['fraction']:.0%} | "
                f"{theirs['calls_per_step']:.0f} |"
                if theirs
                else "- | - | - |"
            )
        )
    lines.append(
        f"| **sum of kernels / ops** | {run['kernel_ms_per_step']:.1f} | | | "
        + (f"{torch_run['op_self_ms_per_step']:.1f} | | |" if torch_run else "- | | |")
    )
    lines.append(
        f"| step, not profiled (median) | {run['median_ms_per_step']:.1f} | | | "
        + (f"{torch_run['median_ms_per_step']:.1f} | | |" if torch_run else "- | | |")
    )
    lines += [
        "",
        "XLA:CPU runs independent kernels of one step on both cores at once, so the sum "
        "of kernel times can exceed the step time; PyTorch runs ops one after another, "
        "each op multi-threaded. Profiled steps run slower than plain ones.",
    ]
    lines += [
        "",
        "Top metajax kernels (ms/step): "
        + ", ".join(f"{k} {v:.1f}" for k, v in run["top_kernels_ms"].items()),
    ]
    if torch_run:
        lines += [
            "",
            "Top torch ops (self ms/step): "
            + ", ".join(f"{k} {v:.1f}" for k, v in torch_run["top_ops_ms"].items()),
        ]
    comp, trace = result["compile"], result["trace"]
    lines += [
        "",
        "## Compile (XLA:CPU)",
        "",
        f"{comp['compile_s']:.1f} s in all; {comp['fused_kernels_compiled']} fused kernels "
        f"compiled to machine code; {comp['hlo_instructions']} lines of optimised HLO.",
        "",
        "| phase | seconds |",
        "|---|---|",
    ]
    lines += [f"| {p} | {s:.1f} |" for p, s in comp["phases_s"].items()]
    lines += [
        "",
        "## Trace and lower (Python)",
        "",
        f"{trace['trace_lower_s_profiled']:.1f} s under cProfile for "
        f"{trace['jaxpr_equations']} jaxpr equations "
        f"({trace['ms_per_equation']:.2f} ms each). Self time by package: "
        + ", ".join(f"{k} {v:.0%}" for k, v in trace["self_time_fraction"].items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, for CI")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args(argv)
    size = SMOKE if args.smoke else STANDARD
    case = cases.transformer_case(**size)
    result = {
        "command": "python -m benchmarks.profile_step" + (" --smoke" if args.smoke else ""),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
        f"load average {os.getloadavg()[0]:.1f}",
        "run": profile_run(case, args.repeats),
    }
    if not args.no_torch:
        result["torch"] = profile_torch(case, size["heads"], args.repeats)
    result["compile"] = profile_compile(case)
    result["trace"] = profile_trace(case)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "profile.md").write_text(_markdown(result))
    print(_markdown(result))
    return result


if __name__ == "__main__":
    main()
