"""The benchmark runner: first- against second-order MAML and its relatives, and PyTorch peers.

    python -m benchmarks.run                      # every suite, results in benchmarks/results/
    python -m benchmarks.run --suite standard peers --repeats 10
    python -m benchmarks.run --smoke --out /tmp/b # seconds: tiny sizes, every code path

Each suite returns rows (dicts); all rows go to ``results.json``, a markdown table per suite to
``results.md`` and plots to PNG files (see benchmarks/report.py). Timings are medians after
warm-up of whole jitted training steps (meta-gradient plus outer Adam update) and are meant to be
read as ratios between rows of the same run. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import metajax as mj
from benchmarks import cases, report
from benchmarks.measure import compile_stats, matmul_peak_flops, time_calls

STANDARD = dict(
    width=128,
    depth=2,
    heads=4,
    mlp_width=512,
    seq=32,
    vocab=64,
    tasks=8,
    support=5,
    query=15,
    inner_steps=5,
    inner_lr=0.1,
)
SMOKE = dict(
    width=16,
    depth=1,
    heads=2,
    mlp_width=32,
    seq=8,
    vocab=16,
    tasks=2,
    support=2,
    query=3,
    inner_steps=2,
    inner_lr=0.1,
)


def algorithm(name: str, case: cases.Case, **kw) -> mj.MetaLearner:
    """The algorithms compared, all on plain SGD inner steps at the case's rate.

    The inner loop is unrolled unless ``unroll`` says otherwise: XLA's cost analysis counts a
    ``lax.scan`` body once, so FLOPs are right only for the unrolled form.
    """
    common = dict(inner_steps=case.inner_steps, inner_lr=case.inner_lr, **{"unroll": True, **kw})
    if name == "maml":
        return mj.maml(case.loss_fn, **common)
    if name == "fomaml":
        return mj.maml(case.loss_fn, first_order=True, **common)
    if name == "reptile":
        return mj.reptile(case.loss_fn, **{k: v for k, v in common.items() if k != "remat"})
    if name == "anil":
        # The LM's head is the final LayerNorm and the (tied) embedding matrix.
        return mj.anil(case.loss_fn, head=r"ln_final|embed|head", **common)
    if name == "imaml":
        return mj.imaml(
            case.loss_fn, reg=1.0, cg_steps=5, **{k: v for k, v in common.items() if k != "remat"}
        )
    raise ValueError(f"unknown algorithm {name!r}")


def measure_step(
    algo,
    case: cases.Case,
    repeats: int,
    peak: float | None = None,
    task_batch: int | None = None,
    unroll_tasks: bool = False,
) -> dict:
    """Compile stats and median time of one whole training step (meta-grad + Adam).

    With ``task_batch`` the tasks run in a ``lax.scan`` whose body XLA's cost analysis counts
    once, so FLOPs are scaled by the number of task groups (not when ``unroll_tasks``).
    """
    optimizer = optax.adam(1e-3)
    step = mj.make_train_step(algo, optimizer)
    # The step donates its state: give it a copy, the case's params are used again.
    state = mj.train_state(algo, jax.tree.map(jnp.copy, case.params), optimizer)
    compiled, stats = compile_stats(step, state, case.tasks)
    holder = [state]

    def run():
        holder[0], metrics = compiled(holder[0], case.tasks)
        return metrics

    stats.update(time_calls(run, warmup=1, repeats=repeats))
    if task_batch and not unroll_tasks:
        stats["flops"] *= jax.tree.leaves(case.tasks)[0].shape[0] // task_batch
    if peak:
        stats["flops_per_s"] = stats["flops"] / stats["median_s"]
        stats["fraction_of_matmul_peak"] = stats["flops_per_s"] / peak
    return stats


def suite_standard(args, peak) -> list[dict]:
    """Every algorithm on the standard Transformer case (and the task loop forms of MAML)."""
    size = SMOKE if args.smoke else STANDARD
    case = cases.transformer_case(**size)
    rows = []
    variants = [
        ("maml", {}),
        ("maml", {"task_batch": 1}),
        ("fomaml", {}),
        ("fomaml", {"task_batch": 1}),
        ("reptile", {"task_batch": 1}),
        ("anil", {"task_batch": 1}),
        ("imaml", {"task_batch": 1}),
    ]
    if args.smoke:
        variants = [("maml", {}), ("imaml", {"task_batch": 1})]
    for name, kw in variants:
        row = {"case": "transformer", "algorithm": name, **kw}
        row.update(
            measure_step(
                algorithm(name, case, **kw), case, args.repeats, peak, kw.get("task_batch")
            )
        )
        rows.append(row)
        print(report.row_line(row), flush=True)
    return rows


def suite_convnet(args, peak) -> list[dict]:
    """The Omniglot ConvNet, 5-way and 20-way 1-shot, second- and first-order MAML.

    Sized as the CPU experiments (32 filters, 8 tasks, 5 queries per class), in the three
    task-loop forms: vmap (grouped convolutions on XLA:CPU), ``lax.scan`` over single tasks
    (convolutions in a while loop, jax-ml/jax#12868) and the unrolled loop.
    """
    rows = []
    shapes = [(5, 5), (20, 5)] if not args.smoke else [(2, 2)]
    forms = {
        "vmap": {},
        "scan": {"task_batch": 1},
        "unrolled": {"task_batch": 1, "unroll_tasks": True},
    }
    for ways, queries in shapes:
        case = cases.convnet_case(
            ways=ways,
            queries=queries,
            tasks=2 if args.smoke else 8,
            filters=8 if args.smoke else 32,
        )
        for name in ("maml",) if args.smoke else ("maml", "fomaml"):
            for form, kw in forms.items():
                row = {"case": case.name, "algorithm": name, "task_loop": form}
                row.update(
                    measure_step(
                        algorithm(name, case, **kw),
                        case,
                        args.repeats,
                        peak,
                        kw.get("task_batch"),
                        kw.get("unroll_tasks", False),
                    )
                )
                rows.append(row)
                print(report.row_line(row), flush=True)
    return rows


def suite_inner_steps(args, peak) -> list[dict]:
    """Time and compiled temp memory against inner steps, first/second order, remat on/off.

    Uses the ``lax.scan`` inner loop (compile time independent of the step count) on a
    narrower Transformer; FLOPs are not reported here because XLA counts a scan body once.
    """
    size = dict(SMOKE if args.smoke else STANDARD)
    if not args.smoke:
        size.update(width=64, mlp_width=256, tasks=4)
    steps_list = [2] if args.smoke else [1, 5, 10, 25, 50, 100]
    rows = []
    for order in ("maml",) if args.smoke else ("maml", "fomaml"):
        for remat in (False, True):
            if order == "fomaml" and remat:
                continue  # first order has no backward pass through the inner loop
            for steps in steps_list:
                case = cases.transformer_case(**{**size, "inner_steps": steps})
                algo = algorithm(order, case, remat=remat, unroll=False, task_batch=1)
                row = {
                    "case": "transformer-64",
                    "algorithm": order,
                    "remat": remat,
                    "inner_steps": steps,
                }
                row.update(measure_step(algo, case, max(3, args.repeats // 3)))
                # XLA counts a scan body once: per-step work, not the step's total.
                row["scan_body_flops"] = row.pop("flops")
                rows.append(row)
                print(report.row_line(row), flush=True)
    return rows


def suite_meta_batch(args, peak) -> list[dict]:
    """Step time against the number of tasks, vmapped against scanned task loops."""
    rows = []
    for tasks in [2] if args.smoke else [1, 2, 4, 8, 16]:
        case = cases.transformer_case(**{**(SMOKE if args.smoke else STANDARD), "tasks": tasks})
        for task_batch in (None, 1):
            row = {
                "case": "transformer",
                "algorithm": "maml",
                "tasks": tasks,
                "task_batch": task_batch,
            }
            row.update(
                measure_step(
                    algorithm("maml", case, task_batch=task_batch),
                    case,
                    max(3, args.repeats // 3),
                    peak,
                    task_batch,
                )
            )
            rows.append(row)
            print(report.row_line(row), flush=True)
    return rows


def suite_model_size(args, peak) -> list[dict]:
    """Second- against first-order cost as the Transformer widens."""
    rows = []
    for width in [8] if args.smoke else [32, 64, 128, 256]:
        size = {**(SMOKE if args.smoke else STANDARD), "width": width, "mlp_width": 4 * width}
        case = cases.transformer_case(**size)
        for name in ("fomaml",) if args.smoke else ("maml", "fomaml"):
            row = {"case": f"transformer-{width}", "algorithm": name, "width": width}
            row.update(
                measure_step(
                    algorithm(name, case, task_batch=1),
                    case,
                    max(3, args.repeats // 3),
                    peak,
                    task_batch=1,
                )
            )
            rows.append(row)
            print(report.row_line(row), flush=True)
    return rows


def suite_peers(args, peak) -> list[dict]:
    """metajax against plain PyTorch autograd, higher and torchopt, same weights and tasks."""
    from benchmarks import peers

    return peers.compare(
        STANDARD if not args.smoke else SMOKE, args.repeats, algorithm, measure_step
    )


def suite_compile_cache(args, peak) -> list[dict]:
    """Compile time of the standard second-order step, cold and from the persistent cache.

    Runs ``benchmarks/compile_probe.py`` twice in fresh processes sharing a fresh cache dir.
    """
    cache = Path(tempfile.mkdtemp(prefix="metajax-compile-probe-"))
    env = {**os.environ, "METAJAX_BENCH_CACHE": str(cache), "PYTHONPATH": str(Path.cwd())}
    rows = []
    for label in ("cold", "from_cache"):
        cmd = [sys.executable, "-m", "benchmarks.compile_probe"] + (
            ["--smoke"] if args.smoke else []
        )
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        row = {
            "case": "transformer",
            "algorithm": "maml",
            "cache": label,
            **json.loads(out.stdout.strip().splitlines()[-1]),
        }
        rows.append(row)
        print(report.row_line(row), flush=True)
    return rows


SUITES = {
    "standard": suite_standard,
    "convnet": suite_convnet,
    "inner_steps": suite_inner_steps,
    "meta_batch": suite_meta_batch,
    "model_size": suite_model_size,
    "peers": suite_peers,
    "compile_cache": suite_compile_cache,
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--suite", nargs="+", default=["all"], choices=["all", *SUITES], help="which suites to run"
    )
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per row")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks, not numbers")
    args = parser.parse_args(argv)
    names = list(SUITES) if "all" in args.suite else args.suite
    if args.smoke and "peers" in names and not _has_torch():
        names.remove("peers")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    peak = matmul_peak_flops(256 if args.smoke else 2048, repeats=3 if args.smoke else 10)
    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()],
            "load_average_start": os.getloadavg(),
        },
        "command": " ".join(["python -m benchmarks.run", *(argv or sys.argv[1:])]),
        "matmul_peak_flops_per_s": peak,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "suites": {},
    }
    print(f"float32 matmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
    for name in names:
        print(f"== {name}", flush=True)
        results["suites"][name] = SUITES[name](args, peak)
        _write(results, args.out)  # after every suite: a killed run keeps what it measured
    results["machine"]["load_average_end"] = os.getloadavg()
    _write(results, args.out)
    return results


def _write(results: dict, out: str) -> None:
    Path(out, "results.json").write_text(json.dumps(results, indent=1, default=str))
    Path(out, "results.md").write_text(report.markdown(results))
    report.plots(results, out)


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
