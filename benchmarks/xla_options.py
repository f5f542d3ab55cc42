"""XLA:CPU's options on the standard second-order step: compile time, step time, PyTorch.

    PYTHONPATH=. .venv/bin/python -m benchmarks.xla_options --out benchmarks/results/xla_options
    PYTHONPATH=. .venv/bin/python -m benchmarks.xla_options --smoke      # seconds: tiny sizes

Each option set runs in its own process (``XLA_FLAGS`` is read once, at backend start) on the
standard case (``benchmarks.run.STANDARD``): second-order MAML, 5 inner SGD steps, 8 tasks
under ``vmap``, the whole training step (``benchmarks.run.measure_step``) in the default
scanned form and unrolled. The unrolled meta-gradient of every option set is checked against
the default's (relative difference, float32) before its times count. The default runs first
and last, to bracket the machine's load; ``torch`` times the PyTorch peers on the same
weights and tasks (plain autograd and ``higher``; optional, skipped without torch).
Writes ``xla_options.json`` and prints a Markdown table with ratios to the default.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# name -> (XLA_FLAGS, what it is). Only options this jaxlib accepts (0.10.2).
OPTIONS = {
    "default": ("", "XLA:CPU as shipped"),
    "xnn_dot": ("--xla_cpu_experimental_xnn_fusion_type=dot", "XNNPACK for dots"),
    "xnn_all": (
        "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
        "XNNPACK for dots, elementwise ops and reductions",
    ),
    "ynn_dot": ("--xla_cpu_experimental_ynn_fusion_type=dot", "YNNPACK for dots only"),
    "ynn_off": ("--xla_cpu_experimental_ynn_fusion_type=", "no YNNPACK (on by default)"),
    "onednn_dot": ("--xla_cpu_experimental_onednn_fusion_type=dot", "oneDNN for dots"),
    "no_concurrency_scheduler": (
        "--xla_cpu_enable_concurrency_optimized_scheduler=false",
        "the memory-ordered scheduler instead of the concurrency-optimised one",
    ),
    "fast_math": ("--xla_cpu_enable_fast_math=true", "LLVM fast math"),
    "opt_level_0": (
        "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
        "no LLVM optimisation, the older loop emitters (the tests' fast compile)",
    ),
}


LIBRARIES = ("xnn", "ynn", "onednn")


def child(name: str, smoke: bool, grads: Path) -> dict:
    """Measures one option set in this process (its XLA_FLAGS already set)."""
    import jax

    from benchmarks import cases
    from benchmarks.run import SMOKE, STANDARD, algorithm, measure_step

    size = SMOKE if smoke else STANDARD
    case = cases.transformer_case(**size)
    repeats = 2 if smoke else 3
    row = {"option": name, "xla_flags": os.environ.get("XLA_FLAGS", "")}
    for form, unroll in (("scan", False), ("unrolled", True)):
        stats = measure_step(algorithm("maml", case, unroll=unroll), case, repeats)
        row[form] = {k: stats[k] for k in ("trace_lower_s", "compile_s", "median_s")}
    compiled = jax.jit(algorithm("maml", case).meta_grad).lower(case.params, case.tasks).compile()
    meta_grads = compiled(case.params, case.tasks)[0]
    flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(meta_grads)])
    # Which dots a library took: its fusions in the optimised program of the meta-gradient.
    program = compiled.as_text()
    row["dots"] = program.count(" dot(")
    row["library_fusions"] = {lib: program.count(f"__{lib}_fusion") for lib in LIBRARIES}
    np.save(grads / f"grad_{name}.npy", flat)
    return row


def torch_child(smoke: bool, grads: Path) -> list[dict]:
    """The PyTorch peers' second-order step on the default's weights and tasks."""
    import torch

    from benchmarks import cases
    from benchmarks import torch_peers as tp
    from benchmarks.measure import time_calls
    from benchmarks.run import SMOKE, STANDARD

    torch.manual_seed(0)
    size = SMOKE if smoke else STANDARD
    case = cases.transformer_case(**size)
    reference = np.load(grads / "grad_default.npy")
    rows = []
    for name in ("torch_autograd", "higher"):
        model = tp.TorchLM(tp.torch_params(case.params), heads=size["heads"])
        meta_grad, step = tp.PEERS[name](
            model,
            tp.to_torch_tasks(case.tasks),
            steps=case.inner_steps,
            lr=case.inner_lr,
            second_order=True,
        )
        flat = np.concatenate([g.detach().numpy().ravel() for g in meta_grad()])
        diff = float(np.linalg.norm(flat - reference) / np.linalg.norm(reference))
        timing = time_calls(step, warmup=1, repeats=2 if smoke else 3)
        rows.append({"option": name, "grad_rel_diff": diff, "median_s": timing["median_s"]})
    return rows


def run_child(name: str, args: list[str], flags: str) -> list[dict]:
    env = {**os.environ, "XLA_FLAGS": flags}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.xla_options", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        return [{"option": name, "error": done.stderr.strip().splitlines()[-1][:300]}]
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict], reference: dict) -> str:
    lines = [
        "| option | XLA_FLAGS | scan: trace+lower s | scan: compile s | scan: step s "
        "| unrolled: compile s | unrolled: step s | unrolled step vs default | gradient vs "
        "default |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['option']} | - | failed: {r['error']} | | | | | | |")
        elif "scan" not in r:  # a PyTorch peer
            lines.append(
                f"| {r['option']} (PyTorch) | - | - | - | - | - | {r['median_s']:.3f} | "
                f"{r['median_s'] / reference['unrolled']['median_s']:.2f}x | "
                f"{r['grad_rel_diff']:.1e} |"
            )
        else:
            s, u = r["scan"], r["unrolled"]
            lines.append(
                f"| {r['option']} | `{r['xla_flags'] or '-'}` | {s['trace_lower_s']:.1f} | "
                f"{s['compile_s']:.1f} | {s['median_s']:.3f} | {u['compile_s']:.1f} | "
                f"{u['median_s']:.3f} | "
                f"{u['median_s'] / reference['unrolled']['median_s']:.2f}x | "
                f"{r['grad_rel_diff']:.1e} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/xla_options"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks, not numbers")
    parser.add_argument("--options", nargs="*", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--grads", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps([child(args.child, args.smoke, args.grads)]))
        return
    if args.torch_child:
        print(json.dumps(torch_child(args.smoke, args.grads)))
        return
    # The meta-gradients pass between processes through files; none is kept.
    grads = Path(tempfile.mkdtemp(prefix="xla_options_"))
    common = ["--grads", str(grads), *(["--smoke"] if args.smoke else [])]
    names = ["default", *(n for n in args.options if n != "default"), "default"]
    rows = []
    for i, name in enumerate(names):
        rows += run_child(name, ["--child", name, *common], OPTIONS[name][0])
        if i == 0 and "error" in rows[0]:
            sys.exit(f"the default XLA options failed: {rows[0]['error']}")
        if "error" not in rows[-1]:
            g = np.load(grads / f"grad_{name}.npy")
            if i == 0:
                reference_grad = g  # the first default's; the PyTorch peers read its file
            rows[-1]["grad_rel_diff"] = float(
                np.linalg.norm(g - reference_grad) / np.linalg.norm(reference_grad)
            )
        print(rows[-1], flush=True)
    np.save(grads / "grad_default.npy", reference_grad)
    try:
        import torch  # noqa: F401

        rows += run_child("torch", ["--torch-child", *common], "")
    except ImportError:
        print("torch is not installed: no PyTorch rows")
    shutil.rmtree(grads)
    (args.out / "xla_options.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows, rows[0]))


if __name__ == "__main__":
    main()
